"""Verified-reward throughput (Eq. 11, LPIPS + L1): our LPIPS vs the `lpips` package, same run, same frames.

Shape: the paper's RFT step, 16 start states x 17 rollouts (16 policy + 1 reference rollout of the dataset
actions, design R3) x 8 frames, at 64x64 here (--hw 256 on the GPU). Variants, median of repeats, each in an
NVTX range:
  ours          verified_reward(r3): range checks, L1, LPIPS with the reference's features computed once per
                start state (17 x 8 backbone passes per start state instead of 32 x 8)
  ours_pairs    our LPIPS on the reference expanded to every pair (no feature sharing) + L1: isolates the
                implementation from the sharing
  lpips_pkg     lpips.LPIPS on the same expanded pairs + the same L1 (how a reward is usually written)
On CUDA ours runs channels-last with bf16 autocast; the package runs as shipped (fp32).
Weights: --weights pnet_rand (seeded random backbone + the package's shipped heads; no files needed) or
pretrained (torchvision backbone file in $TORCH_HOME/hub/checkpoints).

    python bench/rewards.py [--out bench/results/rewards_cpu.json] [--repeats 5] [--hw 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name, emit, parse_args, time_fn  # noqa: E402

S, ROLLOUTS, T = 16, 17, 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--hw", type=int, default=64, help="frame size (64 on the CPU; 256 is the GPU option)")
    ap.add_argument("--net", default="alex", choices=["alex", "vgg"])
    ap.add_argument("--weights", default="pnet_rand", choices=["pnet_rand", "pretrained"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(ap, argv)
    import lpips

    from vla_rft_engine.rl.lpips import LPIPS, get_lpips
    from vla_rft_engine.rl.rewards import RewardConfig, verified_reward
    from vla_rft_engine.utils import nvtx_range

    dev = torch.device(args.device)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = lpips.LPIPS(net=args.net, pretrained=True, pnet_rand=args.weights == "pnet_rand", verbose=False)
    pkg = pkg.eval().to(dev)
    if args.weights == "pnet_rand":
        ours = LPIPS(args.net).load_weights(pkg.state_dict()).to(dev)
        ours = ours.to_channels_last() if dev.type == "cuda" else ours
    else:
        ours = get_lpips(args.net, dev)

    n_pol, hw = ROLLOUTS - 1, args.hw
    g = torch.Generator(device="cpu").manual_seed(0)
    ref = torch.rand(S, 1, T, 3, hw, hw, generator=g)
    pol = (ref + 0.1 * torch.randn(S, n_pol, T, 3, hw, hw, generator=g)).clamp(0, 1)
    ref, pol = ref.to(dev), pol.to(dev)
    cfg = RewardConfig(design="r3", lpips_net=args.net)

    def run_ours():
        with nvtx_range("reward_ours"):
            return verified_reward(cfg, policy_frames=pol, wm_reference_frames=ref, lpips_model=ours)

    def l1(x, y):
        return (x - y).abs().flatten(-3).mean(-1)

    @torch.no_grad()
    def run_ours_pairs():
        with nvtx_range("reward_ours_pairs"):
            y = ref.expand_as(pol)
            d = l1(pol, y) + ours(pol, y.contiguous(), zero_one=True)
            return -d.sum(-1)

    @torch.no_grad()
    def run_pkg():
        with nvtx_range("reward_lpips_pkg"):
            x = pol.reshape(-1, 3, hw, hw)
            y = ref.expand_as(pol).reshape(-1, 3, hw, hw)
            lp = pkg(x, y, normalize=True).reshape(S, n_pol, T)
            return -(l1(pol, ref) + lp).sum(-1)

    r_ours, r_pairs, r_pkg = run_ours(), run_ours_pairs(), run_pkg()
    diff = float((r_ours - r_pkg).abs().max())
    diff_pairs = float((r_pairs - r_pkg).abs().max())

    pairs = S * n_pol * T
    res = {}
    for name, fn in (("ours", run_ours), ("ours_pairs", run_ours_pairs), ("lpips_pkg", run_pkg)):
        t = time_fn(fn, repeats=args.repeats, warmup=args.warmup, device=dev)
        t["frame_pairs_per_s"] = pairs / t["median_s"]
        res[name] = t
    rec = {
        "bench": "rewards",
        "device": device_name(dev),
        "torch": torch.__version__,
        "shape": {"start_states": S, "rollouts": ROLLOUTS, "policy_rollouts": n_pol, "frames": T, "hw": hw,
                  "frame_pairs": pairs},
        "net": args.net, "weights": args.weights, "repeats": args.repeats,
        "ours_precision": "bf16 autocast, channels-last" if dev.type == "cuda" else "fp32",
        "variants": res,
        "ratio_pkg_over_ours": res["lpips_pkg"]["median_s"] / res["ours"]["median_s"],
        "ratio_pkg_over_ours_pairs": res["lpips_pkg"]["median_s"] / res["ours_pairs"]["median_s"],
        "max_abs_reward_diff_vs_pkg": {"ours": diff, "ours_pairs": diff_pairs},
    }
    emit(rec, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
