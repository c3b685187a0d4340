"""Closed-loop evaluation of policy checkpoints in the real (built-in) environment, and the quickstart report:
a success table in the form of the paper's Tables 2-3, JSON + Markdown, and the PNGs people look at."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SETTING_NAMES = {"none": "Standard", "object_minor": "Object (minor)", "object_major": "Object",
                 "goal_minor": "Goal (minor)", "goal_major": "Goal", "robot_minor": "Robot (minor)",
                 "robot_major": "Robot", "all_minor": "All (minor)", "all_major": "All"}


def policy_fn(policy, seed: int = 0):
    """obs -> unnormalised action chunk (C, 7): the deterministic ODE policy (fixed initial noise per query)."""
    def fn(obs):
        img = torch.as_tensor(obs["image"])[None]
        prop = torch.as_tensor(obs["proprio"])[None]
        return policy.act(img, [obs["instruction"]], prop, generator=torch.Generator().manual_seed(seed))[0].numpy()
    return fn


def evaluate_checkpoints(ckpts: dict, task: str, settings: list[str], seeds: list[int], episodes: int,
                         eval_seed: int, image_size: int, cache: Path, progress: bool = True,
                         env_options: dict | None = None, workers: int = 1) -> list[dict]:
    """Success rate of each checkpoint on each (setting, seed): `episodes` episodes drawn with env seed
    eval_seed + seed. Checkpoints named rft_seed{s} are evaluated on seed s only (their own seed); every other
    one on all seeds. Results are appended to `cache` (JSON) as they finish, so a killed run resumes.
    env_options: the table-top env's options (envs.tabletop.ENV_OPTIONS), as the policy was trained on.
    workers > 1: (setting, seed) jobs in that many spawned one-thread processes (one policy query per step is
    too small to keep two threads busy)."""
    from .utils import atomic_write_text
    cache = Path(cache)
    done = json.loads(cache.read_text()) if cache.is_file() else []
    have = {(r["policy"], r["setting"], r["seed"]) for r in done}
    jobs = [(name, st, s) for name in ckpts for st in settings for s in seeds
            if not (name.startswith("rft_seed") and name != f"rft_seed{s}")]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), initial=sum(j in have for j in jobs), desc="evaluate", dynamic_ncols=True)
    todo = [(name, str(ckpts[name]), task, st, s, episodes, eval_seed, image_size, env_options or {})
            for name, st, s in jobs if (name, st, s) not in have]
    pool = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=torch.set_num_threads, initargs=(1,))
    try:
        for name, st, s, outcomes in (pool.imap(_eval_job, todo) if pool else map(_eval_job, todo)):
            done.append({"policy": name, "setting": st, "seed": s, "success_rate": float(np.mean(outcomes)),
                         "episodes": episodes, "successes": sum(outcomes), "outcomes": outcomes,
                         "eval_seed": eval_seed})
            atomic_write_text(cache, json.dumps(done, indent=1))
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _POLICY.clear()
    if bar is not None:
        bar.close()
    return done


_POLICY: dict = {}  # this process's loaded checkpoint: one policy in memory at a time


def _eval_job(job: tuple) -> tuple:
    """One (checkpoint, setting, seed) evaluation -> (name, setting, seed, per-episode outcomes)."""
    from .data.demos import evaluate_policy
    from .train.sft import load_policy
    name, ckpt, task, st, s, episodes, eval_seed, image_size, env_options = job
    if ckpt not in _POLICY:
        _POLICY.clear()
        _POLICY[ckpt] = load_policy(ckpt)
    r = evaluate_policy(policy_fn(_POLICY[ckpt]), task, perturbation=None if st == "none" else st,
                        num_episodes=episodes, seed=eval_seed + s, image_size=image_size, **env_options)
    return name, st, s, [int(e["success"]) for e in r["episodes"]]  # per episode: the bootstrap pairs them


def success_table(records: list[dict], settings: list[str], seeds: list[int]) -> dict:
    """{setting: {"sft": mean, "rft": mean, "delta": rft - sft, "per_seed": {seed: {"sft", "rft"}}}} in %."""
    get = {(r["policy"], r["setting"], r["seed"]): 100.0 * r["success_rate"] for r in records}
    table = {}
    for st in settings:
        per = {s: {"sft": get[("sft", st, s)], "rft": get[(f"rft_seed{s}", st, s)]} for s in seeds}
        sft = float(np.mean([v["sft"] for v in per.values()]))
        rft = float(np.mean([v["rft"] for v in per.values()]))
        table[st] = {"sft": sft, "rft": rft, "delta": rft - sft, "per_seed": per}
    return table


def paired_bootstrap(records: list[dict], settings: list[str], seeds: list[int], n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """95% interval of the average gain (RFT - SFT, points), resampling episodes with replacement inside each
    (setting, seed) cell. SFT and RFT ran the same episodes (same env seeds), so one draw picks the same
    episodes for both: the interval reflects the paired difference, not two independent noises."""
    get = {(r["policy"], r["setting"], r["seed"]): np.asarray(r["outcomes"], float) for r in records}
    diffs = [get[(f"rft_seed{s}", st, s)] - get[("sft", st, s)] for st in settings for s in seeds]
    rng = np.random.default_rng(seed)
    boot = np.mean([d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1) for d in diffs], 0) * 100
    mean = float(np.mean([d.mean() for d in diffs]) * 100)
    return {"mean": mean, "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)),
            "n_boot": n_boot, "cells": len(diffs), "episodes": int(sum(len(d) for d in diffs))}


def table_markdown(table: dict, seeds: list[int], task: str, episodes: int, reward: str = "r3",
                   ci: dict | None = None) -> str:
    cols = list(table)
    head = "| Policy | " + " | ".join(SETTING_NAMES.get(c, c) for c in cols) + " | Avg |"
    sep = "|---" * (len(cols) + 2) + "|"

    def row(label, key, fmt="{:.1f}"):
        vals = [table[c][key] for c in cols]
        return f"| {label} | " + " | ".join(fmt.format(v) for v in vals) + " | " + fmt.format(np.mean(vals)) + " |"
    lines = [f"Success rate (%) on `{task}`, {episodes} episodes per setting and seed, mean over seeds "
             f"{', '.join(map(str, seeds))} (real environment, episodes unseen in training).", "", head, sep,
             row("SFT", "sft"), row(f"RFT ({reward.upper()})", "rft"), row("Δ", "delta", "{:+.1f}"), "", "Per seed (SFT → RFT):", "",
             "| Seed | " + " | ".join(SETTING_NAMES.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{table[c]['per_seed'][s]['sft']:.0f} → {table[c]['per_seed'][s]['rft']:.0f}"
                                               for c in cols) + " |")
    avg = round(float(np.mean([table[c]["delta"] for c in cols])), 6) + 0.0  # no "-0.0"
    interval = ""
    if ci is not None:
        interval = f" (paired bootstrap 95% interval [{ci['lo']:+.1f}, {ci['hi']:+.1f}] over {ci['episodes']} episode pairs)"
    if ci is not None and ci["lo"] > 0:
        verdict = "RFT raised the average success rate over its SFT checkpoint; the interval excludes 0."
    elif avg > 0:
        verdict = "RFT's average is above SFT's, but the gain is not distinguishable from episode noise."
    else:
        verdict = "RFT did NOT raise the average success rate over its SFT checkpoint in this run."
    return "\n".join(lines + ["", f"Average Δ: {avg:+.1f} points{interval}. {verdict}"]) + "\n"


@torch.no_grad()
def action_samples(ckpt: Path, demos: dict, max_states: int = 256) -> np.ndarray:
    """ODE action chunks of a checkpoint on the demos' pre-success states -> (n * C, 7)."""
    from .train.sft import load_policy
    pol = load_policy(ckpt)
    E, T = demos["actions"].shape[:2]
    idx = [(e, t) for e in range(E) for t in range(min(T, int(demos["lengths"][e])))][:max_states]
    e, t = map(np.array, zip(*idx))
    img = torch.as_tensor(demos["frames"][e, t])
    prop = torch.as_tensor(demos["proprio"][e, t])
    instr = [demos["instructions"][i] for i in e]
    a = pol.act(img, instr, prop, generator=torch.Generator().manual_seed(0))
    return a.reshape(-1, a.shape[-1]).numpy()


def rft_signal(histories: dict) -> dict:
    """Per RFT run, means over its steps: is the reward about the actions? (rl/rft.py logs signal/*)."""
    out = {}
    for s, rows in histories.items():
        def mean(key):
            v = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]  # null: logged NaN
            return float(np.mean(v)) if v else float("nan")
        out[f"seed{s}"] = {"spearman_reward_vs_action": mean("signal/spearman_reward_vs_action"),
                           "reward_group_std": mean("reward/group_std"), "wm_noise_std": mean("signal/wm_noise_std"),
                           "lpips_used": mean("reward/lpips_used"), "steps": len(rows)}
    return out


def reward_note(design: str, signal: dict, wm: dict) -> str:
    """What the reward was, and the numbers that say whether it carried action signal."""
    lp = [v["lpips_used"] for v in signal.values() if np.isfinite(v["lpips_used"])]
    terms = "L1 + LPIPS" if lp and min(lp) > 0 else "L1 only: the LPIPS backbone weights are absent and are never downloaded"
    what = {"r3": f"R3 (Eq. 11, {terms}): world-model frames under the policy's chunk vs under the dataset chunk, "
                  "same world model, same start",
            "r2": f"R2 ({terms}): world-model frames under the policy's chunk vs the dataset frames",
            "r1": "R1: minus the L1 distance of the policy's chunk to the dataset chunk. R1 never runs the world "
                  "model: a control, not the method"}[design]
    rho = np.nanmean([v["spearman_reward_vs_action"] for v in signal.values()])
    gstd = np.nanmean([v["reward_group_std"] for v in signal.values()])
    nstd = np.nanmean([v["wm_noise_std"] for v in signal.values()])
    lines = ["", f"Reward: {what}.", "",
             f"Reward signal during RFT (mean over steps and seeds): Spearman(reward, -|chunk - dataset chunk|_1) "
             f"= {rho:.2f}; in-group reward std {gstd:.4f} vs {nstd:.4f} over re-samples of one chunk "
             "(world-model noise)."]
    if "moving_l1_ratio" in wm:
        lines.append(f"World model on {wm['episodes']} unseen episodes ({wm['frames']} frames, greedy): L1 on the "
                     f"moving pixels {wm['moving_l1']:.4f} under the episode's own actions vs "
                     f"{wm['moving_l1_swapped']:.4f} under another episode's (ratio {wm['moving_l1_ratio']:.2f}; "
                     "1.00 = action-blind).")
    return "\n".join(lines) + "\n"


def write_report(qs) -> dict:
    """results.json / results.md and the PNGs, from a Quickstart whose earlier stages are done."""
    from .data.demos import collect_demos, save_demos
    from .train import wm_eval
    from .utils import atomic_write_text, read_jsonl
    from .viz import save_curve, save_histograms
    c, out, p = qs.cfg, qs.out, qs.paths
    records = json.loads(p["eval"].read_text())
    table = success_table(records, c.settings, c.seeds)
    ci = paired_bootstrap(records, c.settings, c.seeds)
    hist = {s: read_jsonl(p["rft"] / f"seed{s}" / "metrics.jsonl") for s in c.seeds}
    signal = rft_signal(hist)
    md = table_markdown(table, c.seeds, c.task, c.eval_episodes, c.rft.reward.design, ci)
    state = json.loads(qs.state_path.read_text()) if qs.state_path.is_file() else {}
    times = {k: v["wall_s"] for k, v in state.get("stages", {}).items()}
    # world model beside the real environment on unseen expert episodes: own vs another episode's actions
    held = collect_demos(c.task, 8, seed=c.eval_seed + 999, image_size=c.image_size, **c.env_options())
    save_demos(held, out / "heldout_demos.pt")
    wm_eval.main([f"wm={p['world_model'] / 'world_model'}", f"demos={out / 'heldout_demos.pt'}",
                  f"out_dir={out / 'wm_eval'}", "episodes=8", f"device={c.device}"])
    (out / "wm_rollout.png").write_bytes((out / "wm_eval" / "rollouts.png").read_bytes())
    wm_metrics = json.loads((out / "wm_eval" / "metrics.json").read_text())
    md += reward_note(c.rft.reward.design, signal, wm_metrics)
    atomic_write_text(out / "results.md", md)
    # reward curves, one line per seed
    curves = {}
    for s in c.seeds:
        rows = [r for r in hist[s] if "reward/mean" in r]
        curves[f"seed {s}"] = ([r["step"] for r in rows], [r["reward/mean"] for r in rows])
    steps = max((v[0] for v in curves.values()), key=len)
    save_curve(steps, {k: v[1][:len(steps)] + [float("nan")] * (len(steps) - len(v[1])) for k, v in curves.items()},
               out / "reward_curve.png", title=f"RFT mean verified reward ({c.rft.reward.design.upper()}) per step")
    # action distributions (paper Fig. 4): expert vs SFT vs RFT (first seed) on unseen expert states
    held = collect_demos(c.task, 16, seed=c.eval_seed + 1999, image_size=c.image_size, **c.env_options())
    L = held["lengths"]
    expert = np.concatenate([held["actions"][e, :int(L[e])] for e in range(len(L))])
    dists = {"expert": expert, "SFT": action_samples(p["sft"] / "ckpt.pt", held),
             "RFT": action_samples(p["rft"] / f"seed{c.seeds[0]}" / "ckpt.pt", held)}
    save_histograms(dists, ["dx", "dy", "dz", "gripper"], [0, 1, 2, 6], out / "action_distributions.png",
                    title="actions on unseen expert states: share of each policy's samples per bin (paper Fig. 4)")
    res = {"task": c.task, "seeds": c.seeds, "episodes_per_setting_seed": c.eval_episodes, "table": table,
           "avg_delta": float(np.mean([v["delta"] for v in table.values()])), "gain_ci95": ci,
           "eval_seed": c.eval_seed, "rft_signal": signal, "records": records,
           "rft": state.get("stages", {}).get("rft", {}).get("result"), "world_model_eval": wm_metrics,
           "stage_wall_s": times}
    atomic_write_text(out / "results.json", json.dumps(res, indent=1, default=str))
    return {"avg_delta": res["avg_delta"], "standard_sft": table[c.settings[0]]["sft"],
            "standard_rft": table[c.settings[0]]["rft"]}


# ---- LIBERO: the official initial states (Table 2) and the paper's perturbation suites (Table 3 / Table 8) ----
# which perturbation the paper applies to which suite (Sec. "LIBERO Perturbation Suites", Fig. 3)
LIBERO_PERTURBATIONS = {"libero_object": ("object_minor", "object_major"), "libero_goal": ("goal_minor", "goal_major"),
                        "libero_spatial": ("robot_minor", "robot_major"), "libero_10": ("all_minor", "all_major")}


def run_policy_episode(env, fn, seed: int, keep_frames: bool = False) -> dict:
    """One closed-loop episode of policy_fn `fn` (obs -> chunk (C, 7)) from env.reset(seed), chunks run open-loop.
    keep_frames: the result's "frames" holds every agent-view frame (T+1, H, W, 3)."""
    obs = env.reset(seed=seed)
    done, info, queries = False, {"success": False}, 0
    frames = [obs["image"]]
    while not done:
        chunk = np.asarray(fn(obs), dtype=np.float32)
        chunk = chunk[None] if chunk.ndim == 1 else chunk
        queries += 1
        for a in chunk:
            obs, _, done, info = env.step(a)
            if keep_frames:
                frames.append(obs["image"])
            if done:
                break
    out: dict = {"seed": int(seed), "init_index": int(getattr(env, "init_index", -1)), "success": bool(info["success"]),
                 "steps": int(env.steps), "queries": queries}
    if keep_frames:
        out["frames"] = np.stack(frames)
    return out


class CheckpointPolicy:
    """Picklable policy factory for worker processes: each one loads the checkpoint itself."""

    def __init__(self, ckpt: str, seed: int = 0):
        self.ckpt, self.seed = str(ckpt), seed

    def __call__(self):
        from .train.sft import load_policy
        torch.set_num_threads(1)
        return policy_fn(load_policy(self.ckpt), self.seed)


def evaluate_libero(make_policy, suite: str, settings: list[str] | None = None, inits: int = 50,
                    workers: int = 2, image_size: int = 128, progress: bool = True, tasks: list[int] | None = None,
                    max_steps: int | None = None, keep_frames: int = 0) -> dict:
    """Success rate (%) per setting and task of a policy over the first `inits` official initial states of
    every task in `suite`; settings default to "none" plus the paper's two magnitudes for the suite.
    keep_frames: the first that many initial states of the first task return their frames in each setting
    (records' "frames")."""
    from .envs.libero_env import SUITES
    from .envs.libero_runner import run_parallel
    suite = SUITES[suite]
    settings = settings or ["none", *LIBERO_PERTURBATIONS[suite]]
    tasks = list(tasks or range(10))
    # a task's jobs adjacent: a worker builds each task's env once for all its settings
    jobs = [(f"{suite}/{t}", s, st, t == tasks[0] and s < keep_frames) for t in tasks for st in settings
            for s in range(inits)]
    res = run_parallel(jobs, workers=workers, make_policy=make_policy, image_size=image_size, render=True,
                       progress=progress, desc=f"eval {suite}", max_steps=max_steps)
    table = {}
    for st in settings:
        rs = [r for r in res if r["perturbation"] == st]
        per_task: dict = {}
        for r in rs:
            per_task.setdefault(r["task_name"], []).append(r["success"])
        table[st] = {"success": 100.0 * float(np.mean([r["success"] for r in rs])), "episodes": len(rs),
                     "per_task": {k: 100.0 * float(np.mean(v)) for k, v in per_task.items()}}
    return {"suite": suite, "initial_states": inits, "table": table, "records": res}


__all__ = ["evaluate_checkpoints", "success_table", "table_markdown", "paired_bootstrap", "rft_signal", "write_report",
           "policy_fn", "evaluate_libero", "run_policy_episode", "CheckpointPolicy", "LIBERO_PERTURBATIONS"]
