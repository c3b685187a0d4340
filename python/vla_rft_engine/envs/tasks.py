"""Task families of the built-in suite: instruction templates, instance sampling and success checks.

A family names what to do ("push", "pick_place", ...); an instance picks which object and target
(by colour) from the episode's RNG. `TASKS` maps family name -> TaskFamily; `SUITES` maps a suite
name -> family names (an env built on a suite draws a family per episode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# geometry shared with the simulator (world units; the table spans [-1, 1]^2, see tabletop.py)
TARGET_HALF = 0.13  # target zones are squares of side 0.26
LIFT_Z = 0.15  # an object held above this height counts as lifted
REACH_XY, REACH_Z = 0.06, 0.15


@dataclass(frozen=True)
class TaskInstance:
    family: str
    obj: int  # index into the env's objects
    target: int  # index into the env's targets, -1 when the family has no target
    instruction: str


@dataclass(frozen=True)
class TaskFamily:
    name: str
    template: str
    uses_target: bool
    max_steps: int  # default episode limit: about 1.5-2x the scripted expert's longest episode
    success: Callable  # success(env, inst) -> bool

    def sample(self, rng: np.random.Generator, env) -> TaskInstance:
        obj = int(rng.integers(len(env.obj_colour)))
        target = int(rng.integers(len(env.target_colour))) if self.uses_target else -1
        words = {"obj": f"{env.obj_colour[obj]} {env.obj_shape[obj]}",
                 "target": env.target_colour[target] if target >= 0 else ""}
        return TaskInstance(self.name, obj, target, self.template.format(**words))


def in_target(env, obj: int, target: int) -> bool:
    d = np.abs(env.obj_pos[obj] - env.target_pos[target])
    return bool(d[0] < TARGET_HALF and d[1] < TARGET_HALF)


def _on_table_in_target(env, inst) -> bool:
    return env.held != inst.obj and env.obj_z[inst.obj] == 0.0 and in_target(env, inst.obj, inst.target)


def _push_success(env, inst) -> bool:
    return _on_table_in_target(env, inst)


def _pick_place_success(env, inst) -> bool:
    # must have been carried through the air, not just shoved into the zone
    return bool(env.was_lifted[inst.obj]) and _on_table_in_target(env, inst)


def _reach_success(env, inst) -> bool:
    d = np.linalg.norm(env.grip[:2] - env.obj_pos[inst.obj])
    return bool(d < REACH_XY and env.grip[2] < REACH_Z)


def _lift_success(env, inst) -> bool:
    return env.held == inst.obj and env.obj_z[inst.obj] > 2 * LIFT_Z


TASKS: dict[str, TaskFamily] = {
    "push": TaskFamily("push", "push the {obj} to the {target} target", True, 100, _push_success),
    "pick_place": TaskFamily("pick_place", "pick up the {obj} and place it on the {target} target", True, 100,
                             _pick_place_success),
    "reach": TaskFamily("reach", "move the gripper to the {obj}", False, 40, _reach_success),
    "lift": TaskFamily("lift", "pick up the {obj} and lift it", False, 50, _lift_success),
}
SUITES: dict[str, tuple[str, ...]] = {
    "tabletop": ("push", "pick_place", "reach", "lift"),  # every family, one drawn per episode
    "tabletop_manip": ("push", "pick_place"),
}


def resolve_task(name: str) -> tuple[str, ...]:
    """Family names for a family or suite name; ValueError names the valid ones."""
    if name in TASKS:
        return (name,)
    if name in SUITES:
        return SUITES[name]
    raise ValueError(f"unknown task {name!r}; valid task families: {sorted(TASKS)}, suites: {sorted(SUITES)}")
