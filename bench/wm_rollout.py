"""World-model rollout throughput: our engine (the production default backend) against transformers baselines,
same weights, same rows, same run. One JSON record.

    python bench/wm_rollout.py                  # CPU: small preset, the built-in pipeline's RFT shape, 1 thread
    python bench/wm_rollout.py --profile        # GPU: paper preset, bf16; cudaProfilerStart/Stop for nsys

Sides (every one rolls out the same G x N rows; each baseline row carries its own full prompt):
  ours                 engine/rollout.py with the model's default attn_backend ("auto": triton on CUDA, the CPU
                       decode path on the CPU): ctx + dyn0 prefilled once per group, each row's own a_0 after it.
  hf_kv_cached         transformers, KV cache kept across frames: one prefill per row, one token per step, the
                       frame's last token + next action as one step (bench/hf_protocol.py): what a competent user
                       writes.
  hf_static_compiled   (CUDA) hf_kv_cached with a StaticCache and torch.compile(mode="reduce-overhead") on the
                       single-token step; --no-compile drops it.
  hf_generate_per_frame  transformers generate per frame, the whole prefix re-sent every frame: the release's
                       loop structure (the release runs it on vLLM, which is not measured here).
Defaults by device (each has a flag):
  CPU  small preset, fp32, 2 start states x 17 rollouts (16 sampled + 1 reference, as in RFT), 8 frames of 64
       tokens, 327-token prompt = the built-in tokenizer's layout (256 context + 64 dynamics shared by a group +
       7 own a_0 tokens, Eq. 10), 1 thread. --budget-s caps the slow baseline's repeats.
  CUDA paper preset, bf16, 16 start states x 17 rollouts, 8 frames, 1095-token prompt (1088 shared + 7 own).
Warm-up outside the timed region: one full rollout per side, but a 1-frame one for hf_generate_per_frame (minutes
on a CPU; its first timed repeat is not slower than the others). A 1-frame warm-up left hf_kv_cached's first
timed repeat ~2x slower than the rest. Then the sides alternate per repeat, so a load
change on a shared machine hits all of them. Rollouts/s counts one (start state, sample) rollout of `frames`
frames. On the CPU the record gives decode_floor: the step's lower bound from this core's measured GEMM rate
(weights) and stream-read rate (K/V bytes), against the measured step. On CUDA the record gives the decode
steps' fraction of the HBM roofline: (weight bytes + KV bytes read per step) / step time / peak bandwidth (peak
from a table by device name, or --peak-gbps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels
from bench.common import add_profile_flag, device_name, emit, profiled, time_fn  # noqa: E402

PEAK_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
             "A800": 2039, "RTX 4090": 1008, "L40S": 864, "L4": 300}
LABELS = {
    "ours": "engine rollout, production default backend, group-shared prompt prefix",
    "hf_kv_cached": "transformers, KV cache kept across frames, one prefill per row (what a competent user writes)",
    "hf_static_compiled": "transformers StaticCache + torch.compile(reduce-overhead) single-token step",
    "hf_generate_per_frame": "transformers generate per frame, whole prefix re-sent (the release's loop structure; "
                             "the release serves it with vLLM, not measured here)",
}


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, v in PEAK_GBPS.items():  # ordered: specific names before their families
        if key in name:
            return v
    return None


def roofline(wm, cfg, G, N, P, T, Fr, dtype, dev, t_ours, repeats, peak):
    """Decode-step time = (rollout - prefill) / steps; bytes a step must read = weights + prefix KV (once per
    group) + the average suffix KV."""
    from vla_rft_engine.engine.kv_cache import RolloutCache
    prompt = torch.randint(4375, 8750, (G, P), device=dev)

    def prefill():
        c = RolloutCache(cfg, G, N, P, T * Fr + (T - 1) * 7, dtype, dev)
        with torch.no_grad():
            wm.hidden(prompt, torch.arange(P, device=dev).expand(G, P), c)
    t_pre = time_fn(prefill, repeats=repeats, warmup=1, device=dev)["median_s"]
    step_s = max(t_ours - t_pre, 1e-9) / (T * Fr - 1)
    el = torch.finfo(dtype).bits // 8
    w_bytes = (wm.num_params() - wm.tok_embeddings.weight.numel()) * el
    kv_prefix = cfg.n_layer * G * cfg.n_kv_head * P * cfg.head_dim * 2 * el
    kv_suffix_avg = cfg.n_layer * G * N * cfg.n_kv_head * (T * (Fr + 7) / 2) * cfg.head_dim * 2 * el
    b = w_bytes + kv_prefix + kv_suffix_avg
    return {"prefill_s": t_pre, "step_s": step_s, "bytes_per_step": b, "peak_gbps": peak,
            "achieved_gbps": b / step_s / 1e9, "roofline_fraction": (b / step_s / 1e9 / peak) if peak else None}


def cpu_floor(wm, cfg, G, N, P, T, Fr, t_step):
    """A CPU decode step's lower bound from two measurements on this core: the weight matmuls at the measured
    GEMM rate (M = B rows; compute-bound at this size) plus the K/V bytes at the measured stream-read rate
    (the suffix K/V of 8 frames is ~80 MB per step at the CPU shape, far past any cache)."""
    B = G * N
    x, w = torch.randn(B, cfg.dim), torch.randn(cfg.intermediate_size, cfg.dim)
    gemm = time_fn(lambda: torch.mm(x, w.t()), repeats=50, warmup=5)["median_s"]
    gflops = 2 * B * cfg.dim * cfg.intermediate_size / gemm / 1e9
    big = torch.ones(64 * 2 ** 20)  # 256 MB
    read_gbps = big.numel() * 4 / time_fn(big.sum, repeats=5, warmup=1)["median_s"] / 1e9
    flops = 2 * B * (wm.num_params() - wm.tok_embeddings.weight.numel() - wm.output.weight.numel()
                     + cfg.num_codes * cfg.dim)  # layers + the head over dynamics codes
    kv = cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2 * 4 * (G * P + B * T * (Fr + 7) / 2)  # prefix once per group
    floor = flops / gflops / 1e9 + kv / read_gbps / 1e9
    return {"gemm_gflops": gflops, "stream_read_gbps": read_gbps, "weight_flops_per_step": flops,
            "kv_bytes_per_step": kv, "floor_step_s": floor, "measured_step_s": t_step,
            "floor_fraction": floor / t_step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="default: paper on CUDA, small on CPU")
    ap.add_argument("--groups", type=int, default=None, help="start states; default 16 on CUDA, 2 on CPU")
    ap.add_argument("--samples", type=int, default=17, help="rollouts per start state (16 sampled + 1 reference)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="default: 1095 on CUDA (paper layout), the built-in tokenizer's 327 on CPU")
    ap.add_argument("--tokens-per-frame", type=int, default=64)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--backend", default=None, help="ours: auto | triton | sdpa | flash | eager (default: the "
                    "model's default, auto)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=3, help="at most, for hf_generate_per_frame; see --budget-s")
    ap.add_argument("--budget-s", type=float, default=600.0,
                    help="skip further hf_generate_per_frame repeats once another would end the timed region past "
                         "this (600: room for 3 repeats of every side at the CPU default, ~6 min)")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: leave out hf_static_compiled")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for every side (1: on a shared CPU, 2 threads spin against each other)")
    ap.add_argument("--out", default=None)
    add_profile_flag(ap)
    a = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    from vla_rft_engine.engine.attention import resolve_backend
    from bench.hf_protocol import hf_frame_by_frame, hf_kv_cached
    from vla_rft_engine.engine.rollout import rollout as engine_rollout
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    from vla_rft_engine.utils import nvtx_range

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if cuda else "fp32")]
    if a.prompt_len:
        P = a.prompt_len
    elif cuda:
        P = 1095
    else:
        from vla_rft_engine.models.tokenizer import TokenizerConfig
        P = TokenizerConfig().layout().prompt_tokens
    preset = a.preset or ("paper" if cuda else "small")
    G, N, T, Fr = a.groups or (16 if cuda else 2), a.samples, a.frames, a.tokens_per_frame
    over = {"attn_backend": a.backend} if a.backend else {}
    cfg = WorldModelConfig.preset(preset, max_position=max(8192, P + T * 71 + 64), **over)
    backend = resolve_backend(cfg.attn_backend, dev)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:  # same weights for every side, through the HF format
        init_weights(WorldModel(cfg), std=0.02).save_pretrained(d)
        wm = WorldModel.from_pretrained(d, dtype=dtype, device=dev, **over)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    # RFT layout (Eq. 10): ctx + dyn0 shared by a group, each rollout's own a_0 ends its prompt
    prompt = torch.randint(4375, 8750, (G, P - 7), generator=g).to(dev)
    own_a0 = torch.randint(8750, 9006, (G * N, 7), generator=g).to(dev)
    full_prompts = torch.cat([prompt.repeat_interleave(N, 0), own_a0], 1)  # what every baseline row carries
    acts = torch.randint(8750, 9006, (G * N, T - 1, 7), generator=g).to(dev)
    sampling = dict(temperature=1.0, top_p=0.8)  # the release's serving settings
    step_fn = None
    sides = ["ours", "hf_kv_cached"]
    if cuda and not a.no_compile:
        step_fn = torch.compile(hf, mode="reduce-overhead", fullgraph=False)
        sides.append("hf_static_compiled")
    sides.append("hf_generate_per_frame")
    phases = {s: [] for s in sides}

    def run(side, frames=T, timed=True):
        ph = {} if timed and not cuda else None
        ac = acts[:, :frames - 1]
        gen = torch.Generator(device=dev).manual_seed(1)
        with nvtx_range(f"bench.{side}"), torch.no_grad():
            if side == "ours":
                engine_rollout(wm, prompt, ac, tokens_per_frame=Fr, num_samples=N, timings=ph, generator=gen,
                               row_prompt_ids=own_a0, **sampling)
            elif side == "hf_generate_per_frame":
                hf_frame_by_frame(hf, full_prompts, ac, Fr, cfg.num_codes, do_sample=True, timings=ph, **sampling)
            else:
                hf_kv_cached(hf, full_prompts, ac, Fr, cfg.num_codes, do_sample=True, generator=gen, timings=ph,
                             static=side == "hf_static_compiled", step_fn=step_fn, **sampling)
        if ph is not None:
            phases[side].append(ph)

    def timed(side):
        t0 = time.perf_counter()
        run(side)
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for s in sides:  # warm-up: first-call costs (weight packing, Triton/compile, CUDA graph capture, allocations)
        run(s, frames=1 if s == "hf_generate_per_frame" else T, timed=False)
    times = {s: [] for s in sides}
    t_start = time.perf_counter()
    with profiled(a.profile, dev):
        for i in range(max(a.repeats, 1)):
            for s in sides:
                if s == "hf_generate_per_frame" and times[s]:  # the slow one: within --budget-s after its first
                    left = a.budget_s - (time.perf_counter() - t_start) - (a.repeats - 1 - i) * sum(
                        max(times[o]) for o in sides if o != s)
                    if len(times[s]) >= a.baseline_repeats or left < max(times[s]):
                        continue
                times[s].append(timed(s))
    rollouts, frames = G * N, G * N * T

    def side_record(s):
        ts = times[s]
        med = statistics.median(ts)
        runs = [r for r in phases[s] if r]
        ph = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in sorted({k for r in runs for k in r})}
        return {"what": LABELS[s], "median_s": med, "min_s": min(ts), "times_s": ts, "repeats": len(ts),
                "rollouts_per_s": rollouts / med, "frames_per_s": frames / med, "tokens_per_s": frames * Fr / med,
                "phases_s": ph}

    res = {s: side_record(s) for s in sides}
    rec = {"bench": "wm_rollout", "device": device_name(dev), "preset": preset, "params": wm.num_params(),
           "dtype": str(dtype).split(".")[-1], "attn_backend": f"{cfg.attn_backend} -> {backend}", "groups": G,
           "samples": N, "frames": T, "tokens_per_frame": Fr, "prompt_len": P, "shared_prompt_len": P - 7,
           "sampling": sampling, "cuda_graph": cuda, "torch_threads": torch.get_num_threads(),
           "sides": res, "speedup_vs": {s: res[s]["median_s"] / res["ours"]["median_s"] for s in sides if s != "ours"},
           "bench_wall_s": time.perf_counter() - t_start, "profiled": bool(a.profile and cuda),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if a.repeats < 3 or len(times["hf_generate_per_frame"]) < 3:
        rec["repeats_note"] = "fewer than 3 repeats where --repeats/--budget-s capped them (each run is minutes on a CPU)"
    if not cuda:  # per sampled token: the whole rollout but its prefill
        ours = res["ours"]
        rec["decode_floor"] = cpu_floor(wm, cfg, G, N, P, T, Fr, (ours["median_s"] - ours["phases_s"].get("prefill_s", 0))
                                        / (T * Fr))
    if cuda:
        rec["decode"] = roofline(wm, cfg, G, N, P, T, Fr, dtype, dev, res["ours"]["median_s"], a.repeats,
                                 peak_gbps(rec["device"], a.peak_gbps))
    emit(rec, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
