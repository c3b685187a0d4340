"""Demonstrations in the official LIBERO HDF5 layout (h5py), to and from the project's demos dict.

Layout (one task per file, as LIBERO's create_dataset script writes it):
    data.attrs: env_name, problem_info (JSON: problem_name, domain_name, language_instruction),
                env_args (JSON), bddl_file_name, bddl_file_content, macros_image_convention, num_demos, total
    data/demo_i: actions (N, 7), states (N, S) MuJoCo flat states, robot_states (N, 9) gripper qpos + eef
                 pos + eef quat, rewards (N,), dones (N,); attrs num_samples, model_file, init_state
    data/demo_i/obs: agentview_rgb, eye_in_hand_rgb (N, H, W, 3) uint8, ee_states (N, 6) eef pos + axis-angle,
                 ee_pos, ee_ori, gripper_states (N, 2), joint_states (N, 7)
Sample k holds the observation at which actions[k] was taken (the convention of the regenerated LIBERO
sets VLA policies train on). The original LIBERO release recorded each observation after its action;
read those with obs_after_action=True (the first action is dropped so frames and actions line up again).
Images: robosuite's "opengl" convention (upside down) on disk; in memory the 180-degree-rotated upright
frames LiberoEnv returns. A demos dict of T steps is written as T + 1 samples (the last action a hold:
zero motion, the last gripper command), so reading it back returns the same arrays.
"""
from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import numpy as np


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading LIBERO HDF5 demos needs h5py: pip install '.[libero]'") from None
    return h5py


def _upright(x: np.ndarray, convention: str) -> np.ndarray:
    return np.ascontiguousarray(x[:, ::-1, ::-1]) if convention == "opengl" else x


def _axisangle2quat(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    axis = np.divide(v, angle, out=np.zeros_like(v), where=angle > 1e-8)
    return np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], -1)  # (x, y, z, w) as robosuite


def hdf5_files(path: str | Path) -> list[Path]:
    p = Path(path)
    files = sorted(p.glob("*.hdf5")) + sorted(p.glob("*.h5")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no LIBERO .hdf5 demos at {p}")
    return files


def _read_file(path: Path, obs_after_action: bool, wrist: bool):
    h5py = _h5py()
    eps = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            from ..config import BadFileError
            raise BadFileError(f"{path} has no 'data' group: not a LIBERO/robomimic HDF5 demos file")
        data = f["data"]
        conv = data.attrs.get("macros_image_convention", "opengl")
        conv = conv.decode() if isinstance(conv, bytes) else str(conv)
        info = json.loads(data.attrs.get("problem_info", "{}") or "{}")
        file_instr = "".join(info.get("language_instruction", "")).strip('"')
        names = sorted(data.keys(), key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else 0)
        for name in names:
            g = data[name]
            obs = g["obs"]
            frames = _upright(obs["agentview_rgb"][()], conv)
            acts = g["actions"][()].astype(np.float32)
            n = len(acts)
            if "ee_states" in obs:
                ee = obs["ee_states"][()]
            elif "ee_pos" in obs:
                ee = np.concatenate([obs["ee_pos"][()], obs["ee_ori"][()]], -1)
            else:
                ee = np.zeros((n, 6))
            grip = obs["gripper_states"][()] if "gripper_states" in obs else np.zeros((n, 2))
            prop = np.concatenate([ee, grip], -1).astype(np.float32)
            rew = g["rewards"][()] if "rewards" in g else np.zeros(n)
            ep = {"frames": frames, "proprio": prop, "rewards": np.asarray(rew),
                  "instruction": g.attrs.get("language_instruction", file_instr)}
            if wrist and "eye_in_hand_rgb" in obs:
                ep["wrist"] = _upright(obs["eye_in_hand_rgb"][()], conv)
            if "states" in g:
                ep["states"] = g["states"][()]
            # frame k+1 follows action k: drop the dangling last action (or, for observations recorded
            # after their action, the first one)
            ep["actions"] = acts[1:] if obs_after_action else acts[:-1]
            if obs_after_action and "states" in ep:  # states were recorded before the action: realign
                ep["states"] = ep["states"][1:]
                ep["states"] = np.concatenate([ep["states"], ep["states"][-1:]])
            eps.append(ep)
    return eps


def load_libero_hdf5(path: str | Path, obs_after_action: bool = False, wrist: bool = False,
                     max_episodes: int | None = None) -> dict:
    """A LIBERO .hdf5 file, or a folder of them (e.g. a whole suite), -> the project's demos dict (see
    data/demos.py): frames (N, T+1, H, W, 3), actions (N, T, 7), proprio (N, T+1, 8), instructions, success,
    lengths, seeds; plus "wrist" frames when wrist=True. Episodes shorter than the longest are padded with
    hold actions (zero motion, last gripper command) and their last frame repeated, as collect_demos pads."""
    eps = []
    for f in hdf5_files(path):
        eps += _read_file(f, obs_after_action, wrist)
        if max_episodes and len(eps) >= max_episodes:
            eps = eps[:max_episodes]
            break
    if not eps:
        from ..config import BadFileError
        raise BadFileError(f"{path}: no demos (data/demo_*) found")
    T = max(len(e["actions"]) for e in eps)
    n = len(eps)
    H, W = eps[0]["frames"].shape[1:3]
    if any(e["frames"].shape[1:3] != (H, W) for e in eps):
        from ..config import BadFileError
        raise BadFileError(f"{path}: demos have different image sizes")
    out: dict[str, Any] = {"frames": np.zeros((n, T + 1, H, W, 3), np.uint8), "actions": np.zeros((n, T, 7), np.float32),
           "proprio": np.zeros((n, T + 1, 8), np.float32), "success": np.zeros(n, bool),
           "lengths": np.full(n, T, np.int64), "seeds": np.arange(n, dtype=np.int64), "instructions": []}
    if wrist:
        out["wrist"] = np.zeros_like(out["frames"])
    for i, e in enumerate(eps):
        t = len(e["actions"])
        for k, arr in (("frames", e["frames"]), ("proprio", e["proprio"])) + ((("wrist", e["wrist"]),) if wrist else ()):
            out[k][i, :t + 1] = arr[:t + 1]
            out[k][i, t + 1:] = arr[t]
        out["actions"][i, :t] = e["actions"]
        out["actions"][i, t:, 6] = e["actions"][-1, 6] if t else -1.0  # hold the last gripper command
        hit = np.flatnonzero(np.asarray(e["rewards"])[:t + 1] > 0)
        if len(hit):
            out["success"][i], out["lengths"][i] = True, int(hit[0])
        instr = e["instruction"]
        out["instructions"].append(instr.decode() if isinstance(instr, bytes) else str(instr))
    out.update(task=f"libero_hdf5:{Path(path).name}", perturbation="none", image_size=int(H), expert_noise=0.0,
               wander_every=0)
    return out


def save_libero_hdf5(demos: dict, path: str | Path, problem_name: str = "libero_tabletop_manipulation",
                     bddl_file: str | None = None, env_kwargs: dict | None = None) -> Path:
    """Write a demos dict (collect_demos / load_libero_hdf5 format) as a LIBERO HDF5 file. Optional entries:
    "wrist" frames, "states" (N, T+1, S) MuJoCo states, "joint_states" (N, T+1, 7). Instructions go into
    problem_info (the first one, as LIBERO files hold one task) and each demo's language_instruction attr."""
    h5py = _h5py()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames, acts, prop = demos["frames"], np.asarray(demos["actions"], np.float32), np.asarray(demos["proprio"])
    n, T = acts.shape[:2]
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        instr = demos["instructions"][0] if len(demos["instructions"]) else ""
        data.attrs["env_name"] = problem_name
        data.attrs["problem_info"] = json.dumps({"problem_name": problem_name, "domain_name": "robosuite",
                                                 "language_instruction": instr})
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": problem_name, "problem_name": problem_name,
                                             "bddl_file": bddl_file or "", "env_kwargs": env_kwargs or {}})
        data.attrs["bddl_file_name"] = bddl_file or ""
        data.attrs["bddl_file_content"] = Path(bddl_file).read_text() if bddl_file and Path(bddl_file).is_file() else ""
        data.attrs["macros_image_convention"] = "opengl"
        for i in range(n):
            g = data.create_group(f"demo_{i}")
            hold = np.zeros((1, 7), np.float32)
            hold[0, 6] = acts[i, -1, 6] if T else -1.0
            a = np.concatenate([acts[i], hold])
            length = int(demos["lengths"][i]) if "lengths" in demos else T
            solved = bool(demos["success"][i]) if "success" in demos else False
            rew = np.zeros(T + 1, np.uint8)
            if solved:
                rew[length:] = 1
            dones = rew.copy()
            dones[-1] = 1
            o = g.create_group("obs")
            o.create_dataset("agentview_rgb", data=np.asarray(frames[i])[:, ::-1, ::-1], compression="gzip",
                             compression_opts=1)
            if "wrist" in demos:
                o.create_dataset("eye_in_hand_rgb", data=np.asarray(demos["wrist"][i])[:, ::-1, ::-1],
                                 compression="gzip", compression_opts=1)
            ee, grip = prop[i, :, :6].astype(np.float64), prop[i, :, 6:8].astype(np.float64)
            o.create_dataset("ee_states", data=ee)
            o.create_dataset("ee_pos", data=ee[:, :3])
            o.create_dataset("ee_ori", data=ee[:, 3:])
            o.create_dataset("gripper_states", data=grip)
            if "joint_states" in demos:
                o.create_dataset("joint_states", data=np.asarray(demos["joint_states"][i], np.float64))
            g.create_dataset("actions", data=a.astype(np.float64))
            g.create_dataset("robot_states", data=np.concatenate([grip, ee[:, :3], _axisangle2quat(ee[:, 3:])], -1))
            g.create_dataset("rewards", data=rew)
            g.create_dataset("dones", data=dones)
            if "states" in demos:
                g.create_dataset("states", data=np.asarray(demos["states"][i], np.float64))
                g.attrs["init_state"] = np.asarray(demos["states"][i][0], np.float64)
            g.attrs["num_samples"] = T + 1
            g.attrs["model_file"] = ""
            g.attrs["language_instruction"] = demos["instructions"][i]
        data.attrs["num_demos"] = n
        data.attrs["total"] = n * (T + 1)
    tmp.replace(path)
    return path
