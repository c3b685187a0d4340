"""The CPU inference paths of an RFT step, each against the path it replaced, same inputs, same run. One JSON record.

    python bench/cpu_inference.py               # the quickstart's shapes, 1 thread

Cases (each: production default vs the labelled baseline; ratio = default median / baseline median):
  tokenizer_decode  VisualTokenizer.decode of 4 contexts x 72 frames (one quickstart RFT step: 4 start states x
                    9 rows x 8 frames), 64x64, the quickstart's tokenizer shape (FSQ 8,6,5), random init.
                    Default: Decoder.frames. Baseline: the decoder module on each context's features repeated
                    per frame (the path before Decoder.frames; training still runs it).
  tokenizer_encode  encode_clip of 64 clips x 9 frames (one batch of the world model's segments). Default:
                    Encoder.frames. Baseline: the encoder module on repeated features.
  sampling_flat / sampling_peaked  top-p 0.8 sampling of 34 rows x 4375 codes (the CPU bench's RFT shape),
                    logits N(0, 0.3) (a random-init model's) and N(0, 3) (a trained model's). Default:
                    kernels/sampling.sample_cpu. Baseline: sample_cpu with every row through its sorted cut
                    (_sorted_cut_argmax: the path before the no-sort check); sample_reference (full argsort) is timed too.
  gumbel            the Gumbel transform -log(-log(u)) of 34 x 4375 uniforms in place (each sampling step's noise).
                    Default: kernels/sampling.gumbel_from_uniform_ (C++, vectorised log). Baseline:
                    gumbel_from_uniform_reference_ (torch's clamp / log / neg passes).
  decode_attention_S{30,290,560}  the world model's single-token attention at the CPU bench's RFT shape (small
                    preset: 4 layers, 4 heads of 64; 2 groups x 17 rows (--rows); 320-token shared prefix; S filled suffix
                    slots: the first, middle and last frame of 8), each layer's own caches, so the K/V come from
                    memory as in a decode step. Default: kernels/decode_attention_cpu (C++; the prefix packed once
                    per rollout, outside the timed region, as engine/cpu_decode.py does). Baseline:
                    decode_attention_cpu_reference (batched matmuls, the path before the C++ op).
  decode_gemms      one decode step's GEMMs at 34 rows (--rows, --vocab): qkv, wo (+ residual), gate/up, w2
                    (+ residual) for 4 layers and the head, timed after an 84 MB read (a step's K/V volume at the
                    middle frame, which evicts the weights, as in a rollout). Default: kernels/linear_cpu on weights
                    packed once (engine/cpu_decode.py). Baseline: torch.mm / addmm_ (MKL) on the weights.
  decode_layers_S290  one decode step's 4 layers at the middle frame (S = 290), the attention cases' shape, dim 256,
                    SwiGLU 1024, each layer's own caches. Default: kernels/decode_layer_cpu (one C++ call per layer,
                    as engine/cpu_decode.py runs it). Baseline: decode_layer_cpu_reference (torch ops: MKL GEMMs,
                    batched-matmul attention; the path for other dtypes or without the build).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name, emit, parse_args, time_fn  # noqa: E402


def _tokenizer_cases(contexts: int, frames: int, clips: int, repeats: int) -> dict:
    from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
    from vla_rft_engine.utils import nvtx_range
    tok = VisualTokenizer(TokenizerConfig(levels=[8, 6, 5])).eval()
    cfg, g = tok.cfg, torch.Generator().manual_seed(0)
    n_codes = 8 * 6 * 5
    G, p = cfg.latent_grid, cfg.dyn_patch
    ctx = torch.randint(0, n_codes, (contexts, G * G), generator=g)
    dyn = torch.randint(0, n_codes, (contexts, frames, (G // p) ** 2), generator=g)

    def decode_module():
        zc = tok._ids_to_latent(ctx, tok.ctx_proj, tok.ctx_quant, (G, G), 1)
        zd = tok._ids_to_latent(dyn.flatten(0, 1), tok.dyn_proj, tok.dyn_quant, (G // p, G // p), p)
        _, feats = tok.ctx_decoder(zc)
        img, _ = tok.dyn_decoder(zd, [f.repeat_interleave(frames, 0) for f in feats])
        return ((img.clamp(-1, 1) + 1) / 2).view(contexts, frames, 3, *img.shape[-2:])

    clip = torch.rand(clips, 9, 3, cfg.image_size, cfg.image_size, generator=g)

    def encode_module():
        _, ids, feats = tok._encode_context(clip[:, 0])
        h, _ = tok.dyn_encoder(clip.flatten(0, 1) * 2 - 1, [f.repeat_interleave(9, 0) for f in feats])
        return ids, tok.dyn_quant(tok.dyn_to_code(tok._patchify(h)))[1].view(clips, 9, -1)

    out = {}
    with torch.no_grad():
        for name, default, base, shape in (
                ("tokenizer_decode", lambda: tok.decode(ctx, dyn), decode_module, [contexts, frames, 64]),
                ("tokenizer_encode", lambda: tok.encode_clip(clip), encode_module, [clips, 9, 3, 64, 64])):
            a, b = default(), base()
            diff = (a - b).abs().max().item() if name.endswith("decode") else int((a[1] != b[1]).sum())
            with nvtx_range(f"bench.{name}"):
                td = time_fn(default, repeats=repeats, warmup=1)
                tb = time_fn(base, repeats=repeats, warmup=1)
            out[name] = {"shape": shape, "default": {"what": "Decoder.frames / Encoder.frames (VisualTokenizer's "
                                                               "inference path)", **td},
                         "baseline": {"what": "the module with each context's features repeated per frame", **tb},
                         "ratio": td["median_s"] / tb["median_s"],
                         ("max_abs_diff" if name.endswith("decode") else "ids_differing"): diff}
    return out


def _sampling_cases(rows: int, vocab: int, repeats: int) -> dict:
    from vla_rft_engine.kernels.sampling import _sorted_cut_argmax, gumbel_noise, sample_cpu, sample_reference
    out = {}
    for name, scale in (("sampling_flat", 0.3), ("sampling_peaked", 3.0)):
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(rows, vocab, generator=g) * scale
        noise = gumbel_noise((rows, vocab), generator=g)

        def sorted_cut():  # sample_cpu with every row through the sorted cut
            z = logits.float()
            pz = z.softmax(-1)
            tok = _sorted_cut_argmax(logits, pz, z + noise, noise, 1.0, 0, 0.8)
            return tok, z.log_softmax(-1).gather(1, tok[:, None])[:, 0]
        assert torch.equal(sample_cpu(logits, noise, 1.0, 0, 0.8)[0], sample_reference(logits, noise, 1.0, 0, 0.8)[0])
        td = time_fn(lambda: sample_cpu(logits, noise, 1.0, 0, 0.8), repeats=repeats, warmup=3)
        tb = time_fn(sorted_cut, repeats=repeats, warmup=3)
        tr = time_fn(lambda: sample_reference(logits, noise, 1.0, 0, 0.8), repeats=repeats, warmup=3)
        out[name] = {"shape": [rows, vocab], "logit_scale": scale, "top_p": 0.8,
                     "default": {"what": "kernels/sampling.sample_cpu (with the log-prob)", **td},
                     "baseline": {"what": "sample_cpu with every row through the sorted cut (the path before the no-sort check)", **tb},
                     "reference": {"what": "sample_reference: full argsort", **tr},
                     "ratio": td["median_s"] / tb["median_s"], "tokens_equal_reference": True}
    from vla_rft_engine.kernels.sampling import gumbel_from_uniform_, gumbel_from_uniform_reference_
    from vla_rft_engine.utils import nvtx_range
    u = torch.rand(rows, vocab, generator=torch.Generator().manual_seed(3))
    diff = (gumbel_from_uniform_(u.clone()) - gumbel_from_uniform_reference_(u.clone())).abs().max().item()
    with nvtx_range("bench.gumbel"):  # each call transforms a fresh copy (the copy is timed on both sides)
        td = time_fn(lambda: gumbel_from_uniform_(u.clone()), repeats=repeats, warmup=3)
        tb = time_fn(lambda: gumbel_from_uniform_reference_(u.clone()), repeats=repeats, warmup=3)
    out["gumbel"] = {"shape": [rows, vocab], "default": {"what": "kernels/sampling.gumbel_from_uniform_ (C++ on fp32 CPU)", **td},
                     "baseline": {"what": "gumbel_from_uniform_reference_ (torch clamp/log/neg)", **tb},
                     "ratio": td["median_s"] / tb["median_s"], "max_abs_diff": diff}
    return out


def _decode_cases(rows: int, vocab: int, repeats: int) -> dict:
    from vla_rft_engine.kernels.decode_attention_cpu import (decode_attention_cpu, decode_attention_cpu_reference,
                                                             extension_available, pack_prefix)
    from vla_rft_engine.kernels.linear_cpu import linear_cpu, linear_cpu_reference, pack_linear_cpu
    from vla_rft_engine.utils import nvtx_range
    out: dict = {}
    layers, G, N, H, D, P, Smax = 4, 2, max(rows // 2, 2), 4, 64, 320, 575
    B, g = G * N, torch.Generator().manual_seed(2)
    pk, pv = torch.randn(2, layers, G, H, P, D, generator=g)
    sk, sv = torch.randn(2, layers, B, H, Smax, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    plens = torch.full((G,), P, dtype=torch.int64)
    packed = [pack_prefix(pk[i], pv[i], plens) for i in range(layers)]  # once per rollout in the decoder

    def ours(q, pk, pv, plens, sk, sv, S, i):
        return decode_attention_cpu(q, pk, pv, plens, sk, sv, S, packed=packed[i])

    def ref(q, pk, pv, plens, sk, sv, S, i):
        return decode_attention_cpu_reference(q, pk, pv, plens, sk, sv, S)
    for S in (30, 290, 560):
        def step(fn):
            return [fn(q, pk[i], pv[i], plens, sk[i], sv[i], S, i) for i in range(layers)]
        diff = max((a - b).abs().max().item() for a, b in zip(step(ours), step(ref)))
        with nvtx_range(f"bench.decode_attention_S{S}"):
            td = time_fn(lambda: step(ours), repeats=repeats, warmup=2)
            tb = time_fn(lambda: step(ref), repeats=repeats, warmup=2)
        kv_mb = layers * 2 * 4 * D * H * (B * S + G * P) / 1e6
        out[f"decode_attention_S{S}"] = {
            "shape": {"layers": layers, "groups": G, "rows": B, "heads": H, "head_dim": D, "prefix": P, "suffix": S},
            "default": {"what": "kernels/decode_attention_cpu (C++, prefix packed beforehand; extension built: "
                                f"{extension_available()})", **td, "kv_gbps": kv_mb / 1e3 / td["median_s"]},
            "baseline": {"what": "decode_attention_cpu_reference (batched matmuls: the path before the C++ op)",
                         **tb, "kv_gbps": kv_mb / 1e3 / tb["median_s"]},
            "kv_mb_per_step": kv_mb, "ratio": td["median_s"] / tb["median_s"], "max_abs_diff": diff}
    # (N, K, residual) per GEMM of a step, in the decoder's order
    shapes = [(768, 256, False), (256, 256, True), (2048, 256, False), (256, 1024, True)] * layers + [(vocab, 256, False)]
    ws = [torch.randn(n, k, generator=g) * 0.05 for n, k, _ in shapes]
    xs = [torch.randn(B, w.shape[1], generator=g) for w in ws]
    res = [torch.randn(B, w.shape[0], generator=g) if r else None for w, (_, _, r) in zip(ws, shapes)]
    packs = [pack_linear_cpu(w) for w in ws]
    flush = torch.ones(21 * 2 ** 20)  # 84 MB

    def gemms(fn):
        return [fn(x, w, p, r) for x, w, p, r in zip(xs, ws, packs, res)]

    def ours(x, w, p, r):  # the residual is accumulated into its own copy each time, as the decoder's x
        return linear_cpu(x, w, p) if r is None else linear_cpu(x, w, p, out=r.clone(), accumulate=True)

    def base(x, w, p, r):
        return linear_cpu_reference(x, w) if r is None else linear_cpu_reference(x, w, r.clone(), True)
    diff = max((a - b).abs().max().item() for a, b in zip(gemms(ours), gemms(base)))
    with nvtx_range("bench.decode_gemms"):
        td = time_fn(lambda: gemms(ours), repeats=repeats, warmup=2, before=flush.sum)
        tb = time_fn(lambda: gemms(base), repeats=repeats, warmup=2, before=flush.sum)
    out["decode_gemms"] = {
        "shape": {"rows": B, "weights": [list(w.shape) for w in ws]},
        "default": {"what": "kernels/linear_cpu on weights packed once, as engine/cpu_decode.py runs them (packed: "
                            f"{all(p is not None for p in packs)})", **td},
        "baseline": {"what": "torch.mm / addmm_ (MKL) on the weights", **tb}, "ratio": td["median_s"] / tb["median_s"],
        "max_abs_diff": diff}
    out["decode_layers_S290"] = _layer_case(pk, pv, sk, sv, plens, packed, 290, g, repeats)
    return out


def _layer_case(pk, pv, sk, sv, plens, packed, S: int, g, repeats: int) -> dict:
    from vla_rft_engine.kernels.decode_layer_cpu import decode_layer_cpu, decode_layer_cpu_reference, layer_weights
    from vla_rft_engine.utils import nvtx_range
    layers, G, H, P, D = pk.shape
    B, dim, inter = sk.shape[1], 256, 1024
    def r(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5
    ws = [layer_weights(torch.ones(dim), r(3 * H * D, dim), r(dim, H * D), torch.ones(dim), r(2 * inter, dim),
                        r(dim, inter)) for _ in range(layers)]
    ang = torch.randn(G, sk.shape[3], D // 2, generator=g)
    cos, sin = ang.cos(), ang.sin()
    x0 = torch.randn(B, 1, dim, generator=g)

    def step(fn, packed_prefix: bool):  # the step's token sits in slot S - 1 of every layer (rewritten each call)
        x = x0.clone()
        for i in range(layers):
            extra = (packed[i],) if packed_prefix else ()
            x = fn(x, ws[i], cos, sin, pk[i], pv[i], plens, sk[i], sv[i], S - 1, H, 1e-6, *extra)
        return x
    ours = lambda: step(decode_layer_cpu, True)  # noqa: E731
    base = lambda: step(decode_layer_cpu_reference, False)  # noqa: E731
    diff = (ours() - base()).abs().max().item()
    with nvtx_range(f"bench.decode_layers_S{S}"):
        td = time_fn(ours, repeats=repeats, warmup=2)
        tb = time_fn(base, repeats=repeats, warmup=2)
    return {"shape": {"layers": layers, "rows": B, "heads": H, "head_dim": D, "dim": dim, "intermediate": inter,
                      "prefix": P, "suffix": S},
            "default": {"what": "kernels/decode_layer_cpu: one C++ call per layer (built: "
                                f"{all(w.packed is not None for w in ws) and packed[0] is not None})", **td},
            "baseline": {"what": "decode_layer_cpu_reference: torch ops (MKL GEMMs, batched-matmul attention)", **tb},
            "ratio": td["median_s"] / tb["median_s"], "max_abs_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--frames", type=int, default=72)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--rows", type=int, default=34)
    ap.add_argument("--vocab", type=int, default=4375)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    a = parse_args(ap, argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = {**_tokenizer_cases(a.contexts, a.frames, a.clips, a.repeats),
             **_sampling_cases(a.rows, a.vocab, max(a.repeats, 20)),
             **_decode_cases(a.rows, a.vocab, max(a.repeats, 15))}
    emit({"bench": "cpu_inference", "device": device_name(torch.device("cpu")), "dtype": "float32",
          "torch_threads": torch.get_num_threads(), "cases": cases,
          "ratio_vs_baseline": {k: v["ratio"] for k, v in cases.items()}}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
