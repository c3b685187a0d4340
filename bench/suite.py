"""Every bench in one command, one JSON per bench under bench/results/<device>/, and a table of the ratios.

    python bench/suite.py                 # GPU: the paper's shapes; CPU: reduced shapes (a few minutes)
    python bench/suite.py --full          # CPU: each bench's own CPU defaults (tens of minutes)
    python bench/suite.py --profile       # pass --profile to every bench (see README: Profiling)
    python bench/suite.py --only wm_rollout grpo_step

Each bench runs in its own process (a clean CUDA context and peak-memory count); a bench that fails is
reported in the table and the suite goes on. The table shows, per bench, its ratios against the baselines it
measured in the same run, and for the rollout the decode steps' fraction of the HBM roofline.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name  # noqa: E402

# bench -> (args on CUDA, args for the reduced CPU run)
BENCHES = {
    "wm_rollout": ([], ["--groups", "1", "--samples", "4", "--frames", "2", "--baseline-repeats", "1"]),
    "grpo_step": ([], ["--repeats", "2"]),
    "wm_action_cond": ([], ["--repeats", "3"]),
    "cpu_inference": ([], ["--repeats", "3"]),
    "sde_sampling": ([], ["--repeats", "5"]),
    "vq_decode": ([], ["--quick"]),
    "rewards": (["--hw", "256"], ["--repeats", "2"]),
    "policy_latency": ([], ["--repeats", "20", "--no-compile", "--server-requests", "50"]),
}
KEYS = ("speedup", "ratio", "roofline_fraction", "rollouts_per_s", "overhead")  # what the table shows, by key substring


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, list) and all(isinstance(e, dict) for e in v):  # a list of cases: keyed by their name
            v = {str(e.get("case", i)): e for i, e in enumerate(v)}
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def headline(rec: dict) -> str:
    items = [(k, v) for k, v in flat(rec).items() if any(s in k for s in KEYS)]
    return ", ".join(f"{k}={v:.3g}" for k, v in items) or "(no ratios)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    ap.add_argument("--full", action="store_true", help="CPU: each bench's own CPU defaults, not the reduced shapes")
    ap.add_argument("--profile", action="store_true", help="pass --profile to every bench")
    ap.add_argument("--out-dir", default=None, help="default: bench/results/<device>/")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per bench")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = device_name(torch.device("cuda" if cuda else "cpu"))
    name = "".join(c if c.isalnum() else "_" for c in dev.split(" x")[0]).strip("_").lower()
    out_dir = Path(a.out_dir or ROOT / "bench" / "results" / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, t_all = [], time.perf_counter()
    for bench in a.only or BENCHES:
        gpu_args, cpu_args = BENCHES[bench]
        args = gpu_args if cuda else ([] if a.full else cpu_args)
        out = out_dir / f"{bench}.json"
        cmd = [sys.executable, str(ROOT / "bench" / f"{bench}.py"), *args, "--out", str(out)]
        if a.profile:
            cmd.append("--profile")
        print(f"[suite] {bench}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout_s)
            ok = p.returncode == 0 and out.is_file()
            why = "" if ok else (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, f"timed out after {a.timeout_s:.0f} s"
        wall = time.perf_counter() - t0
        rows.append((bench, wall, headline(json.loads(out.read_text())) if ok else f"FAILED: {why}"))
        print(f"[suite] {bench}: {wall:.0f} s", flush=True)
    print(f"\nbench results on {dev} -> {out_dir} (total {time.perf_counter() - t_all:.0f} s)")
    print("| bench | wall s | ratios (same run) |\n|---|---|---|")
    for bench, wall, txt in rows:
        print(f"| {bench} | {wall:.0f} | {txt} |")
    return 0 if all(not t.startswith("FAILED") for *_, t in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
