"""`vla-rft rft`'s config and the hash a resumed run must match (see rl/rft.py)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..config import ConfigError, flat_dict, to_dict
from .. import distributed as du
from .grpo import GRPOConfig
from .rewards import RewardConfig

RUNTIME_KEYS = {"out_dir", "stop_at", "log_every", "ckpt_every", "image_every", "resume", "progress", "device",
                "grpo.steps", "profile", "max_flat_steps"}  # may change between a run and its resume
CKPT_FORMAT = "vla-rft-rft/1"


@dataclass
class RFTConfig:
    out_dir: str = "runs/rft"
    world_model: str = ""          # world dir (vla-rft pretrain-wm -> out_dir/world_model): HF weights + tokenizer
    tokenizer: str = ""            # "" = the world dir's own copy; else a tokenizer dir (checked against it)
    policy: str = ""               # SFT checkpoint (vla-rft sft -> out_dir/ckpt.pt)
    demos: str = ""                # demos file (load_demos format)
    segments: str = ""             # segments file: its action_ranges are the WM's discretizer
    action_ranges: str = ""        # or an ActionDiscretizer json (default: WORLD_MODEL/action_ranges.json)
    seed: int = 0
    sigma_init: float = 0.0        # > 0: restart the Sigma Net at this std (normalised units); 0: the checkpoint's
    sigma_min: float = 0.0         # > 0 with sigma_max: new Sigma Net bounds (release 0.08-0.2; then sigma_init
    sigma_max: float = 0.0         # 0 = their geometric mean, ~0.13); 0: the checkpoint's
    states_per_block: int = 1      # start states per RNG stream / WM call; must divide S / world_size
    wm_temperature: float = 1.0    # release
    wm_top_p: float = 0.8          # release
    wm_top_k: int = 0              # release: off
    wm_guidance: float = 0.0       # > 0: action guidance (engine/rollout.py; a world model trained with
                                   # action_dropout); 0: the paper's plain conditional rollout
    wm_dtype: str = "auto"         # auto: bf16 on CUDA, fp32 on the CPU
    wm_attn_backend: str = ""      # "" = the model's default (auto: triton on CUDA, the CPU decode path on CPU)
    noise_rows: int = 2            # extra rollouts re-sampling chunk 0: the reward std they show is world-model
                                   # noise, logged beside the in-group std (signal/*); 0 = off
    weight_decay: float = 0.0      # AdamW, action head and Sigma Net (release 0.01 for both)
    max_flat_steps: int = 5        # stop after this many steps in a row with equal rewards in every group (0: never)
    stop_at: int = 0               # > 0: stop (checkpointed) after this step, as if interrupted
    log_every: int = 1
    ckpt_every: int = 50
    image_every: int = 25          # PNG: reference rollout beside the best and worst sampled rollouts
    resume: bool = True
    progress: bool = True
    profile: bool = False          # time each phase (syncs CUDA around it: for Nsight / benches, not production)
    device: str = "auto"
    distributed: str = "ddp"       # ddp | fsdp2 (multi-process only)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> None:
        try:
            self.grpo.validate()
            self.reward.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if (self.sigma_min > 0) != (self.sigma_max > 0) or 0 < self.sigma_max <= self.sigma_min:
            raise ConfigError(f"sigma_min and sigma_max: set both (0 < sigma_min < sigma_max) or neither, got "
                              f"{self.sigma_min}, {self.sigma_max}")
        if self.sigma_min > 0 and self.sigma_init > 0 and not self.sigma_min < self.sigma_init < self.sigma_max:
            raise ConfigError(f"sigma_init={self.sigma_init} must lie inside (sigma_min, sigma_max) = "
                              f"({self.sigma_min}, {self.sigma_max})")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.noise_rows < 0:
            raise ConfigError(f"noise_rows must be >= 0, got {self.noise_rows}")
        if self.states_per_block < 1:
            raise ConfigError(f"states_per_block must be >= 1, got {self.states_per_block}")
        if self.wm_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"wm_dtype must be auto/fp32/bf16/fp16, got {self.wm_dtype!r}")
        if self.distributed not in du.WRAPS:
            raise ConfigError(f"distributed must be one of {du.WRAPS}, got {self.distributed!r}")
        if not self.wm_guidance >= 0:
            raise ConfigError(f"wm_guidance must be >= 0 (0 = off), got {self.wm_guidance}")
        if not 0 < self.wm_top_p <= 1 or self.wm_temperature < 0:
            raise ConfigError("wm_top_p must be in (0, 1] and wm_temperature >= 0")


def hashed_fields(cfg: RFTConfig) -> dict:
    """The settings that shape the run (flattened); a resume must match them."""
    return {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in RUNTIME_KEYS}


def config_hash(cfg: RFTConfig) -> str:
    return hashlib.sha256(json.dumps(hashed_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
