"""vq_decode: the C++/CUDA extension vs the PyTorch reference at VLA-RFT decode shapes; one JSON record.

    python bench/vq_decode.py                        # CPU (and CUDA when available)
    python bench/vq_decode.py --out bench/results/vq_decode_cpu.json --device cpu

Cases (FSQ levels 7,5,5,5,5 = 4375 codes):
  dyn_*: dynamics tokens, 8x8 per frame, patch 4 -> 32x32 latent. The full RFT step decodes
         16 start states x 17 rollouts (16 policy + 1 reference) x 8 frames = 2176 frames.
  ctx_*: context tokens, 32x32 per frame, patch 1 (1x1 conv), one frame per start state.
ratio = extension median / reference median (below 1: the extension is faster).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name, emit, parse_args, time_fn  # noqa: E402
from vla_rft_engine.ops import vq_decode as vqd  # noqa: E402
from vla_rft_engine.utils import nvtx_range  # noqa: E402

LEVELS = (7, 5, 5, 5, 5)
NCODES = math.prod(LEVELS)


def cases(quick: bool):
    # (name, frames, grid, patch, channels)
    full = [
        ("dyn_rft_step_c64", 16 * 17 * 8, (8, 8), 4, 64),
        ("dyn_one_state_c256", 17 * 8, (8, 8), 4, 256),
        ("ctx_c64", 16 * 17, (32, 32), 1, 64),
        ("ctx_c256", 16, (32, 32), 1, 256),
    ]
    if quick:
        return [(n, max(1, f // 16), g, p, c) for n, f, g, p, c in full]
    return full


def run_case(name, frames, grid, patch, C, device, dtype, repeats):
    gh, gw = grid
    ids = torch.randint(0, NCODES, (frames, gh * gw), device=device)
    w = (torch.randn(C * patch * patch, len(LEVELS), device=device) / math.sqrt(len(LEVELS))).to(dtype)
    b = torch.randn(C * patch * patch, device=device).to(dtype)
    kind = "cuda" if device.type == "cuda" else "cpu"
    ext = vqd._load_ext(kind)
    if ext is None:
        raise SystemExit(f"_vq_{kind} is not built ({vqd.extension_available(kind)[1]}); run .ci/build_ext.sh")
    lv = list(LEVELS)

    def f_ext():
        with nvtx_range(f"vq_decode/ext/{name}"):
            return ext.decode(ids, w, b, gh, gw, patch, lv, None)

    def f_ref():
        with nvtx_range(f"vq_decode/ref/{name}"):
            return vqd.vq_decode_reference(ids, w, b, grid, patch, LEVELS)

    err = (f_ext().float() - f_ref().float()).abs().max().item()  # also a warm-up
    t_ext = time_fn(f_ext, repeats=repeats, warmup=1, device=device)
    t_ref = time_fn(f_ref, repeats=repeats, warmup=1, device=device)
    out_bytes = frames * C * gh * patch * gw * patch * torch.tensor([], dtype=dtype).element_size()
    return {
        "case": name, "ids": [frames, gh * gw], "grid": [gh, gw], "patch": patch, "channels": C,
        "out_shape": [frames, C, gh * patch, gw * patch], "out_MB": round(out_bytes / 2**20, 1),
        "ext_median_s": t_ext["median_s"], "ref_median_s": t_ref["median_s"],
        "ext_min_s": t_ext["min_s"], "ref_min_s": t_ref["min_s"],
        "ratio_ext_over_ref": t_ext["median_s"] / t_ref["median_s"],
        "ext_GBps": out_bytes / t_ext["median_s"] / 1e9, "max_abs_err": err,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU, plus CUDA when available")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="1/16 of the frames (smoke run)")
    ap.add_argument("--out", default=None, help="also write the JSON record here")
    args = parse_args(ap, argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    devs = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devs.append(torch.device("cuda"))
    results = {}
    for dev in devs:
        with torch.inference_mode():
            rows = [run_case(*c, device=dev, dtype=dtype, repeats=args.repeats) for c in cases(args.quick)]
        results[dev.type] = {"device": device_name(dev), "cases": rows}
    emit({
        "bench": "vq_decode", "dtype": args.dtype, "levels": list(LEVELS), "torch": torch.__version__,
        "repeats": args.repeats, "quick": args.quick,
        "host_loadavg_1m": os.getloadavg()[0],  # shared dev machine: other jobs inflate both medians
        "note": "ratio_ext_over_ref = extension median / PyTorch reference median (< 1: extension faster)",
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()
