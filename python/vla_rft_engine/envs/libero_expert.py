"""Scripted pick-and-place expert for LIBERO (LIBERO-Object at least) from privileged object poses.

Reads the manipulated object and the target (basket, plate...) from the task's BDDL goal, the objects'
extents from their MuJoCo geoms, and drives the end effector with OSC deltas: hover above the object,
descend, close, lift, carry above the target, lower, open. Grasps come from above with the fingers across
the object's narrower side; tall objects (bottles, cartons) are grasped near their top, not at their
middle, so the hand clears the table and the object does not tip over in the fingers. A failed grasp (the
object did not rise with the hand) starts over from the hover point.
"""
from __future__ import annotations

import numpy as np

from .libero_perturb import goal_objects

GAIN = 12.0  # action per metre of position error (|a| = 1 is 5 cm per step)
ROT_GAIN = 2.0
TALL = 0.07  # objects taller than this are grasped near the top
OPEN, CLOSE = -1.0, 1.0


def _subtree_geoms(model, root: int) -> list[int]:
    bodies = {root}
    for b in range(model.nbody):  # parents come before children in MuJoCo's body order
        if model.body_parentid[b] in bodies and b != 0:
            bodies.add(b)
    return [g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies]


def object_box(env, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World (min, max) corners of an object's geoms, and its footprint half-widths along the body x, y axes."""
    sim = env.sim
    m, d = sim.model._model, sim.data._data
    root = m.body(env.robosuite_env.objects_dict[name].root_body).id
    pts: list = []
    for g in _subtree_geoms(m, root):
        c, h = m.geom_aabb[g, :3], m.geom_aabb[g, 3:]
        corners = c + h * np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
        pts.append(d.geom_xpos[g] + corners @ d.geom_xmat[g].reshape(3, 3).T)
    box = np.concatenate(pts)
    rot = d.xmat[root].reshape(3, 3)
    local = (box - d.xpos[root]) @ rot
    half = 0.5 * (local.max(0) - local.min(0))
    return box.min(0), box.max(0), half


def _yaw_of(mat: np.ndarray) -> float:
    return float(np.arctan2(mat[1, 0], mat[0, 0]))


def _rot_err(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle taking `current` to `target` (3x3 rotations)."""
    r = target @ current.T
    angle = np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


class PickPlaceExpert:
    """Call reset(env) after env.reset(), then act(env) each step -> 7-D action."""

    def __init__(self, noise: float = 0.0, rng: np.random.Generator | None = None):
        self.noise, self.rng = noise, rng or np.random.default_rng()
        self.lift_floor: float | None = None  # the object's bottom when the lift began

    def reset(self, env) -> None:
        obj, target = goal_objects(env)
        if obj is None or target is None:
            raise ValueError(f"task {env.task.name!r} is not a pick-and-place of a movable object onto another")
        self.obj, self.target = obj, target
        lo, hi, half = object_box(env, self.obj)
        self.height = hi[2] - lo[2]
        # grasp point below the top: the fingers are ~4 cm long; tall objects are held high
        self.grasp_below_top = min(0.035, 0.5 * self.height) if self.height > TALL else 0.5 * self.height
        self.hand_rot0 = self._hand_rot(env)
        self.phase, self.count, self.tries = "hover", 0, 0

    # ---- state ---------------------------------------------------------------------------------------------
    def _hand_rot(self, env) -> np.ndarray:
        sim = env.sim
        return sim.data._data.site_xmat[sim.model._model.site("gripper0_grip_site").id].reshape(3, 3).copy()

    def _grasp_rot(self, env) -> np.ndarray:
        """Keep pointing down; turn about z so the fingers close across the object's narrow side."""
        d = env.sim.data._data
        root = env.sim.model._model.body(env.robosuite_env.objects_dict[self.obj].root_body).id
        omat = d.xmat[root].reshape(3, 3)
        _, _, half = object_box(env, self.obj)
        if max(half[:2]) < 1.15 * min(half[:2]):  # round or square: any direction will do
            return self.hand_rot0
        narrow_axis = omat[:, 0] if half[0] < half[1] else omat[:, 1]
        # the Panda's fingers close along the grip site's x axis
        fy = self.hand_rot0[:, 0]
        want = np.arctan2(narrow_axis[1], narrow_axis[0]) - np.arctan2(fy[1], fy[0])
        want = (want + np.pi / 2) % np.pi - np.pi / 2  # either direction across the narrow side: turn the least
        return _rz(want) @ self.hand_rot0

    def _move(self, env, goal, grip, rot=None) -> np.ndarray:
        a = np.zeros(7)
        a[:3] = np.clip(GAIN * (np.asarray(goal) - env.raw_obs()["robot0_eef_pos"]), -1, 1)
        a[3:6] = np.clip(ROT_GAIN * _rot_err(self.hand_rot0 if rot is None else rot, self._hand_rot(env)), -1, 1)
        a[6] = grip
        return a

    def act(self, env) -> np.ndarray:
        a = self._policy(env)
        if self.noise > 0:
            a[:6] += self.rng.normal(0.0, self.noise, 6)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def _policy(self, env) -> np.ndarray:
        o = env.raw_obs()
        eef = o["robot0_eef_pos"]
        lo, hi, _ = object_box(env, self.obj)
        tlo, thi, _ = object_box(env, self.target)
        oxy = 0.5 * (lo[:2] + hi[:2])
        grasp_z = hi[2] - self.grasp_below_top
        hover_z = hi[2] + 0.08
        carry_z = thi[2] + (eef[2] - lo[2]) + 0.05  # the object's bottom 5 cm above the target's top
        txy = 0.5 * (tlo[:2] + thi[:2])
        self.count += 1
        p = self.phase
        if p == "hover":
            self.rot = self._grasp_rot(env)
            if np.linalg.norm(eef[:2] - oxy) < 0.01 and abs(eef[2] - hover_z) < 0.03 and self.count > 5:
                self._go("descend")
            return self._move(env, [*oxy, hover_z], OPEN, self.rot)
        if p == "descend":
            rot = self.rot  # fixed from here on: the object may turn a little when the fingers touch it
            if abs(eef[2] - grasp_z) < 0.008 or self.count > 40:
                self._go("close")
            return self._move(env, [*oxy, grasp_z], OPEN, rot)
        if p == "close":
            if self.count > 12:
                self._go("lift")
                self.grip_rot = self._hand_rot(env)
            return self._move(env, [*oxy, grasp_z], CLOSE, self.rot)
        if p == "lift":
            if self.lift_floor is None:
                self.lift_floor = lo[2]
            held = lo[2] > self.lift_floor + 0.02
            if not held and eef[2] - self.lift_floor > 0.06 + self.height:  # the object stayed on the table
                return self._retry()
            if held and eef[2] > carry_z - 0.02:
                self._go("carry")
            return self._move(env, [*eef[:2], carry_z + 0.02], CLOSE, self.grip_rot)
        if p == "carry":
            assert self.lift_floor is not None  # set when the lift began
            if lo[2] < self.lift_floor + 0.005:  # dropped on the way
                return self._retry()
            if np.linalg.norm(0.5 * (lo[:2] + hi[:2]) - txy) < 0.015:
                self._go("lower")
            goal_xy = eef[:2] + (txy - 0.5 * (lo[:2] + hi[:2]))  # put the object's centre, not the hand, above it
            return self._move(env, [*goal_xy, carry_z], CLOSE, self.grip_rot)
        if p == "lower":
            release_z = eef[2] - (lo[2] - (thi[2] - 0.01))
            goal_xy = eef[:2] + (txy - 0.5 * (lo[:2] + hi[:2]))
            if lo[2] < thi[2] + 0.005 or self.count > 30:
                self._go("release")
            return self._move(env, [*goal_xy, release_z], CLOSE, self.grip_rot)
        # release, then back away upwards
        return self._move(env, [*eef[:2], eef[2] + (0.05 if self.count > 6 else 0.0)], OPEN, self.grip_rot)

    def _go(self, phase: str) -> None:
        self.phase, self.count = phase, 0
        if phase == "lift":
            self.lift_floor = None

    def _retry(self) -> np.ndarray:
        self.tries += 1
        self._go("hover")
        a = np.zeros(7)
        a[2], a[6] = 0.5, OPEN
        return a


def run_episode(env, seed: int, expert: PickPlaceExpert | None = None, max_steps: int | None = None) -> dict:
    """One expert episode from reset(seed): {"success", "steps", "tries", "init_index"}."""
    expert = expert or PickPlaceExpert()
    env.reset(seed=seed)
    expert.reset(env)
    limit = max_steps or env.max_steps
    info = {"success": env._success}
    while not info["success"] and env.steps < limit:
        info = env.step(expert.act(env))[3]
    return {"seed": int(seed), "init_index": int(env.init_index), "success": bool(info["success"]),
            "steps": int(env.steps), "tries": int(expert.tries)}


def record_episode(env, seed: int, max_steps: int | None = None) -> dict:
    """run_episode, keeping what a demo needs: frames / wrist / proprio / MuJoCo states (T+1), actions (T).
    Observation k is the one action k was taken at (the regenerated LIBERO sets' convention)."""
    expert = PickPlaceExpert()
    obs = env.reset(seed=seed)
    expert.reset(env)
    limit = max_steps or env.max_steps
    keep: dict[str, list] = {"frames": [], "wrist": [], "proprio": [], "states": [], "actions": []}

    def see(o):
        keep["frames"].append(o["image"])
        keep["wrist"].append(o.get("wrist", o["image"]))
        keep["proprio"].append(o["proprio"])
        keep["states"].append(np.asarray(env._env.get_sim_state(), np.float64))
    see(obs)
    info = {"success": env._success}
    while not info["success"] and env.steps < limit:
        a = expert.act(env)
        obs, _, _, info = env.step(a)
        keep["actions"].append(a)
        see(obs)
    out: dict = {k: np.stack(v) if v else np.zeros((0, 7), np.float32) for k, v in keep.items()}
    out.update(seed=int(seed), init_index=int(env.init_index), success=bool(info["success"]), steps=int(env.steps),
               instruction=env.instruction)
    return out


def demos_from_episodes(eps: list[dict]) -> dict:
    """record_episode results -> a demos dict (data/demos.py layout) padded to the longest episode: after its
    end an episode holds still (zero motion, its last gripper command) on its last frame, as load_libero_hdf5
    pads; `lengths` is the step of success."""
    T = max(len(e["actions"]) for e in eps)
    n, H = len(eps), eps[0]["frames"].shape[1]
    S = eps[0]["states"].shape[1]
    out: dict = {"frames": np.zeros((n, T + 1, H, H, 3), np.uint8), "wrist": np.zeros((n, T + 1, H, H, 3), np.uint8),
                 "proprio": np.zeros((n, T + 1, 8), np.float32), "states": np.zeros((n, T + 1, S)),
                 "actions": np.zeros((n, T, 7), np.float32), "success": np.array([e["success"] for e in eps]),
                 "lengths": np.array([len(e["actions"]) for e in eps], np.int64),
                 "seeds": np.array([e["seed"] for e in eps], np.int64), "instructions": [e["instruction"] for e in eps]}
    for i, e in enumerate(eps):
        t = len(e["actions"])
        for k in ("frames", "wrist", "proprio", "states"):
            out[k][i, :t + 1] = e[k]
            out[k][i, t + 1:] = e[k][t]
        out["actions"][i, :t] = e["actions"]
        out["actions"][i, t:, 6] = e["actions"][-1, 6] if t else -1.0
    return out
