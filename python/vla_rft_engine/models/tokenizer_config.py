"""The visual tokenizer's settings (models/tokenizer.py), importable without torch so the CLI checks them fast."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..layout import TokenLayout


@dataclass
class TokenizerConfig:
    image_size: int = 64
    downsample: int = 4  # latent grid = image_size / downsample (paper: 256 / 8 = 32)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # per resolution, full -> latent
    latent_channels: int = 64  # C of the projected latent grid
    dyn_patch: int = 2  # p: dynamics token = p x p latent cells (paper: 4)
    quantizer: str = "fsq"  # "fsq" | "vq"
    levels: list[int] = field(default_factory=lambda: [7, 5, 5, 5, 5])
    vq_codes: int = 4375
    vq_dim: int = 8

    def validate(self) -> None:
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"tokenizer quantizer must be 'fsq' or 'vq', got {self.quantizer!r}")
        n_down = len(self.channels) - 1
        if 2**n_down != self.downsample:
            raise ValueError(f"downsample={self.downsample} needs {self.downsample.bit_length()} channel entries "
                             f"(one per resolution), got channels={self.channels}")
        if self.image_size % self.downsample or self.latent_grid % self.dyn_patch:
            raise ValueError(f"image_size {self.image_size} / downsample {self.downsample} = {self.latent_grid} "
                             f"must be divisible by dyn_patch {self.dyn_patch}")

    @property
    def latent_grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_codes(self) -> int:
        if self.quantizer == "fsq":
            n = 1
            for L in self.levels:
                n *= L
            return n
        return self.vq_codes

    @property
    def code_dim(self) -> int:
        return len(self.levels) if self.quantizer == "fsq" else self.vq_dim

    def layout(self, action_dim: int = 7, num_action_bins: int = 256) -> "TokenLayout":
        from ..layout import TokenLayout
        g, p = self.latent_grid, self.dyn_patch
        return TokenLayout(num_codes=self.num_codes, num_action_bins=num_action_bins, action_dim=action_dim,
                           context_tokens=g * g, dynamics_tokens=(g // p) ** 2)
