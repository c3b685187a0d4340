"""Initial-state perturbations after the paper's robustness suites (Table 3/8).

Scale: the table is 2 x 2 world units and we take it to be 60 cm wide, so 1 unit = 30 cm.

  family  | paper            | minor                     | major
  object  | +-2.5 / +-5 cm   | 0.0833 units (2.5 cm)     | 0.1667 units (5 cm)
  goal    | +-2.5 / +-5 cm   | 0.0833 units              | 0.1667 units
  robot   | +-20 / +-50      | xy 0.10, height 0.05      | xy 0.25, height 0.125
  all     | all three at once, same sizes

The paper gives the robot-state offsets without units; we keep their 2:5 ratio and pick sizes that
move the gripper visibly (major ~ 8 px sideways at 64 px) and keep it inside its height range.
Each perturbed item moves by exactly its magnitude (xy: in a random direction, chosen among valid
ones so objects stay apart, off the targets and on the table; height: up or down at random).
"""
from __future__ import annotations

import numpy as np

MAGNITUDES = {  # name -> (object xy, goal xy, robot xy, robot z)
    "none": (0.0, 0.0, 0.0, 0.0),
    "object_minor": (2.5 / 30, 0.0, 0.0, 0.0),
    "object_major": (5.0 / 30, 0.0, 0.0, 0.0),
    "goal_minor": (0.0, 2.5 / 30, 0.0, 0.0),
    "goal_major": (0.0, 5.0 / 30, 0.0, 0.0),
    "robot_minor": (0.0, 0.0, 0.10, 0.05),
    "robot_major": (0.0, 0.0, 0.25, 0.125),
    "all_minor": (2.5 / 30, 2.5 / 30, 0.10, 0.05),
    "all_major": (5.0 / 30, 5.0 / 30, 0.25, 0.125),
}
PERTURBATIONS: tuple[str, ...] = tuple(MAGNITUDES)

_BOUND = 0.88  # perturbed centres stay this far inside the table edge
_ANGLES = 48


def check_perturbation(name: str | None) -> str:
    name = "none" if name is None else name
    if name not in MAGNITUDES:
        raise ValueError(f"unknown perturbation {name!r}; valid names: {list(PERTURBATIONS)}")
    return name


def _shift(points: np.ndarray, i: int, mag: float, rng, clearance) -> None:
    """Move points[i] by exactly `mag` in the valid direction nearest a random one (best clearance if none is valid)."""
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.arange(_ANGLES) * (2 * np.pi / _ANGLES)
    best, best_score = None, -np.inf
    for ang in angles:
        p = points[i] + mag * np.array([np.cos(ang), np.sin(ang)])
        score = min(clearance(p), _BOUND - np.abs(p).max())
        if score >= 0:
            points[i] = p
            return
        if score > best_score:
            best, best_score = p, score
    points[i] = best


def apply_perturbation(env, name: str, rng: np.random.Generator) -> None:
    """Shift env's freshly sampled objects, targets and gripper in place (rng is separate from the layout's)."""
    obj_mag, goal_mag, robot_xy, robot_z = MAGNITUDES[name]
    objs, tgts = env.obj_pos, env.target_pos
    min_oo, min_ot, min_tt = env.MIN_OBJ_SEP, env.MIN_OBJ_TARGET_SEP, env.MIN_TARGET_SEP
    if obj_mag > 0:
        for i in range(len(objs)):
            def clearance(p, i=i):
                d_o = [np.linalg.norm(p - q) - min_oo for j, q in enumerate(objs) if j != i]
                d_t = [np.linalg.norm(p - t) - min_ot for t in tgts]
                return min(d_o + d_t)
            _shift(objs, i, obj_mag, rng, clearance)
    if goal_mag > 0:
        for i in range(len(tgts)):
            def clearance(p, i=i):
                d_t = [np.linalg.norm(p - q) - min_tt for j, q in enumerate(tgts) if j != i]
                d_o = [np.linalg.norm(p - o) - min_ot for o in objs]
                return min(d_t + d_o)
            _shift(tgts, i, goal_mag, rng, clearance)
    if robot_xy > 0:
        ang = rng.uniform(0, 2 * np.pi)
        env.grip[:2] += robot_xy * np.array([np.cos(ang), np.sin(ang)])
        env.grip[2] += robot_z * rng.choice([-1.0, 1.0])
