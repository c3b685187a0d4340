"""`vla-rft eval` settings (eval_libero.py), importable without torch: a policy in LIBERO over the official
initial states (Table 2) and the paper's perturbation suites (Table 3 / Table 8)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError

N_INITS = 50  # official initial states per LIBERO task


@dataclass
class EvalConfig:
    policy: str = ""               # policy.safetensors, the sft / rft out_dir holding it, or a ckpt.pt
    suite: str = "libero_object"   # libero_spatial | libero_object | libero_goal | libero_10 (libero_long)
    tasks: list[str] = field(default_factory=list)     # task indices or names in the suite; [] = all 10
    settings: list[str] = field(default_factory=list)  # [] = none + the suite's pair (Table 3: object/goal/robot/all_*)
    inits: int = N_INITS           # official initial states per task and setting (the first N)
    workers: int = 2               # parallel processes, one env each
    image_size: int = 0            # camera frames; 0 = the size the policy was trained on (128 when unrecorded)
    max_steps: int = 0             # per episode; 0 = the suite's limit (220 / 280 / 300 / 520)
    seed: int = 0                  # the policy's ODE start noise
    strip_episodes: int = 2        # per setting: episodes drawn in episodes.png
    strip_frames: int = 8          # frames per episode in episodes.png
    out_dir: str = "runs/eval"
    progress: bool = True

    def validate(self) -> None:
        from .envs.libero_env import SUITES  # numpy only
        from .envs.libero_perturb import MAGNITUDES
        if not self.policy:
            raise ConfigError("eval needs policy=<policy.safetensors | sft/rft out_dir | ckpt.pt>")
        if self.suite not in SUITES:
            raise ConfigError(f"unknown LIBERO suite {self.suite!r}; valid: {sorted(SUITES)}")
        bad = [s for s in self.settings if s not in MAGNITUDES]
        if bad:
            raise ConfigError(f"unknown setting(s) {bad}; valid: {list(MAGNITUDES)}")
        if not 1 <= self.inits <= N_INITS:
            raise ConfigError(f"inits must be in 1..{N_INITS} (official initial states per task), got {self.inits}")
        if self.workers < 1 or self.max_steps < 0 or self.strip_episodes < 0 or self.strip_frames < 1:
            raise ConfigError("workers and strip_frames must be >= 1, max_steps and strip_episodes >= 0")
        if self.image_size and not 16 <= self.image_size <= 512:
            raise ConfigError(f"image_size must be 0 (the policy's) or in 16..512, got {self.image_size}")
