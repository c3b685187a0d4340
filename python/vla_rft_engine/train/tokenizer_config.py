"""`vla-rft pretrain-tokenizer` settings (train/tokenizer.py), importable without torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models.tokenizer_config import TokenizerConfig


@dataclass
class TokenizerTrainConfig:
    out_dir: str = "runs/tokenizer"
    data: str = "builtin"  # "builtin" (procedural scenes) | demos/frames file (.pt/.npz/.npy) | folder of episode folders
    builtin_episodes: int = 160
    builtin_steps: int = 32
    heldout_fraction: float = 0.02  # paper's held-out split: 1/50
    steps: int = 800
    batch_size: int = 8
    frames_per_context: int = 2
    max_offset: int = 8
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 0.5
    motion_weight: float = 20.0  # dynamics frames: pixels that differ from the context frame weigh 1 + this
    lpips_weight: float = 0.1  # used only when LPIPS weights are on disk
    lpips_net: str = "alex"
    eval_every: int = 200
    eval_pairs: int = 256
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        self.model.validate()
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.batch_size < 1 or self.frames_per_context < 1 or self.steps < 0:
            raise ValueError("batch_size and frames_per_context must be >= 1 and steps >= 0")


# ------------------------------------------------------------------------------------------------ data
