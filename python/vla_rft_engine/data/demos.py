"""Expert demonstrations on the built-in table-top suite, their storage, and closed-loop policy evaluation.

Episodes are fixed-length (T = max_steps). After success an episode goes on with no-op actions
(zero motion, the last gripper command held) actually stepped through the env, so every
(frame, action, next frame) triple stays a true transition; `lengths` is the step at which the
task was first solved (T when it never was). Usually the no-op frames repeat the last frame exactly.
"""
from __future__ import annotations

from typing import Any

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..envs.expert import expert_action, wander_action
from ..envs.tabletop import TableTopEnv
from ..utils import atomic_save

DEMOS_FORMAT, DEMOS_VERSION = "vla_rft_engine.demos", 1
_ARRAYS = ("frames", "actions", "proprio", "success", "lengths", "seeds")


def episode_seeds(seed: int, num_episodes: int) -> np.ndarray:
    return np.random.default_rng([seed, 2024]).integers(0, 2**31, num_episodes)


def collect_demos(task: str, num_episodes: int, seed: int = 0, image_size: int = 64, expert_noise: float = 0.0,
                  max_steps: int | None = None, perturbation: str | None = None, wander_every: int = 0,
                  gripper_marker: float = 0.0, xy_step_scale: float = 1.0) -> dict:
    """Roll out the scripted expert: frames uint8 (N, T+1, H, W, 3), actions float32 (N, T, 7),
    proprio float32 (N, T+1, 8), instructions list[str], success bool (N,), lengths int64 (N,), seeds int64 (N,).
    wander_every > 0: world-model data instead of demos: the gripper heads for a random point re-drawn every
    `wander_every` steps (envs.expert.wander_action), whatever the instruction says.
    gripper_marker, xy_step_scale: the env's options (envs.tabletop), recorded in the dict."""
    env = TableTopEnv(task, image_size=image_size, seed=seed, perturbation=perturbation, max_steps=max_steps,
                      gripper_marker=gripper_marker, xy_step_scale=xy_step_scale)
    t_max = env.max_steps
    n = num_episodes
    out: dict[str, Any] = {"frames": np.zeros((n, t_max + 1, image_size, image_size, 3), np.uint8),
           "actions": np.zeros((n, t_max, 7), np.float32),
           "proprio": np.zeros((n, t_max + 1, 8), np.float32),
           "success": np.zeros(n, bool), "lengths": np.full(n, t_max, np.int64),
           "seeds": episode_seeds(seed, n).astype(np.int64), "instructions": []}
    for i in range(n):
        rng = np.random.default_rng([seed, i, 99])
        obs = env.reset(seed=int(out["seeds"][i]))
        out["instructions"].append(obs["instruction"])
        out["frames"][i, 0], out["proprio"][i, 0] = obs["image"], obs["proprio"]
        solved = False
        for t in range(t_max):
            if wander_every and t % wander_every == 0:
                goal = np.array([*rng.uniform(-0.9, 0.9, 2), rng.uniform(0.03, 0.4)])
            if wander_every:
                a = wander_action(env, goal, noise=expert_noise, rng=rng)
            elif solved:
                a = np.zeros(7, np.float32)
                a[6] = env.last_cmd
            else:
                a = expert_action(env, noise=expert_noise, rng=rng)
            obs, _, _, info = env.step(a)
            out["actions"][i, t] = a
            out["frames"][i, t + 1], out["proprio"][i, t + 1] = obs["image"], obs["proprio"]
            if info["success"] and not solved and not wander_every:  # wandering: no task, the whole episode counts
                solved = True
                out["success"][i], out["lengths"][i] = True, t + 1
    out.update(task=task, perturbation=perturbation or "none", image_size=image_size, expert_noise=expert_noise,
               wander_every=wander_every, gripper_marker=float(gripper_marker), xy_step_scale=float(xy_step_scale))
    return out


def save_demos(d: dict, path: str | Path) -> None:
    """Atomic torch.save of a collect_demos dict (arrays stored as tensors) with a format/version header."""
    missing = [k for k in (*_ARRAYS, "instructions") if k not in d]
    if missing:
        raise ValueError(f"demos dict lacks {missing}")
    blob = {"format": DEMOS_FORMAT, "version": DEMOS_VERSION}
    for k, v in d.items():
        blob[k] = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
    atomic_save(blob, path)


def load_demos(path: str | Path) -> dict:
    """A save_demos .pt file, or LIBERO demos: an .hdf5/.h5 file or a folder of them (data/libero_hdf5.py)."""
    path = Path(path)
    if path.suffix in (".hdf5", ".h5") or (path.is_dir() and any(path.glob("*.hdf5"))):
        from .libero_hdf5 import load_libero_hdf5
        return load_libero_hdf5(path)
    if not path.is_file():
        raise FileNotFoundError(f"demos file not found at {path}; collect them with collect_demos + save_demos")
    from ..config import BadFileError
    from ..utils import load_checkpoint
    blob = load_checkpoint(path, "demos file")  # weights_only: loading never runs code
    if not isinstance(blob, dict) or blob.get("format") != DEMOS_FORMAT:
        raise BadFileError(f"{path} is not a demos file (no '{DEMOS_FORMAT}' format header)")
    if blob.get("version") != DEMOS_VERSION:
        raise BadFileError(f"demos file {path} has version {blob.get('version')}, this code reads version "
                           f"{DEMOS_VERSION}; collect the demos again")
    d = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in blob.items() if k not in ("format", "version")}
    for k in ("actions", "proprio"):  # checked once, here, naming the episodes: not at the first use, hours later
        v = d.get(k)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
            bad = np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))
            raise BadFileError(f"demos file {path}: {k} of episode(s) {bad[:10].tolist()} hold NaN/Inf; drop or "
                               "re-record those episodes")
    return d


def evaluate_policy(policy_fn: Callable[[dict], np.ndarray], task: str, perturbation: str | None = None,
                    num_episodes: int = 50, seed: int = 0, image_size: int = 64, max_steps: int | None = None,
                    gripper_marker: float = 0.0, xy_step_scale: float = 1.0) -> dict:
    """Closed-loop success rate. policy_fn(obs) returns an action chunk (C, 7) (or one (7,) action), executed
    open-loop until it runs out or the episode ends, then the policy is queried again.

    Returns {"success_rate", "episodes": [{"seed", "instruction", "success", "steps", "queries"}]}.
    Same seed -> same episodes as collect_demos(task, ..., seed) under the same perturbation and env options.
    """
    env = TableTopEnv(task, image_size=image_size, seed=seed, perturbation=perturbation, max_steps=max_steps,
                      gripper_marker=gripper_marker, xy_step_scale=xy_step_scale)
    episodes = []
    for s in episode_seeds(seed, num_episodes):
        obs = env.reset(seed=int(s))
        done, info, queries = False, {"success": False}, 0
        while not done:
            chunk = np.asarray(policy_fn(obs), dtype=np.float32)
            chunk = chunk[None] if chunk.ndim == 1 else chunk
            if chunk.ndim != 2 or chunk.shape[1] != 7 or len(chunk) == 0:
                raise ValueError(f"policy_fn must return an action chunk of shape (C, 7), got {chunk.shape}")
            queries += 1
            for a in chunk:
                obs, _, done, info = env.step(a)
                if done:
                    break
        episodes.append({"seed": int(s), "instruction": env.instruction, "success": bool(info["success"]),
                         "steps": env.steps, "queries": queries})
    rate = float(np.mean([e["success"] for e in episodes])) if episodes else 0.0
    return {"success_rate": rate, "episodes": episodes}
