"""`vla-rft eval`: a policy checkpoint in LIBERO over the official initial states and the paper's perturbation
suites, episodes in parallel worker processes (envs/libero_runner.py).

    vla-rft eval policy=runs/rft suite=libero_object                       # 10 tasks x 50 inits x 3 settings
    vla-rft eval policy=runs/sft/policy.safetensors suite=libero_goal tasks=[0,3] inits=10 settings=[none]

Writes out_dir/results.json (success per setting and task, every episode), results.md (a row in the layout of
the paper's Table 2, success % per suite, and of Table 3, per perturbation setting, minor and major, plus the
per-task numbers) and episodes.png (frame strips of the first episodes of each setting).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ConfigError, UserError, parse_command, to_dict
from .eval_config import EvalConfig

SUITE_COLUMNS = {"libero_spatial": "Spatial", "libero_object": "Object", "libero_goal": "Goal", "libero_10": "Long"}
FAMILIES = [("object", "Object"), ("goal", "Goal"), ("robot", "Robot"), ("all", "All")]  # Table 3's columns
DEFAULT_IMAGE_SIZE = 128
ACTION_DIM = 7  # LIBERO: 6-D OSC deltas + gripper (envs.tabletop.check_action, which the LIBERO env shares)


def check_policy(path: str, image_size: int) -> tuple[int, dict]:
    """Load the policy once here (a bad file is a one-line error before any worker starts) -> (the frame size
    to run at, what to report about it)."""
    from .envs.libero_env import PROPRIO_DIM
    from .train.sft import load_policy
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"policy not found at {p}; train one with vla-rft sft (or rft) and pass its out_dir")
    pol = load_policy(p)
    c = pol.cfg
    if c.action_dim != ACTION_DIM or c.proprio_dim != PROPRIO_DIM:
        raise UserError(f"policy {p} takes {c.proprio_dim}-D proprio and outputs {c.action_dim}-D actions; LIBERO "
                        f"needs {PROPRIO_DIM}-D proprio and {ACTION_DIM}-D actions (train it on LIBERO demos)")
    trained = pol.image_size
    if image_size and trained and image_size != trained:
        raise UserError(f"policy {p} was trained on {trained}px frames, image_size={image_size} asked; use "
                        f"image_size={trained} (or 0: the policy's own)")
    size = image_size or trained or DEFAULT_IMAGE_SIZE
    return size, {"chunk_len": c.chunk_len, "trained_image_size": trained, "encoder": c.encoder}


def resolve(cfg: EvalConfig) -> tuple[str, list[int]]:
    """The suite and the task indices, a bad task being a one-line error naming the valid ones."""
    from .envs.libero_env import resolve_tasks
    try:
        suite, ids = resolve_tasks(cfg.suite)
    except ImportError as e:
        raise UserError(str(e)) from None
    if not cfg.tasks:
        return suite, ids
    out = []
    for t in cfg.tasks:
        try:
            out += resolve_tasks(f"{suite}/{t}")[1]
        except ValueError as e:
            raise ConfigError(f"tasks: {e}") from None
    return suite, out


def markdown(res: dict) -> str:
    """Table 2's layout (a row, success % per suite) and Table 3's (per perturbation, minor / major)."""
    t, name = res["table"], res["policy_name"]
    std = t.get("none")
    row2 = [f"{std['success']:.1f}" if std and SUITE_COLUMNS[res["suite"]] == col else "–" for col in SUITE_COLUMNS.values()]
    lines = [f"Policy `{res['policy']}` in LIBERO `{res['suite']}`, tasks {res['task_indices']}, official initial "
             f"states 0..{res['initial_states'] - 1} per task and setting, {res['image_size']}px frames, at most "
             f"{res['max_steps']} steps per episode.", "",
             "Success rate (%), standard setting (layout of the paper's Table 2):", "",
             "| Policy | " + " | ".join(SUITE_COLUMNS.values()) + " |", "|---" * 5 + "|",
             f"| {name} | " + " | ".join(row2) + " |", ""]
    pert = [s for s in t if s != "none"]
    if pert:
        cols = [(f, lab) for f, lab in FAMILIES if f"{f}_minor" in t or f"{f}_major" in t]
        head = " | ".join(f"{lab} minor | {lab} major" for _, lab in cols)
        cell = [f"{t[f'{f}_{m}']['success']:.1f}" if f"{f}_{m}" in t else "–" for f, _ in cols for m in ("minor", "major")]
        avg = np.mean([t[s]["success"] for s in pert])
        lines += ["Success rate (%) under the perturbations (layout of the paper's Table 3; object / goal moved by "
                  "2.5 / 5 cm, gripper by 20 / 50 mm):", "", f"| Policy | {head} | Avg |", "|---" * (2 * len(cols) + 2) + "|",
                  f"| {name} | " + " | ".join(cell) + f" | {avg:.1f} |", ""]
    lines += ["Per task (success %, episodes):", "", "| Task | " + " | ".join(t) + " |", "|---" * (len(t) + 1) + "|"]
    for task in res["task_names"]:
        lines.append(f"| {task} | " + " | ".join(f"{t[s]['per_task'].get(task, float('nan')):.1f}" for s in t) + " |")
    lines += ["| episodes (per task) | " + " | ".join(str(t[s]["episodes"]) for s in t) + " |"]
    return "\n".join(lines) + "\n"


def save_strips(records: list[dict], path: Path, n_frames: int, title: str) -> Path | None:
    """One row per kept episode (setting, initial state, outcome), n_frames columns at evenly spaced steps."""
    import torch
    from .viz import save_frame_grid
    kept = [r for r in records if "frames" in r]
    if not kept:
        return None
    longest = max(len(r["frames"]) for r in kept)
    steps = np.unique(np.linspace(0, longest - 1, n_frames).round().astype(int))
    rows, labels = [], []
    for r in kept:
        f = r["frames"][np.minimum(steps, len(r["frames"]) - 1)]  # a finished episode holds its last frame
        rows.append(torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2).float() / 255)
        end = f"success at t={r['steps']}" if r["success"] else f"fail ({r['steps']} steps)"
        labels.append(f"{r['perturbation']} init {r['init_index']}: {end}")
    return save_frame_grid(rows, path, labels=labels, col_labels=[f"t={s}" for s in steps], title=title)


def main(argv: list[str]) -> int:
    cfg = parse_command("eval", EvalConfig, argv)
    if cfg is None:
        return 0
    from .envs.libero_env import MAX_STEPS
    from .evaluation import LIBERO_PERTURBATIONS, CheckpointPolicy, evaluate_libero
    from .utils import atomic_write_text
    size, pol_info = check_policy(cfg.policy, cfg.image_size)
    suite, ids = resolve(cfg)
    settings = cfg.settings or ["none", *LIBERO_PERTURBATIONS[suite]]
    max_steps = cfg.max_steps or MAX_STEPS[suite]
    r = evaluate_libero(CheckpointPolicy(cfg.policy, cfg.seed), suite, settings, cfg.inits, cfg.workers, size,
                        cfg.progress, ids, max_steps, keep_frames=cfg.strip_episodes)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(x["task_name"] for x in r["records"]))
    res = {"policy": str(cfg.policy), "policy_name": Path(cfg.policy).name or str(cfg.policy), "suite": suite,
           "task_indices": ids, "task_names": names, "settings": settings, "initial_states": cfg.inits,
           "image_size": size, "max_steps": max_steps, "policy_info": pol_info, "config": to_dict(cfg),
           "table": r["table"], "records": [{k: v for k, v in x.items() if k != "frames"} for x in r["records"]]}
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    md = markdown(res)
    atomic_write_text(out / "results.md", md)
    save_strips(r["records"], out / "episodes.png", cfg.strip_frames,
                f"{Path(cfg.policy).name} in {suite}: {names[0] if len(names) == 1 else f'{len(names)} tasks'}")
    print(md)
    print(f"eval: wrote {out / 'results.json'}, results.md, episodes.png")
    return 0
