"""`vla-rft sft` settings (train/sft.py), importable without torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import WRAPS, ConfigError
from ..models.policy_config import FLOW_TAU, PolicyConfig

SIGMA_KEYS = ("sigma_min", "sigma_max", "sigma_init")  # owned by vla-rft rft


@dataclass
class SFTConfig:
    out_dir: str = "runs/sft"
    data: str = "builtin"          # builtin | synthetic | path to a demos file
    task: str = "reach"            # builtin: a TASKS family or suite name
    num_episodes: int = 40
    image_size: int = 64
    expert_noise: float = 0.0      # builtin: N(0, noise^2) on the expert's motion dims (state coverage)
    data_seed: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    steps: int = 1500
    stop_at: int = 0               # > 0: stop (checkpointed) after this step, as if interrupted
    batch_size: int = 64
    lr: float = 3e-4
    readout_lr_mult: float = 10.0  # small encoder v2: lr multiplier of the colour-query readout (see readout_parameters)
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    tau_alpha: float = FLOW_TAU[0]  # tau ~ Beta(1, 1.5): pi0's noise-heavy weighting (see policy.flow_loss); RFT's
    tau_beta: float = FLOW_TAU[1]   # flow MSE draws tau from the same law (the checkpoint carries it)
    log_every: int = 10
    eval_every: int = 250
    eval_max: int = 512            # val samples per evaluation
    ckpt_every: int = 250
    resume: bool = True
    progress: bool = True
    device: str = "auto"
    distributed: str = "ddp"       # ddp | fsdp2 (torchrun, more than one process; fsdp2 shards what SFT trains + Adam state)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.distributed not in WRAPS:
            raise ConfigError(f"distributed must be one of {WRAPS}, got {self.distributed!r}")
        if self.tau_alpha <= 0 or self.tau_beta <= 0:
            raise ConfigError("tau_alpha and tau_beta must be > 0")
        fresh = PolicyConfig()
        if any(getattr(self.policy, k) != getattr(fresh, k) for k in SIGMA_KEYS):
            raise ConfigError("policy.sigma_min / sigma_max / sigma_init are Stage II's (SFT does not train the Sigma "
                              "Net): set sigma_min / sigma_max / sigma_init in vla-rft rft")
        try:
            self.policy.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


# ---- data ---------------------------------------------------------------------------------------
