"""A procedural 2.5-D table-top environment: the built-in task suite every stage trains and evaluates on.

World: the table is [-1, 1]^2 (x right, y away from the robot, 1 unit ~ 30 cm), z is height above it.
Objects are blocks or discs (collision: circles of radius OBJ_R) resting on the table or held.
Actions (LIBERO convention, 7-D, clipped to [-1, 1]):
    [dx, dy, dz, droll, dpitch, dyaw, gripper]  -- deltas per step: XY_STEP, Z_STEP, YAW_STEP at |a| = 1;
    roll/pitch are accepted and ignored; gripper -1 opens, +1 closes (0 keeps the last command).
Proprio (float32, 8): [x, y, z, sin(yaw), cos(yaw), opening (1 open .. 0 closed), held (0/1), last gripper cmd (-1/+1)].
Grasp: the fingers closing (opening crossing 0.5) with the gripper below GRASP_Z and within GRASP_XY of an
object's centre picks it up; opening past 0.5 drops it. Push: a gripper below OBJ_H + 0.02 overlapping an
object pushes it out of the way (unless the open fingers straddle it); objects push each other too.
step() after done is allowed (the scene simply goes on); reset(seed) makes an episode reproducible.

Options (default off, so the default task is unchanged): gripper_marker > 0 draws a bold cyan disc of that radius
(world units) under the fingers, so a world model's tokenizer sees the gripper move (at 64 px the gripper itself is
a few thin grey pixels); xy_step_scale multiplies XY_STEP (the xy motion per step at |a| = 1; the expert and the
wandering controller follow env.xy_step). Every stage of one run must use the same options (ENV_OPTIONS).
"""
from __future__ import annotations

import numpy as np

from .perturb import apply_perturbation, check_perturbation
from .render import COLOURS, render_scene
from .tasks import LIFT_Z, TARGET_HALF, TASKS, resolve_task

XY_STEP, Z_STEP, YAW_STEP, OPEN_RATE = 0.06, 0.05, 0.25, 0.5
OBJ_R, OBJ_HALF, OBJ_H = 0.095, 0.085, 0.08
GRIP_R = 0.05
GRASP_Z, GRASP_XY = 0.10, 0.08
Z_MIN, Z_MAX, GRIP_BOUND, OBJ_BOUND = 0.02, 0.5, 1.05, 0.92  # the gripper may reach just past the edge
PROPRIO_DIM = 8
PROPRIO_LAYOUT = ("x", "y", "z", "sin_yaw", "cos_yaw", "opening", "held", "gripper_cmd")
ENV_OPTIONS = ("gripper_marker", "xy_step_scale")  # the rendering/dynamics options every stage passes through


def check_env_options(gripper_marker: float = 0.0, xy_step_scale: float = 1.0) -> dict:
    """The env options as a dict of floats; bad values raise ValueError."""
    if not (np.isfinite(gripper_marker) and 0.0 <= gripper_marker <= 0.5):
        raise ValueError(f"gripper_marker must be in [0, 0.5] world units (0: off), got {gripper_marker}")
    if not (np.isfinite(xy_step_scale) and 0.25 <= xy_step_scale <= 4.0):
        raise ValueError(f"xy_step_scale must be in [0.25, 4], got {xy_step_scale}")
    return {"gripper_marker": float(gripper_marker), "xy_step_scale": float(xy_step_scale)}


def check_action(action) -> np.ndarray:
    """A 7-D action (dx, dy, dz, droll, dpitch, dyaw, gripper) as float64, clipped to [-1, 1]; bad ones raise."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise ValueError(f"action must have 7 values (dx, dy, dz, droll, dpitch, dyaw, gripper), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action contains NaN or inf: {a}")
    return np.clip(a, -1.0, 1.0)


class TableTopEnv:
    MIN_OBJ_SEP, MIN_OBJ_TARGET_SEP, MIN_TARGET_SEP = 0.32, 0.32, 0.40
    LAYOUT_BOUND = 0.70  # sampled centres lie in [-0.7, 0.7]^2, leaving room for perturbations

    def __init__(self, task: str = "push", image_size: int = 64, seed: int = 0, perturbation: str | None = None,
                 max_steps: int | None = None, num_objects: int = 3, num_targets: int = 2,
                 gripper_marker: float = 0.0, xy_step_scale: float = 1.0):
        self.families = resolve_task(task)
        opts = check_env_options(gripper_marker, xy_step_scale)
        self.gripper_marker = opts["gripper_marker"]
        self.xy_step = XY_STEP * opts["xy_step_scale"]
        self.task_name = task
        self.perturbation = check_perturbation(perturbation)
        if not 1 <= num_objects <= len(COLOURS) or not 1 <= num_targets <= len(COLOURS):
            raise ValueError(f"num_objects and num_targets must be in [1, {len(COLOURS)}]")
        self.image_size = int(image_size)
        self.max_steps = max_steps or max(TASKS[f].max_steps for f in self.families)
        self.num_objects, self.num_targets = num_objects, num_targets
        self._seed_rng = np.random.default_rng(seed)
        self.reset()

    # ---- episode ---------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict:
        if seed is None:
            seed = int(self._seed_rng.integers(2**31))
        self.episode_seed = int(seed)
        rng = np.random.default_rng(self.episode_seed)
        names = list(COLOURS)
        self.obj_colour = [names[i] for i in rng.permutation(len(names))[: self.num_objects]]
        self.obj_shape = [("block", "disc")[i] for i in rng.integers(2, size=self.num_objects)]
        self.target_colour = [names[i] for i in rng.permutation(len(names))[: self.num_targets]]
        self.obj_pos, self.target_pos = self._sample_layout(rng)
        self.obj_z = np.zeros(self.num_objects)
        self.obj_yaw = rng.uniform(-np.pi / 4, np.pi / 4, self.num_objects)
        self.grip = np.array([rng.uniform(-0.05, 0.05), -0.65 + rng.uniform(-0.05, 0.05), 0.3])
        self.yaw, self.opening, self.held, self.last_cmd = 0.0, 1.0, -1, -1.0
        self.was_lifted = np.zeros(self.num_objects, bool)
        family = self.families[int(rng.integers(len(self.families)))]
        self.task = TASKS[family].sample(rng, self)
        # own stream: a perturbed episode starts from the same layout as the unperturbed one, then shifts
        apply_perturbation(self, self.perturbation, np.random.default_rng([self.episode_seed, 1]))
        self.steps, self._success = 0, self._check_success()
        return self._obs()

    def _sample_layout(self, rng):
        b = self.LAYOUT_BOUND
        for _ in range(1000):
            objs = rng.uniform(-b, b, (self.num_objects, 2))
            tgts = rng.uniform(-b, b, (self.num_targets, 2))
            if (_min_pair(objs) >= self.MIN_OBJ_SEP and _min_pair(tgts) >= self.MIN_TARGET_SEP
                    and _min_cross(objs, tgts) >= self.MIN_OBJ_TARGET_SEP):
                return objs, tgts
        raise RuntimeError("could not place objects and targets; use fewer objects/targets")

    def step(self, action):
        a = check_action(action)
        self._move_gripper(a)
        self._update_grasp(a[6])
        self._resolve_contacts()
        self.steps += 1
        self._success = self._check_success()
        done = self._success or self.steps >= self.max_steps
        info = {"success": self._success, "task": self.task.family, "steps": self.steps,
                "held": self.held, "episode_seed": self.episode_seed}
        return self._obs(), float(self._success), done, info

    # ---- physics -------------------------------------------------------------------------------------------
    def _move_gripper(self, a):
        dyaw = a[5] * YAW_STEP
        self.yaw = float((self.yaw + dyaw + np.pi) % (2 * np.pi) - np.pi)
        self.grip[:2] = np.clip(self.grip[:2] + a[:2] * self.xy_step, -GRIP_BOUND, GRIP_BOUND)
        self.grip[2] = np.clip(self.grip[2] + a[2] * Z_STEP, Z_MIN, Z_MAX)
        if self.held >= 0:
            self.obj_yaw[self.held] += dyaw

    def _update_grasp(self, cmd):
        if cmd != 0:
            self.last_cmd = 1.0 if cmd > 0 else -1.0
        was_open = self.opening >= 0.5
        self.opening = float(np.clip(self.opening - self.last_cmd * OPEN_RATE, 0.0, 1.0))
        is_open = self.opening >= 0.5
        if self.held >= 0 and is_open:  # release: the object drops onto the table where it is
            self.obj_z[self.held] = 0.0
            self.held = -1
        elif self.held < 0 and was_open and not is_open and self.grip[2] < GRASP_Z:
            d = np.linalg.norm(self.obj_pos - self.grip[:2], axis=1)
            i = int(np.argmin(d))
            if d[i] < GRASP_XY:
                self.held = i
        if self.held >= 0:  # carried objects sit between the fingers
            self.obj_pos[self.held] = self.grip[:2]
            self.obj_z[self.held] = self.grip[2]
            self.was_lifted[self.held] |= self.grip[2] > LIFT_Z

    def _resolve_contacts(self):
        on_table = [i for i in range(self.num_objects) if i != self.held]
        gripper_low = self.held < 0 and self.grip[2] < OBJ_H + 0.02
        for _ in range(3):
            if gripper_low:
                for i in on_table:
                    d = self.obj_pos[i] - self.grip[:2]
                    dist = float(np.hypot(*d))
                    straddled = self.opening >= 0.5 and dist < GRASP_XY
                    if dist < OBJ_R + GRIP_R and not straddled:
                        u = d / dist if dist > 1e-9 else np.array([1.0, 0.0])
                        self.obj_pos[i] = self.grip[:2] + u * (OBJ_R + GRIP_R)
            for k, i in enumerate(on_table):
                for j in on_table[k + 1:]:
                    d = self.obj_pos[j] - self.obj_pos[i]
                    dist = float(np.hypot(*d))
                    if dist < 2 * OBJ_R:
                        u = d / dist if dist > 1e-9 else np.array([1.0, 0.0])
                        push = 0.5 * (2 * OBJ_R - dist) * u
                        self.obj_pos[i] -= push
                        self.obj_pos[j] += push
            self.obj_pos[on_table] = np.clip(self.obj_pos[on_table], -OBJ_BOUND, OBJ_BOUND)

    def _check_success(self) -> bool:
        return bool(TASKS[self.task.family].success(self, self.task))

    # ---- observation -------------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self.task.instruction

    def proprio(self) -> np.ndarray:
        g = self.grip
        return np.array([g[0], g[1], g[2], np.sin(self.yaw), np.cos(self.yaw), self.opening,
                         float(self.held >= 0), self.last_cmd], dtype=np.float32)

    def render(self) -> np.ndarray:
        objects = [(self.obj_shape[i], self.obj_colour[i], *self.obj_pos[i], self.obj_z[i], self.obj_yaw[i])
                   for i in range(self.num_objects)]
        targets = [(c, *p) for c, p in zip(self.target_colour, self.target_pos)]
        return render_scene(self.image_size, tuple(self.grip), self.yaw, self.opening, objects, targets,
                            self.held, OBJ_HALF, TARGET_HALF, marker=self.gripper_marker)

    def _obs(self) -> dict:
        return {"image": self.render(), "proprio": self.proprio(), "instruction": self.task.instruction}

    def get_state(self) -> dict:
        """A copy of everything that defines the current scene (for set_state, debugging, tests)."""
        keys = ("grip", "yaw", "opening", "held", "last_cmd", "obj_pos", "obj_z", "obj_yaw", "was_lifted",
                "target_pos", "obj_colour", "obj_shape", "target_colour", "task", "steps", "episode_seed")
        return {k: (getattr(self, k).copy() if hasattr(getattr(self, k), "copy") else getattr(self, k)) for k in keys}

    def set_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.copy() if hasattr(v, "copy") else v)
        self._success = self._check_success()


def _min_pair(p: np.ndarray) -> float:
    if len(p) < 2:
        return np.inf
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    return float(d[np.triu_indices(len(p), 1)].min())


def _min_cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a[:, None] - b[None], axis=-1).min())


# ---- random play for tokenizer / world-model pretraining -------------------------------------------------
CLEAR_TRAVEL = 0.2  # travel height above every object


def _random_waypoint(env, rng):
    """Pick the next segment: grasp an object, push through one, or go somewhere at random."""
    i = int(rng.integers(env.num_objects))
    o = env.obj_pos[i].copy()
    mode = rng.choice(["grasp", "push", "free"], p=[0.4, 0.45, 0.15])
    if mode == "grasp":
        return mode, [(o, CLEAR_TRAVEL, -1.0), (o, 0.03, -1.0), (o, 0.03, 1.0), (None, rng.uniform(0.1, 0.4), 1.0)]
    if mode == "push":
        ang = rng.uniform(0, 2 * np.pi)
        u = np.array([np.cos(ang), np.sin(ang)])
        far = np.clip(o + u * rng.uniform(0.15, 0.4), -0.9, 0.9)
        cmd = float(rng.choice([-1.0, 1.0]))
        return mode, [(o - u * (OBJ_R + GRIP_R + 0.06), CLEAR_TRAVEL, cmd), (None, 0.03, cmd), (far, 0.03, cmd)]
    xy = rng.uniform(-0.9, 0.9, 2)
    cmd = env.last_cmd if rng.random() < 0.7 else -env.last_cmd
    return mode, [(xy, rng.uniform(Z_MIN, Z_MAX), cmd)]



def random_episodes(num_episodes: int, steps: int, seed: int = 0, image_size: int = 64, task: str = "tabletop",
                    perturbation: str | None = None, return_stats: bool = False, **env_options):
    """Smooth random play that moves things: frames uint8 (N, steps+1, H, W, 3), actions float32 (N, steps, 7).

    return_stats=True adds a third dict: "moved" (N,) largest object displacement, "grasped" (N,) bool.

    A waypoint follower (grasp / push / free segments, biased towards objects) plus low-pass noise on
    all six motion dims; episodes never stop early (success does not end them).
    """
    env = TableTopEnv(task, image_size=image_size, seed=seed, perturbation=perturbation, max_steps=steps + 1,
                      **env_options)
    frames = np.zeros((num_episodes, steps + 1, image_size, image_size, 3), np.uint8)
    actions = np.zeros((num_episodes, steps, 7), np.float32)
    moved, grasped = np.zeros(num_episodes), np.zeros(num_episodes, bool)
    for n in range(num_episodes):
        rng = np.random.default_rng([seed, n, 17])
        env.reset(seed=int(rng.integers(2**31)))
        # start anywhere above the table (not only at the home pose) so short clips still reach objects
        env.grip[:] = [*rng.uniform(-0.8, 0.8, 2), rng.uniform(0.12, 0.4)]
        env.yaw = float(rng.uniform(-np.pi, np.pi))
        frames[n, 0] = env.render()
        noise, mode = np.zeros(6), "free"
        plan: list = []
        start = env.obj_pos.copy()
        for t in range(steps):
            if not plan:
                mode, plan = _random_waypoint(env, rng)
            xy, z, cmd = plan[0]
            xy = env.grip[:2] if xy is None else xy
            a = np.zeros(7)
            a[:2] = (xy - env.grip[:2]) / env.xy_step
            a[2] = (z - env.grip[2]) / Z_STEP
            a[6] = cmd
            reached = np.linalg.norm(xy - env.grip[:2]) < 0.03 and abs(z - env.grip[2]) < 0.03
            if reached and (cmd > 0) == (env.opening < 0.5):  # position reached and gripper settled
                plan.pop(0)
            noise = 0.8 * noise + rng.normal(0.0, 0.25, 6)
            a[:6] += noise * (0.5 if mode != "free" else 1.0)
            a = np.clip(a, -1.0, 1.0)
            if mode == "free" and rng.random() < 0.05:  # cut some free segments short so motions stay varied
                plan = []
            actions[n, t] = a
            frames[n, t + 1] = env.step(a)[0]["image"]
            grasped[n] |= env.held >= 0
        moved[n] = np.linalg.norm(env.obj_pos - start, axis=1).max()
    if return_stats:
        return frames, actions, {"moved": moved, "grasped": grasped}
    return frames, actions
