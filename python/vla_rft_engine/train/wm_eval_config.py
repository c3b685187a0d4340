"""`vla-rft wm-eval` settings (train/wm_eval.py), importable without torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError


@dataclass
class WMEvalConfig:
    wm: str = ""  # world dir (pretrain-wm writes out_dir/world_model): HF weights + tokenizer copy + manifest
    tokenizer: str = ""  # "" = the world dir's own copy
    demos: str = ""
    action_ranges: str = ""  # "" = the world dir's own
    out_dir: str = "runs/wm_eval"
    frames: int = 8
    episodes: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    swap: bool = True  # also roll out under another episode's actions (action-sensitivity)
    guidance: float = 0.0  # action guidance scale (engine/rollout.py); needs a world model trained with action_dropout
    strip_episodes: int = 4
    response_scales: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])  # raw action units
    response_chunks: int = 8  # chunks per scale and episode for the reward response (0: skip it)
    device: str = "auto"

    def validate(self) -> None:
        for k in ("wm", "demos"):
            if not getattr(self, k):
                raise ConfigError(f"wm-eval needs {k}=<path>")
        if self.frames < 1 or self.episodes < 1:
            raise ConfigError("frames and episodes must be >= 1")
        if self.response_chunks == 1 or self.response_chunks < 0 or any(not s > 0 for s in self.response_scales):
            raise ConfigError("response_chunks must be 0 (off) or >= 2 (a ranking needs two chunks) and every "
                              "response_scales value > 0")
