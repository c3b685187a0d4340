"""Success rate of the privileged scripted expert (envs/libero_expert.py) per LIBERO task over the official
initial states, episodes in parallel worker processes, no rendering (the expert reads object poses).

    python bench/libero_expert.py [--suite libero_object] [--inits 50] [--workers 2]
        [--out bench/results/libero_expert_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--tasks", default="", help="comma-separated task indices (default: all)")
    ap.add_argument("--inits", type=int, default=50, help="official initial states per task (the first N)")
    ap.add_argument("--perturbation", default="none")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/libero_expert_cpu.json")
    a = ap.parse_args()
    from vla_rft_engine.envs.libero_env import resolve_tasks
    from vla_rft_engine.envs.libero_runner import run_parallel
    suite, ids = resolve_tasks(a.suite)
    if a.tasks:
        ids = [int(t) for t in a.tasks.split(",")]
    # seed s on a single-task env is initial state s % n_init
    jobs = [(f"{suite}/{t}", s, a.perturbation) for t in ids for s in range(a.inits)]
    t0 = time.time()
    res = run_parallel(jobs, workers=a.workers, desc=f"expert {suite}")
    wall = time.time() - t0
    per = {}
    for r in res:
        p = per.setdefault(r["task_name"], {"episodes": 0, "successes": 0, "steps": [], "failed_inits": []})
        p["episodes"] += 1
        p["successes"] += r["success"]
        p["steps"].append(r["steps"])
        if not r["success"]:
            p["failed_inits"].append(r["init_index"])
    for p in per.values():
        p["success_rate"] = p["successes"] / p["episodes"]
        p["mean_steps"] = sum(p["steps"]) / len(p["steps"])
        del p["steps"]
    steps = sum(r["steps"] for r in res)
    out = {"bench": "libero_expert", "suite": suite, "perturbation": a.perturbation,
           "initial_states_per_task": a.inits, "episodes": len(res),
           "success_rate": sum(r["success"] for r in res) / len(res), "per_task": per,
           "wall_s": wall, "workers": a.workers, "sim_steps": steps, "sim_steps_per_s": steps / wall,
           "rendering": "off (privileged state only)", "device": f"cpu:{platform.machine()} x{os.cpu_count()}"}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "per_task"}, indent=1))
    for name, p in per.items():
        print(f"{p['success_rate'] * 100:5.1f}%  {name}")


if __name__ == "__main__":
    main()
