"""Stage II settings: `vla-rft rft`'s config with its GRPO (rl/grpo.py) and verified-reward (rl/rewards.py)
parts, and the hash a resumed run must match (see rl/rft.py). No torch import: the CLI checks them fast."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..config import WRAPS, ConfigError, flat_dict, to_dict

RUNTIME_KEYS = {"out_dir", "stop_at", "log_every", "ckpt_every", "image_every", "resume", "progress", "device",
                "grpo.steps", "profile", "max_flat_steps"}  # may change between a run and its resume
CKPT_FORMAT = "vla-rft-rft/1"
POLICY_LOSSES = ("clip", "ppo")
RATIO_LEVELS = ("rollout", "element")
KL_ESTIMATORS = ("k3", "k1")
DESIGNS = ("r1", "r2", "r3")
AGGREGATIONS = ("sum", "mean", "last", "discount")
PIXEL_LOSSES = ("l1", "mse")


@dataclass
class GRPOConfig:
    lr: float = 1e-6                 # Table 7, action head
    sigma_lr: float = 1e-5           # Table 7, Sigma Net
    mse_coef: float = 0.01           # Table 7, lambda_mse
    entropy_coef: float = 0.003      # Table 7, alpha
    steps: int = 400                 # Table 7
    task_instances: int = 16         # Table 7 batch size (start states S per step)
    rollouts: int = 16               # Table 7 rollout times (group size N)
    clip_eps: float = 0.2            # release (paper: symbol only)
    policy_loss: str = "clip"        # "clip": Eq. 13 as written; "ppo": the release's min form
    clip_ratio_c: float | None = 0.0  # > 1: dual-clip PPO for Adv < 0 (release 3); 0 / null: off (Eq. 13)
    ratio_level: str = "rollout"     # rollout: Eq. 9 per rollout; element: ratio and entropy per action element (release)
    normalize_adv_std: bool = False  # False: Eq. 12; True: the release's std-normalised GRPO
    adv_eps: float = 1e-6            # release
    mse_kl_gate: bool = False        # True: the release's KL-gated MSE weight
    mse_kl_low: float = 0.0          # release
    mse_kl_high: float = 0.2         # release
    mse_kl_estimator: str = "k3"     # KL that gates the MSE: k3 (unbiased, >= 0); k1 = mean(old - new) (release)
    ppo_epochs: int = 1              # release (verl default)
    minibatches: int = 1             # release: ppo_mini_batch_size 16 == train batch 16
    warmup_steps: int = 10           # release: lr_warmup_steps=10 (linear, then constant)
    warmup_sigma: bool = True        # the Sigma Net's lr warms up too; false: the action head's only (release)
    grad_clip: float = 1.0           # release (verl default)
    weight_decay: float = 0.0        # AdamW, action head (release 0.01)
    sigma_weight_decay: float = 0.0  # AdamW, Sigma Net (release 0.01)
    logprob_reduce: str = "mean"     # Eq. 8 (the release sums over steps)

    def validate(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"grpo.policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if self.logprob_reduce not in ("mean", "sum"):
            raise ValueError(f"grpo.logprob_reduce must be 'mean' or 'sum', got {self.logprob_reduce!r}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"grpo.ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if self.mse_kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"grpo.mse_kl_estimator must be one of {KL_ESTIMATORS}, got {self.mse_kl_estimator!r}")
        if self.clip_ratio_c and not self.clip_ratio_c > 1:
            raise ValueError(f"grpo.clip_ratio_c must be > 1 (dual-clip PPO) or 0 / null (off), got {self.clip_ratio_c}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"grpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.rollouts < 2:
            raise ValueError(f"GRPO needs N >= 2 rollouts per group, got rollouts={self.rollouts}")
        if self.mse_kl_high <= self.mse_kl_low:
            raise ValueError(f"mse_kl_high ({self.mse_kl_high}) must exceed mse_kl_low ({self.mse_kl_low})")
        if self.weight_decay < 0 or self.sigma_weight_decay < 0:
            raise ValueError(f"grpo.weight_decay and grpo.sigma_weight_decay must be >= 0, got {self.weight_decay}, "
                             f"{self.sigma_weight_decay}")
        for name in ("ppo_epochs", "minibatches", "steps", "task_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RewardConfig:
    design: str = "r3"            # paper's method (Table 4)
    lambda_1: float = 1.0         # paper: symbol only; release LIBERO script: loss_weight.mae=1
    lambda_lp: float = 1.0        # paper: symbol only; release LIBERO script: loss_weight.lpips=1
    pixel_loss: str = "l1"        # Eq. 11; release: loss_weight.mse=0
    lpips_net: str = "alex"       # lpips package default
    aggregation: str = "sum"      # Eq. 11; the release's LIBERO script sets mean
    gamma: float = 0.95           # release LIBERO script (msp_reward_discount)
    allow_l1_only_fallback: bool = False  # missing LPIPS weights: error unless this is set
    lpips_backbone_path: str | None = None
    lpips_heads_path: str | None = None

    def validate(self) -> None:
        for name, val, ok in (("design", self.design, DESIGNS), ("aggregation", self.aggregation, AGGREGATIONS),
                              ("pixel_loss", self.pixel_loss, PIXEL_LOSSES), ("lpips_net", self.lpips_net,
                                                                              ("alex", "vgg"))):
            if val not in ok:
                raise ValueError(f"reward.{name} must be one of {ok}, got {val!r}")
        if self.lambda_1 < 0 or self.lambda_lp < 0:
            raise ValueError(f"reward weights must be >= 0, got lambda_1={self.lambda_1}, lambda_lp={self.lambda_lp}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"reward.gamma must be in (0, 1], got {self.gamma}")


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
    # the Sigma Net is Stage II's (SFT does not train it): a run starts it at sigma_init for every input, within
    # [sigma_min, sigma_max] (normalised action units); the release uses 0.08-0.2
    sigma_min: float = 0.01
    sigma_max: float = 0.5
    sigma_init: float = 0.02       # 0: the bounds' geometric mean (the release's zero-output start, ~0.13 there)
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
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"sigma_min and sigma_max need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                              f"{self.sigma_max}")
        if self.sigma_init != 0 and not self.sigma_min < self.sigma_init < self.sigma_max:
            raise ConfigError(f"sigma_init={self.sigma_init} must lie inside (sigma_min, sigma_max) = "
                              f"({self.sigma_min}, {self.sigma_max})")
        if self.noise_rows < 0:
            raise ConfigError(f"noise_rows must be >= 0, got {self.noise_rows}")
        if self.states_per_block < 1:
            raise ConfigError(f"states_per_block must be >= 1, got {self.states_per_block}")
        if self.wm_dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"wm_dtype must be auto/fp32/bf16/fp16, got {self.wm_dtype!r}")
        if self.distributed not in WRAPS:
            raise ConfigError(f"distributed must be one of {WRAPS}, got {self.distributed!r}")
        if not self.wm_guidance >= 0:
            raise ConfigError(f"wm_guidance must be >= 0 (0 = off), got {self.wm_guidance}")
        if not 0 < self.wm_top_p <= 1 or self.wm_temperature < 0:
            raise ConfigError("wm_top_p must be in (0, 1] and wm_temperature >= 0")


def hashed_fields(cfg: RFTConfig) -> dict:
    """The settings that shape the run (flattened); a resume must match them."""
    return {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in RUNTIME_KEYS}


def config_hash(cfg: RFTConfig) -> str:
    return hashlib.sha256(json.dumps(hashed_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
