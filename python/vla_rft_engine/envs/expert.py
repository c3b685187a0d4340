"""Scripted expert for every task family: a stateless controller that reads the env's true state.

Stateless on purpose: it recovers from noise, perturbations and its own mistakes, and any state
(e.g. one set with env.set_state) gets a sensible action.
"""
from __future__ import annotations

import numpy as np

from . import tabletop as tt

CLEAR_Z = 0.16  # above every object on the table: safe to travel
PUSH_Z = 0.03
OPEN, CLOSE = -1.0, 1.0


def _toward(env, xy, z, gripper, gain=1.0) -> np.ndarray:
    a = np.zeros(7)
    a[:2] = gain * (np.asarray(xy) - env.grip[:2]) / env.xy_step
    a[2] = (z - env.grip[2]) / tt.Z_STEP
    a[6] = gripper
    return a


def _push(env, obj: int, goal: np.ndarray) -> np.ndarray:
    o, g, z = env.obj_pos[obj], env.grip[:2], env.grip[2]
    d = goal - o
    u = d / max(np.linalg.norm(d), 1e-9)
    perp = np.array([-u[1], u[0]])
    contact = tt.OBJ_R + tt.GRIP_R
    rel = g - o
    along, lat = rel @ u, rel @ perp
    pre = o - u * (contact + 0.05)
    behind = along < -0.6 * contact and abs(lat) < 0.45 * contact
    if behind and z < 0.06:  # aim a little into the object, on the line through it to the goal
        return _toward(env, o - u * (contact - 0.05), PUSH_Z, OPEN)
    if np.linalg.norm(g - pre) < 0.03:
        return _toward(env, pre, PUSH_Z, OPEN)
    if z < CLEAR_Z - 0.02:  # wrong side: lift over the object before travelling
        return _toward(env, g, CLEAR_Z + 0.04, OPEN)
    return _toward(env, pre, CLEAR_Z + 0.04, OPEN)


def _grasp(env, obj: int) -> np.ndarray:
    """Approach from above with open fingers, descend, close."""
    o, g, z = env.obj_pos[obj], env.grip[:2], env.grip[2]
    if env.held >= 0 and env.held != obj:
        return _toward(env, g, z, OPEN)
    dist = np.linalg.norm(o - g)
    if dist > 0.04:  # GRASP_XY is 0.08: half of it tolerates action noise
        if z < CLEAR_Z - 0.02 and dist > 0.06:
            return _toward(env, g, CLEAR_Z + 0.04, OPEN)
        return _toward(env, o, max(z, CLEAR_Z), OPEN)
    if z > 0.06:
        return _toward(env, o, PUSH_Z, OPEN)
    if env.opening < 0.5 and env.held < 0:  # closed on nothing: open and try again
        return _toward(env, o, PUSH_Z, OPEN)
    return _toward(env, o, PUSH_Z, CLOSE)


def _carry(env, obj: int, goal: np.ndarray) -> np.ndarray:
    g, z = env.grip[:2], env.grip[2]
    if np.linalg.norm(goal - g) > 0.04:
        if z < tt.LIFT_Z + 0.05:  # lift first so the object counts as carried, not dragged
            return _toward(env, g, 0.3, CLOSE)
        return _toward(env, goal, 0.3, CLOSE)
    if z > 0.08:
        return _toward(env, goal, 0.05, CLOSE)
    return _toward(env, goal, 0.05, OPEN)


def expert_action(env, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """One 7-D action (float32, in [-1, 1]) for env's current task; `noise` adds N(0, noise^2) to the 6 motion dims."""
    inst = env.task
    if inst.family == "push":  # push and pick_place always have a target (TASKS: has_target)
        a = _push(env, inst.obj, env.target_pos[inst.target])
    elif inst.family == "pick_place":
        a = _carry(env, inst.obj, env.target_pos[inst.target]) if env.held == inst.obj else _grasp(env, inst.obj)
    elif inst.family == "reach":
        o = env.obj_pos[inst.obj]
        far = np.linalg.norm(o - env.grip[:2]) > 0.04
        a = _toward(env, o, CLEAR_Z if far else 0.11, OPEN)
    elif inst.family == "lift":
        a = _toward(env, env.grip[:2], 0.45, CLOSE) if env.held == inst.obj else _grasp(env, inst.obj)
    else:
        raise ValueError(f"no expert for task family {inst.family!r}")
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng()
        a[:6] += rng.normal(0.0, noise, 6)
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def wander_action(env, goal: np.ndarray, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Off-task motion for world-model data: the reach controller toward `goal` (x, y, z), a point the caller
    re-draws at random, with the gripper open. Its actions look like the expert's (same magnitudes, same
    controller) but their direction cannot be guessed from the scene, so a world model trained on them has
    to read the action tokens to predict where the gripper goes."""
    a = _toward(env, goal[:2], goal[2], OPEN)
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng()
        a[:6] += rng.normal(0.0, noise, 6)
    return np.clip(a, -1.0, 1.0).astype(np.float32)
