"""`vla-rft pretrain-wm` settings (train/world_model.py), importable without torch."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import WRAPS, ConfigError


@dataclass
class WMTrainConfig:
    segments: str = ""  # torch file from data.segments.build_segments
    demos: str = ""  # or: a demos file (data.demos.save_demos) ...
    tokenizer: str = ""  # ... tokenized with this tokenizer dir (vla-rft pretrain-tokenizer)
    segment_frames: int = 9  # prompt frame + 8 generated frames (the paper's rollout length)
    segment_stride: int = 4
    out_dir: str = "runs/world_model"
    preset: str = "small"  # paper | small | tiny (ignored when init is set)
    init: str = ""  # optional HF LlamaForCausalLM directory to start from
    steps: int = 1000  # paper: 150k
    batch_size: int = 16  # paper: 16
    lr: float = 5e-5  # paper
    schedule: str = "constant"  # constant (paper) | cosine: linear warm-up, then cosine down to min_lr
    min_lr: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    change_weight: float = 0.0  # > 0: tokens that change from the previous frame weigh 1 + this (0: Eq. 3 MLE)
    action_dropout: float = 0.0  # > 0: this fraction of segments trains with every action token replaced by the
                                 # null id, so the model also learns p(frames | no actions) for action guidance
    action_cond: bool = False  # WorldModelConfig.action_cond: actions also enter as a projection (from scratch only)
    action_cond_sum: bool = False  # with action_cond: the projection also sees the sum of the actions so far
    structured_init: bool = True  # from scratch: code/action embeddings start from their FSQ digits / bin values
    distributed: str = "ddp"  # ddp | fsdp2 (torchrun, more than one process; fsdp2 shards weights + Adam state)
    dtype: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    log_every: int = 10
    ckpt_every: int = 200
    resume: bool = True
    progress: bool = True
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.segments and not (self.demos and self.tokenizer):
            raise ConfigError("pretrain-wm needs segments=<file> (data.segments.build_segments), or demos=<file> "
                              "tokenizer=<dir> to tokenize demos here")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("steps, batch_size must be >= 1 and lr > 0")
        if self.action_cond_sum and not self.action_cond:
            raise ConfigError("action_cond_sum=true needs action_cond=true (it adds to that projection's input)")
        if not 0 <= self.action_dropout < 1:
            raise ConfigError(f"action_dropout must be in [0, 1), got {self.action_dropout}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.distributed not in WRAPS:
            raise ConfigError(f"distributed must be one of {WRAPS}, got {self.distributed!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
