"""World-model rollout throughput: our engine vs the authors' protocol (transformers generate per frame,
whole prefix re-sent), same weights, same batch, same run. One JSON record.

    python bench/wm_rollout.py           # CPU: small preset, the built-in pipeline's RFT shape
    python bench/wm_rollout.py           # GPU: paper preset, bf16, triton, the paper's RFT shape

Defaults by device (every one can be changed by its flag):
  CPU  small preset, fp32, eager backend (the CPU decode path), 2 start states x 17 rollouts (16 sampled
       + 1 reference, as in RFT), 8 frames of 64 tokens, 327-token prompt = the built-in tokenizer's layout
       (256 context + 64 dynamics shared by a group + each rollout's own 7 a_0 tokens, Eq. 10). 2 start states, not 16: the baseline alone runs
       minutes at this size on one core; --budget-s caps the baseline's repeats to keep the run short.
  CUDA paper preset, bf16, triton, 16 start states x 17 rollouts, 8 frames, 1095-token prompt (paper layout:
       1088 shared + 7 own). The baseline re-sends each rollout's whole 1095-token prompt per frame.
Rollouts/s counts one (start state, sample) rollout of `frames` frames. Both sides report a phase
breakdown: ours prefill / sampling / decode steps / action steps, the baseline prefill (the re-sent prefix,
per frame) / decode (read off the logits processor's first call in each generate). On CUDA the record also gives the
decode steps' achieved fraction of the HBM roofline: (weight bytes + KV bytes read per step) / step time
/ peak bandwidth, peak from a table by device name (or --peak-gbps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import device_name, emit, time_fn  # noqa: E402

PEAK_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
             "A800": 2039, "RTX 4090": 1008, "L40S": 864, "L4": 300}


def peak_gbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, v in PEAK_GBPS.items():  # ordered: specific names before their families
        if key in name:
            return v
    return None


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
    ap.add_argument("--backend", default=None, help="triton | sdpa | flash | eager (default triton on CUDA, eager on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=2, help="at most; see --budget-s")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip further baseline repeats once another would end the bench past this many seconds")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for both sides (1: on a shared CPU, 2 threads spin against each other)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    from vla_rft_engine.engine.hf_protocol import hf_frame_by_frame
    from vla_rft_engine.engine.rollout import rollout as engine_rollout
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    from vla_rft_engine.utils import nvtx_range

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device))
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if cuda else "fp32")]
    backend = a.backend or ("triton" if cuda else "eager")
    if a.prompt_len:
        P = a.prompt_len
    elif cuda:
        P = 1095
    else:
        from vla_rft_engine.models.tokenizer import TokenizerConfig
        P = TokenizerConfig().layout().prompt_tokens
    preset = a.preset or ("paper" if cuda else "small")
    G, N, T, Fr = a.groups or (16 if cuda else 2), a.samples, a.frames, a.tokens_per_frame
    cfg = WorldModelConfig.preset(preset, attn_backend=backend, max_position=max(8192, P + T * 71 + 64))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:  # same weights for both sides, through the HF format
        init_weights(WorldModel(cfg), std=0.02).save_pretrained(d)
        wm = WorldModel.from_pretrained(d, dtype=dtype, device=dev, attn_backend=backend)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    # RFT layout (Eq. 10): ctx + dyn0 shared by a group, each rollout's own a_0 ends its prompt
    prompt = torch.randint(4375, 8750, (G, P - 7), generator=g).to(dev)
    own_a0 = torch.randint(8750, 9006, (G * N, 7), generator=g).to(dev)
    full_prompts = torch.cat([prompt.repeat_interleave(N, 0), own_a0], 1)  # what the per-frame protocol re-sends
    acts = torch.randint(8750, 9006, (G * N, T - 1, 7), generator=g).to(dev)
    sampling = dict(temperature=1.0, top_p=0.8)  # the release's serving settings

    phases_ours, phases_auth = [], []

    def ours():
        phases_ours.append({})
        with nvtx_range("bench.ours"):
            engine_rollout(wm, prompt, acts, tokens_per_frame=Fr, num_samples=N, timings=None if cuda else phases_ours[-1],
                           generator=torch.Generator(device=dev).manual_seed(1), row_prompt_ids=own_a0, **sampling)

    def authors():
        phases_auth.append({})
        with nvtx_range("bench.authors"):
            with torch.no_grad():
                hf_frame_by_frame(hf, full_prompts, acts, Fr, cfg.num_codes, num_samples=1, do_sample=True,
                                  timings=phases_auth[-1], **sampling)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    # warm-up: ours on one frame (weights packing, first-call costs); the baseline only on CUDA, on the CPU it
    # is too slow to run for nothing. Then the sides alternate, so a load change on a shared machine hits both.
    engine_rollout(wm, prompt, acts[:, :0], tokens_per_frame=Fr, num_samples=N, row_prompt_ids=own_a0, **sampling)
    if cuda:
        timed(authors)
        phases_auth.clear()
    t_start = time.perf_counter()
    mine, theirs = [], []
    for i in range(max(a.repeats, 1)):
        mine.append(timed(ours))
        left = a.budget_s - (time.perf_counter() - t_start) - (a.repeats - 1 - i) * max(mine)
        if len(theirs) < max(1, a.baseline_repeats) and (not theirs or left > max(theirs)):
            theirs.append(timed(authors))  # the first always runs; later ones only within --budget-s
    t_ours = {"median_s": statistics.median(mine), "min_s": min(mine), "times_s": mine}
    t_auth = {"median_s": statistics.median(theirs), "min_s": min(theirs), "times_s": theirs}

    def phase_medians(runs):
        runs = [r for r in runs if r]
        return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in sorted({k for r in runs for k in r})}
    rollouts, frames = G * N, G * N * T
    tokens = frames * Fr

    def rates(t):
        return {"rollouts_per_s": rollouts / t, "frames_per_s": frames / t, "tokens_per_s": tokens / t}

    rec = {"bench": "wm_rollout", "device": device_name(dev), "preset": preset, "params": wm.num_params(),
           "dtype": str(dtype).split(".")[-1], "backend": backend, "groups": G, "samples": N, "frames": T,
           "tokens_per_frame": Fr, "prompt_len": P, "sampling": sampling, "cuda_graph": cuda,
           "cpu_decode_path": not cuda and backend in ("eager", "sdpa"),
           "ours": {**t_ours, **rates(t_ours["median_s"])}, "authors_protocol": {**t_auth, **rates(t_auth["median_s"])},
           "speedup": t_auth["median_s"] / t_ours["median_s"], "torch_threads": torch.get_num_threads(),
           "phases_s": {"ours": phase_medians(phases_ours), "authors_protocol": phase_medians(phases_auth)},
           "bench_wall_s": time.perf_counter() - t_start,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cuda:  # decode-step roofline: time of the decode phase / number of decode steps
        from vla_rft_engine.engine.kv_cache import RolloutCache

        def prefill():
            c = RolloutCache(cfg, G, N, P, T * Fr + (T - 1) * 7, dtype, dev, backend)
            with torch.no_grad():
                wm.hidden(prompt, torch.arange(P, device=dev).expand(G, P), c)
        t_pre = time_fn(prefill, repeats=a.repeats, warmup=1, device=dev)["median_s"]
        steps = T * Fr - 1
        step_s = max(t_ours["median_s"] - t_pre, 1e-9) / steps
        el = torch.finfo(dtype).bits // 8
        w_bytes = (wm.num_params() - wm.tok_embeddings.weight.numel()) * el
        kv_prefix = cfg.n_layer * G * cfg.n_kv_head * P * cfg.head_dim * 2 * el
        kv_suffix_avg = cfg.n_layer * G * N * cfg.n_kv_head * (T * (Fr + 7) / 2) * cfg.head_dim * 2 * el
        bytes_step = w_bytes + kv_prefix + kv_suffix_avg
        peak = peak_gbps(rec["device"], a.peak_gbps)
        rec["decode"] = {"prefill_s": t_pre, "step_s": step_s, "bytes_per_step": bytes_step, "peak_gbps": peak,
                         "achieved_gbps": bytes_step / step_s / 1e9,
                         "roofline_fraction": (bytes_step / step_s / 1e9 / peak) if peak else None}
    emit(rec, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
