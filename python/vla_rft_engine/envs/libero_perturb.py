"""The paper's perturbation suites (Table 3 / Table 8) applied to LIBERO's official initial states.

  setting  | what moves (Fig. 3)                                        | minor   | major
  object   | the manipulated object (first object of the goal), in x, y | 2.5 cm  | 5 cm
  goal     | the target object (the goal's second object), in x, y      | 2.5 cm  | 5 cm
  robot    | the gripper: height and horizontal offset                  | 20      | 50
  all      | all three at once                                          | 2.5/2.5/20 | 5/5/50

Table 3 says "all magnitudes are in centimeter", but a 20-50 cm gripper offset leaves LIBERO's workspace;
we read the robot column as millimetres (2 / 5 cm), `ROBOT_UNIT_M` to change it. Each moved item shifts by
exactly its magnitude, in a random direction chosen among those that keep it clear of the other objects;
the gripper is driven there by the arm's own controller (a few OSC steps), so its state stays physical.
Fixtures (drawers, stoves) and regions cannot move: a task whose goal names none of the movable objects
is left as it is for that part (Table 8's "KP").
"""
from __future__ import annotations

import numpy as np

from .perturb import PERTURBATIONS, check_perturbation  # same setting names as the built-in suite

ROBOT_UNIT_M = 0.001
CM = 0.01
MAGNITUDES = {  # name -> (object xy m, goal xy m, robot offset m)
    "none": (0.0, 0.0, 0.0),
    "object_minor": (2.5 * CM, 0.0, 0.0), "object_major": (5 * CM, 0.0, 0.0),
    "goal_minor": (0.0, 2.5 * CM, 0.0), "goal_major": (0.0, 5 * CM, 0.0),
    "robot_minor": (0.0, 0.0, 20 * ROBOT_UNIT_M), "robot_major": (0.0, 0.0, 50 * ROBOT_UNIT_M),
    "all_minor": (2.5 * CM, 2.5 * CM, 20 * ROBOT_UNIT_M), "all_major": (5 * CM, 5 * CM, 50 * ROBOT_UNIT_M),
}
assert set(MAGNITUDES) == set(PERTURBATIONS)
_ANGLES = 16

__all__ = ["MAGNITUDES", "apply_perturbation", "check_perturbation", "goal_objects"]


def _object_name(env, name: str) -> str | None:
    """A goal argument -> the movable object it names ('basket_1_contain_region' -> 'basket_1'), or None."""
    objs = env.robosuite_env.objects_dict
    if name in objs:
        return name
    for o in objs:
        if name.startswith(o + "_"):
            return o
    return None


def goal_objects(env) -> tuple[str | None, str | None]:
    """(manipulated object, target object) from the task's BDDL goal, each None when it is not movable."""
    goal = env.robosuite_env.parsed_problem["goal_state"]
    pred = goal[0]
    manip = _object_name(env, pred[1]) if len(pred) > 1 else None
    target = _object_name(env, pred[2]) if len(pred) > 2 else None
    return manip, (target if target != manip else None)


def _free_joint(env, name: str) -> str:
    return env.robosuite_env.objects_dict[name].joints[-1]


def _xy(env, name: str) -> np.ndarray:
    return np.array(env.sim.data.get_joint_qpos(_free_joint(env, name))[:2])


def _shift_object(env, name: str, mag: float, rng) -> None:
    objs = env.robosuite_env.objects_dict
    others = [(o, _xy(env, o), getattr(objs[o], "horizontal_radius", 0.03)) for o in objs if o != name]
    r = getattr(objs[name], "horizontal_radius", 0.03)
    start = _xy(env, name)
    best, best_score = start, -np.inf
    for ang in rng.uniform(0, 2 * np.pi) + np.arange(_ANGLES) * (2 * np.pi / _ANGLES):
        p = start + mag * np.array([np.cos(ang), np.sin(ang)])
        score = min([np.linalg.norm(p - q) - (r + rq + 0.01) for _, q, rq in others] or [1.0])
        if score >= 0:
            best = p
            break
        if score > best_score:
            best, best_score = p, score
    qpos = np.array(env.sim.data.get_joint_qpos(_free_joint(env, name)))
    qpos[:2] = best
    env.sim.data.set_joint_qpos(_free_joint(env, name), qpos)
    env.sim.forward()


def _move_gripper(env, mag: float, rng, steps: int = 25) -> None:
    ang = rng.uniform(0, 2 * np.pi)
    # the horizontal offset and the height change both have the full magnitude (Fig. 3: "height and offset")
    goal = env.raw_obs()["robot0_eef_pos"] + np.array([mag * np.cos(ang), mag * np.sin(ang),
                                                       mag * rng.choice([-1.0, 1.0])])
    for _ in range(steps):
        a = np.zeros(7)
        a[:3] = np.clip((goal - env.raw_obs()["robot0_eef_pos"]) * 20.0, -1, 1)
        a[6] = -1.0
        env._obs_raw = env._env.step(a)[0]


def apply_perturbation(env, name: str, rng: np.random.Generator) -> None:
    """Shift a LiberoEnv's freshly set initial state in place (before its settle steps)."""
    obj_mag, goal_mag, robot_mag = MAGNITUDES[name]
    if name == "none":
        return
    manip, target = goal_objects(env)
    if obj_mag > 0 and manip is not None:
        _shift_object(env, manip, obj_mag, rng)
    if goal_mag > 0 and target is not None:
        _shift_object(env, target, goal_mag, rng)
    env._obs_raw = env._env.regenerate_obs_from_state(env._env.get_sim_state())
    if robot_mag > 0:
        _move_gripper(env, robot_mag, rng)
