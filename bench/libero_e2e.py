"""The whole method on one LIBERO-Object task at small sizes, end to end on this machine, each stage timed:
scripted-expert demos (official HDF5 layout) -> pretrain-tokenizer -> pretrain-wm -> sft -> rft -> vla-rft eval
(standard and the paper's object perturbations, Table 3: 2.5 / 5 cm). One JSON record, plus the eval's table
and a frame strip copied beside it.

    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa python bench/libero_e2e.py [--out-dir runs/libero_e2e]
        [--result bench/results/libero_object_e2e_cpu]

Stages whose output exists are skipped (their earlier time is kept), so a killed run resumes. Demos come from
official initial states the evaluation does not use (demo_inits vs the first eval_inits), so every eval episode
starts from a state no demo started from. The sizes are a pipeline check, not the paper's: expect ~0 %.
On a shared or busy CPU run it with OMP_NUM_THREADS=1: torch's spinning threads on oversubscribed cores made
the tokenizer 10x slower here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

TASK = "libero_object/0"  # pick up the alphabet soup and place it in the basket (expert: 50/50 inits)
SIZES: dict[str, Any] = {"image_size": 64, "demo_inits": list(range(24, 50)), "eval_inits": 12, "eval_max_steps": 160,
         "tokenizer_steps": 300, "wm_steps": 400, "sft_steps": 400, "rft_steps": 20, "workers": 2}
SETTINGS = ["none", "object_minor", "object_major"]


def gain_interval(successful: dict, successful_sft: dict, inits: int) -> dict:
    """RFT - SFT success (points) with evaluation.paired_bootstrap's 95% interval: both policies ran the same
    official initial states 0..inits-1 in every setting, so episodes pair by (setting, initial state)."""
    from vla_rft_engine.evaluation import paired_bootstrap
    recs = [{"policy": name, "setting": st, "seed": 0, "outcomes": [int(i in ok[st]) for i in range(inits)]}
            for name, ok in (("rft_seed0", successful), ("sft", successful_sft)) for st in ok]
    return paired_bootstrap(recs, list(successful), [0])


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "vla_rft_engine.cli", *args]
    print("$ vla-rft " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def make_demos(out: Path, sz: dict) -> dict:
    from vla_rft_engine.data.libero_hdf5 import save_libero_hdf5
    from vla_rft_engine.envs.libero_expert import demos_from_episodes
    from vla_rft_engine.envs.libero_runner import run_parallel
    jobs = [(TASK, s, "none") for s in sz["demo_inits"]]
    eps = run_parallel(jobs, workers=sz["workers"], image_size=sz["image_size"], record=True, desc="expert demos")
    ok = [e for e in eps if e["success"]]  # failed expert episodes are not demonstrations
    demos = demos_from_episodes(ok)
    name = eps[0]["task_name"]
    save_libero_hdf5(demos, out / "demos" / f"{name}_demo.hdf5")
    return {"episodes": len(eps), "successful": len(ok), "mean_steps": float(sum(len(e["actions"]) for e in ok) / len(ok))}


def stages(out: Path, sz: dict) -> list[tuple[str, Path, object]]:
    demos, tok, wm, sft, rft, ev = (out / n for n in ("demos", "tokenizer", "wm", "sft", "rft", "eval"))
    return [
        ("demos", demos, lambda: make_demos(out, sz)),
        ("pretrain-tokenizer", tok / "tokenizer.safetensors",
         lambda: cli("pretrain-tokenizer", f"data={demos}", f"out_dir={tok}", f"steps={sz['tokenizer_steps']}",
                     "eval_every=100", "eval_pairs=32", f"model.image_size={sz['image_size']}")),
        ("pretrain-wm", wm / "world_model",
         lambda: cli("pretrain-wm", f"demos={demos}", f"tokenizer={tok}", f"out_dir={wm}", "preset=tiny",
                     f"steps={sz['wm_steps']}", "batch_size=8", "lr=2e-3", "change_weight=5", "progress=false")),
        ("sft", sft / "policy.safetensors",
         lambda: cli("sft", f"data={demos}", f"out_dir={sft}", f"steps={sz['sft_steps']}", f"image_size={sz['image_size']}",
                     "eval_every=200", "progress=false")),
        ("rft", rft / "policy.safetensors",
         lambda: cli("rft", f"world_model={wm / 'world_model'}", f"policy={sft / 'ckpt.pt'}", f"demos={demos}",
                     f"out_dir={rft}", f"grpo.steps={sz['rft_steps']}", "grpo.task_instances=4", "grpo.rollouts=8",
                     "grpo.warmup_steps=2", "states_per_block=4", "reward.allow_l1_only_fallback=true",
                     "ckpt_every=10", "image_every=10", "progress=false")),
        ("eval", ev / "results.json", lambda: evaluate(rft, ev, sz)),
        # the SFT checkpoint RFT started from, on the same episodes: what RFT changed
        ("eval_sft", out / "eval_sft" / "results.json", lambda: evaluate(sft, out / "eval_sft", sz)),
    ]


def evaluate(policy: Path, out: Path, sz: dict) -> None:
    cli("eval", f"policy={policy}", f"suite={TASK.split('/')[0]}", f"tasks=[{TASK.split('/')[1]}]",
        f"settings=[{','.join(SETTINGS)}]", f"inits={sz['eval_inits']}", f"workers={sz['workers']}",
        f"image_size={sz['image_size']}", f"max_steps={sz['eval_max_steps']}", f"out_dir={out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="runs/libero_e2e")
    ap.add_argument("--result", default="bench/results/libero_object_e2e_cpu")
    a = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
    out = (ROOT / a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "e2e_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"stage_s": {}, "info": {}}
    for name, marker, run in stages(out, SIZES):
        if name in state["stage_s"] and marker.exists():
            print(f"[{name}] done before ({state['stage_s'][name]:.0f} s)", flush=True)
            continue
        t0 = time.time()
        info = run()  # type: ignore[operator]
        state["stage_s"][name] = round(time.time() - t0, 1)
        if isinstance(info, dict):
            state["info"][name] = info
        state_path.write_text(json.dumps(state, indent=1))
        print(f"[{name}] {state['stage_s'][name]:.0f} s", flush=True)
    res = json.loads((out / "eval" / "results.json").read_text())
    res_sft = json.loads((out / "eval_sft" / "results.json").read_text())
    import torch
    from vla_rft_engine.utils import read_jsonl
    rows = [r for r in read_jsonl(out / "rft" / "metrics.jsonl") if "reward/mean" in r]
    record = {"bench": "libero_e2e", "task": TASK, "task_name": res["task_names"][0],
              "device": f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} cores, torch "
                        f"{torch.__version__}, MUJOCO_GL={os.environ['MUJOCO_GL']}",
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "sizes": SIZES, "stage_s": state["stage_s"],
              "pipeline_s": round(sum(v for k, v in state["stage_s"].items() if k != "eval_sft"), 1),
              "demos": state["info"].get("demos"),
              "success_pct": {st: v["success"] for st, v in res["table"].items()},
              "success_pct_sft": {st: v["success"] for st, v in res_sft["table"].items()},
              "successful_inits": {st: [r["init_index"] for r in res["records"] if r["perturbation"] == st and r["success"]]
                                   for st in res["table"]},
              "successful_inits_sft": {st: [r["init_index"] for r in res_sft["records"]
                                            if r["perturbation"] == st and r["success"]] for st in res_sft["table"]},
              "episodes_per_setting": {st: v["episodes"] for st, v in res["table"].items()},
              "rft_minus_sft_points": None,  # filled below from the two successful_inits
              "tokenizer_heldout_psnr": json.loads((out / "tokenizer" / "eval.json").read_text()).get("psnr"),
              "rft_reward_mean_first_last": [rows[0].get("reward/mean"), rows[-1].get("reward/mean")] if rows else None,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other jobs on the machine slow stages
              "eval_init_states": f"official initial states 0..{SIZES['eval_inits'] - 1}; demos from "
                                  f"{SIZES['demo_inits'][0]}..{SIZES['demo_inits'][-1]}"}
    record["rft_minus_sft_points"] = gain_interval(record["successful_inits"], record["successful_inits_sft"],
                                                   SIZES["eval_inits"])
    dest = ROOT / a.result
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".json").write_text(json.dumps(record, indent=1))
    md = (out / "eval" / "results.md").read_text() + "\n## The SFT checkpoint RFT started from\n\n" + \
        (out / "eval_sft" / "results.md").read_text()
    dest.with_suffix(".md").write_text(md.replace(str(ROOT) + "/", ""))
    shutil.copy(out / "eval" / "episodes.png", dest.with_name(dest.name + "_episodes.png"))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
