"""One full RFT step (rl/rft.py RFTRun.step) by phase: encode, sde, wm_rollout (imagine: rollout + decode), reward, update.
Median over repeats of each phase's wall time, peak memory (CUDA: per phase; CPU: process peak RSS), NVTX
ranges `rft.<phase>` around every phase (visible under Nsight). One JSON record.

    python bench/grpo_step.py                    # CUDA: the paper shape; CPU: a small shape
    python bench/grpo_step.py --out bench/results/grpo_step_cpu.json

Shapes (random weights: the timing does not depend on training):
  paper (CUDA default) 16 start states x 16 rollouts (+1 reference each, one WM call: states_per_block=16),
        8-action chunks -> 8 frames, 138M WM in bf16 (Table 5), 256x256 tokenizer with the authors' layout
        (1024 context + 64 dynamics tokens, FSQ 7,5,5,5,5 -> vocab 9008), AlexNet LPIPS (random backbone),
        the small policy encoder (the HF VLM encoder runs once per start state and is not what this measures)
  small (CPU default) 2 x 4 rollouts, 4-action chunks, tiny WM, 32x32 tokenizer, LPIPS on 32x32 frames
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels

from bench.common import device_name, emit, parse_args, profiled  # noqa: E402

SHAPES = {
    "paper": dict(S=16, N=16, chunk=8, image=256, tok_channels=[32, 64, 128, 128], levels=[7, 5, 5, 5, 5],
                  dyn_patch=4, wm="paper", block=16, episodes=4, ep_steps=24),
    "small": dict(S=2, N=4, chunk=4, image=32, tok_channels=[8, 16, 16], levels=[4, 4], dyn_patch=2, wm="tiny",
                  block=2, episodes=2, ep_steps=12),
}


def build_run(shape: dict, device: torch.device, wm_dtype: torch.dtype, lpips: bool, seed: int = 0):
    from vla_rft_engine.config import load_config
    from vla_rft_engine.layout import ActionDiscretizer
    from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy
    from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
    from vla_rft_engine.models.world import LearnedWorld
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    from vla_rft_engine import distributed as du
    from vla_rft_engine.rl.lpips import LPIPS
    from vla_rft_engine.rl.rft import RFTConfig, RFTRun
    from vla_rft_engine.rl.rft_data import StartStates
    from vla_rft_engine.train.sft import synthetic_demos
    torch.manual_seed(seed)
    ch = shape["tok_channels"]
    tok = VisualTokenizer(TokenizerConfig(image_size=shape["image"], downsample=2 ** (len(ch) - 1), channels=ch,
                                          latent_channels=ch[-1], dyn_patch=shape["dyn_patch"],
                                          levels=shape["levels"])).to(device).eval()
    lay = tok.layout
    prompt_plus_rollout = lay.prompt_tokens + shape["chunk"] * lay.frame_step_tokens
    wcfg = WorldModelConfig.preset(shape["wm"], vocab_size=lay.vocab_size, num_codes=lay.num_codes,
                                   max_position=max(2048, prompt_plus_rollout))  # production default backend
    wm = init_weights(WorldModel(wcfg), std=0.02).to(device=device, dtype=wm_dtype).eval()
    demos = synthetic_demos(shape["episodes"], steps=shape["ep_steps"], image_size=shape["image"], seed=seed)
    acts = torch.as_tensor(demos["actions"])
    policy = VLAPolicy(PolicyConfig(chunk_len=shape["chunk"]))
    policy.set_norm_stats(acts, torch.as_tensor(demos["proprio"]))
    policy.to(device)
    cfg = load_config(RFTConfig, None, [f"grpo.task_instances={shape['S']}", f"grpo.rollouts={shape['N']}",
                                        f"states_per_block={shape['block']}", "reward.lambda_lp=" + ("1" if lpips else "0")])
    d = du.Dist(device=device)
    lp = LPIPS("alex").to(device) if lpips else None  # random backbone: same cost as the ImageNet one
    pool = StartStates(demos, shape["chunk"], shape["image"])
    world = LearnedWorld(tok, wm, ActionDiscretizer.from_dataset(acts))
    return RFTRun(cfg, d, policy, world, pool, lp), wm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: paper on CUDA, small on CPU")
    ap.add_argument("--states", type=int, default=None, help="override S (start states)")
    ap.add_argument("--rollouts", type=int, default=None, help="override N (rollouts per start state)")
    ap.add_argument("--block", type=int, default=None, help="override states_per_block (start states per WM call)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-lpips", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--out", default=None)
    a = parse_args(ap, argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    name = a.shape or ("paper" if dev.type == "cuda" else "small")
    shape = dict(SHAPES[name])
    for key, val in (("S", a.states), ("N", a.rollouts), ("block", a.block)):
        if val is not None:
            shape[key] = val
    from vla_rft_engine.engine.attention import resolve_backend
    wm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    run, wm = build_run(shape, dev, wm_dtype, lpips=not a.no_lpips)
    run.cfg.profile = True  # per-phase times (syncs around each phase, as `vla-rft rft profile=true`)
    run.phase_mem = {}
    for i in range(a.warmup):
        run.step(i)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with profiled(a.profile, dev):
        records = [run.step(a.warmup + i)[0] for i in range(a.repeats)]
    keys = [k for k in records[0] if k.startswith("time/")]
    lay, M = run.world.layout, run.cfg.noise_rows
    rec = {"bench": "grpo_step", "device": device_name(dev), "shape": name, "start_states": shape["S"],
           "rollouts": shape["N"], "wm_samples_per_state": shape["N"] + M + 1, "noise_rows": M,
           "states_per_block": shape["block"], "frames": shape["chunk"], "tokens_per_frame": lay.dynamics_tokens,
           "shared_prompt_tokens": lay.context_tokens + lay.dynamics_tokens, "own_prompt_tokens": lay.action_dim,
           "image_size": shape["image"], "wm_params": wm.num_params(), "wm_dtype": str(wm_dtype).split(".")[-1],
           "wm_attn_backend": f"{wm.config.attn_backend} -> {resolve_backend(wm.config.attn_backend, dev)}",
           "lpips": "alex (random backbone)" if not a.no_lpips else "off",
           "repeats": a.repeats, "median_s": {k[5:]: statistics.median(r[k] for r in records) for k in keys},
           "all_s": {k[5:]: [r[k] for r in records] for k in keys}}
    st = rec["median_s"]["step"]
    rec["rollouts_per_s"] = shape["S"] * (shape["N"] + M + 1) / st
    if dev.type == "cuda":
        rec["peak_mem_gib"] = {k: v / 2**30 for k, v in run.phase_mem.items()}
        rec["peak_mem_gib"]["step"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        rec["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rec["threads"] = torch.get_num_threads()
    emit(rec, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
