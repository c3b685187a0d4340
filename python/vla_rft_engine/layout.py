"""The authors' world-model token layout (REFERENCE.md), in one place.

Vocabulary (paper sizes): dynamics codes [0, 4375) | context codes [4375, 8750) |
action bins [8750, 9006) | BOS 9006 | EOS 9007 (pad = EOS).
Segment: [context tokens of frame 0] then per step [dynamics tokens of frame t][action tokens of a_t].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .utils import atomic_write_text


@dataclass(frozen=True)
class TokenLayout:
    num_codes: int = 4375  # FSQ codes per token kind (levels 7,5,5,5,5)
    num_action_bins: int = 256
    action_dim: int = 7
    context_tokens: int = 1024  # 32x32
    dynamics_tokens: int = 64  # 8x8 per frame

    @property
    def dynamics_offset(self) -> int:
        return 0

    @property
    def context_offset(self) -> int:
        return self.num_codes

    @property
    def action_offset(self) -> int:
        return 2 * self.num_codes

    @property
    def bos_id(self) -> int:
        return self.action_offset + self.num_action_bins

    @property
    def eos_id(self) -> int:
        return self.bos_id + 1

    @property
    def pad_id(self) -> int:
        return self.eos_id

    @property
    def null_action_id(self) -> int:
        """Stands in for every action token of a sequence trained without its actions (action dropout) and of the
        unconditional rows of an action-guided rollout; the pad id, which the data never holds."""
        return self.pad_id

    @property
    def vocab_size(self) -> int:
        return self.eos_id + 1

    @property
    def frame_step_tokens(self) -> int:
        """Tokens one rollout step adds: a generated frame plus its action."""
        return self.dynamics_tokens + self.action_dim

    @property
    def prompt_tokens(self) -> int:
        """Context frame + first dynamics frame + its action (1095 at paper sizes)."""
        return self.context_tokens + self.dynamics_tokens + self.action_dim

    # --- id conversions (validated: an id outside its range is a bug upstream) ---
    def dynamics_to_vocab(self, codes: torch.Tensor) -> torch.Tensor:
        _check_range(codes, 0, self.num_codes, "dynamics code")
        return codes + self.dynamics_offset

    def context_to_vocab(self, codes: torch.Tensor) -> torch.Tensor:
        _check_range(codes, 0, self.num_codes, "context code")
        return codes + self.context_offset

    def vocab_to_dynamics(self, ids: torch.Tensor) -> torch.Tensor:
        _check_range(ids, self.dynamics_offset, self.dynamics_offset + self.num_codes, "dynamics token id")
        return ids - self.dynamics_offset

    def vocab_to_context(self, ids: torch.Tensor) -> torch.Tensor:
        _check_range(ids, self.context_offset, self.context_offset + self.num_codes, "context token id")
        return ids - self.context_offset

    def bins_to_vocab(self, bins: torch.Tensor) -> torch.Tensor:
        _check_range(bins, 0, self.num_action_bins, "action bin")
        return bins + self.action_offset

    def vocab_to_bins(self, ids: torch.Tensor) -> torch.Tensor:
        _check_range(ids, self.action_offset, self.action_offset + self.num_action_bins, "action token id")
        return ids - self.action_offset

    def build_segment(self, context_codes: torch.Tensor, dynamics_codes: torch.Tensor,
                      action_bins: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of one or a batch of segments.

        context_codes (..., Nc), dynamics_codes (..., T, Nd), action_bins (..., T, A) or (..., T-1, A)
        (the last frame may come without its action). Returns (..., Nc + T*Nd + T'*A).
        """
        if context_codes.shape[-1] != self.context_tokens:
            raise ValueError(f"context_codes has {context_codes.shape[-1]} tokens per frame, layout expects {self.context_tokens}")
        if dynamics_codes.shape[-1] != self.dynamics_tokens:
            raise ValueError(f"dynamics_codes has {dynamics_codes.shape[-1]} tokens per frame, layout expects {self.dynamics_tokens}")
        if action_bins.shape[-1] != self.action_dim:
            raise ValueError(f"action_bins has {action_bins.shape[-1]} dims, layout expects {self.action_dim}")
        T, Ta = dynamics_codes.shape[-2], action_bins.shape[-2]
        if Ta not in (T, T - 1):
            raise ValueError(f"{T} frames need {T} or {T - 1} actions, got {Ta}")
        ctx = self.context_to_vocab(context_codes)
        dyn = self.dynamics_to_vocab(dynamics_codes)
        act = self.bins_to_vocab(action_bins)
        parts = [ctx]
        for t in range(T):
            parts.append(dyn[..., t, :])
            if t < Ta:
                parts.append(act[..., t, :])
        return torch.cat(parts, dim=-1)


PAPER_LAYOUT = TokenLayout()


def _check_range(x: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if x.numel() == 0:
        return
    mn, mx = int(x.min()), int(x.max())
    if mn < lo or mx >= hi:
        raise ValueError(f"{what} out of range: got values in [{mn}, {mx}], valid range is [{lo}, {hi})")


class ActionDiscretizer:
    """Per-dimension [min, max] -> 256 bins, as the authors tokenize actions.

    bin = clip(floor((clip(a, lo, hi) - lo) / (hi - lo) * bins), 0, bins - 1); inverse gives bin centres.
    """

    def __init__(self, low, high, num_bins: int = 256):
        self.low = torch.as_tensor(low, dtype=torch.float64).flatten()
        self.high = torch.as_tensor(high, dtype=torch.float64).flatten()
        if self.low.shape != self.high.shape:
            raise ValueError(f"action low {tuple(self.low.shape)} and high {tuple(self.high.shape)} differ in shape")
        if not torch.all(self.high >= self.low):
            raise ValueError(f"action range has high < low in dims {torch.nonzero(self.high < self.low).flatten().tolist()}")
        self.num_bins = num_bins

    @property
    def action_dim(self) -> int:
        return self.low.numel()

    @classmethod
    def from_dataset(cls, actions: torch.Tensor, num_bins: int = 256) -> "ActionDiscretizer":
        a = torch.as_tensor(actions).reshape(-1, actions.shape[-1]).double()
        if not torch.isfinite(a).all():
            raise ValueError("dataset actions contain NaN/Inf; clean the dataset before computing action ranges")
        return cls(a.min(0).values, a.max(0).values, num_bins)

    def _check(self, actions: torch.Tensor) -> None:
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions have {actions.shape[-1]} dims, the discretizer was fit on {self.action_dim}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN/Inf; the policy or dataset produced invalid actions")

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Continuous (..., A) -> bins (..., A) in [0, num_bins)."""
        self._check(actions)
        lo, hi = self.low.to(actions.device), self.high.to(actions.device)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        x = (actions.double().clamp(min=lo, max=hi) - lo) / span
        return torch.floor(x * self.num_bins).clamp(0, self.num_bins - 1).long()

    def decode(self, bins: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        _check_range(bins, 0, self.num_bins, "action bin")
        lo, hi = self.low.to(bins.device), self.high.to(bins.device)
        return ((bins.double() + 0.5) / self.num_bins * (hi - lo) + lo).to(dtype)

    def state_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist(), "num_bins": self.num_bins}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.state_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ActionDiscretizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"action ranges file {path} not found; it is written beside the model when the dataset is tokenized")
        try:
            d = json.loads(path.read_text())
            return cls(d["low"], d["high"], d.get("num_bins", 256))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"action ranges file {path} is corrupt ({e}); re-create it from the dataset") from e
