"""Stage II inputs: the Stage I checkpoints (tokenizer, world model, action ranges, SFT policy) and the
start-state pool drawn from the demos.

A start state is (episode e, step t) with t before the episode was solved: the frame o_t, the instruction,
the proprio s_t, the dataset chunk a_{t:t+C} (the reference actions, padded with the episode's last action
past its end) and the dataset frames o_{t+1..t+C} (R2's target, padded with the last frame).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# what writes each stage's file (named in the errors when one is missing)
MAKES = {
    "tokenizer": "vla-rft pretrain-tokenizer out_dir=DIR (writes DIR/tokenizer.safetensors)",
    "world_model": "vla-rft pretrain-wm segments=FILE out_dir=DIR (writes DIR/world_model/config.json + weights)",
    "policy": "vla-rft sft out_dir=DIR (writes DIR/ckpt.pt)",
    "demos": "vla-rft sft data=builtin out_dir=DIR (caches DIR/demos.pt) or data.demos.save_demos(collect_demos(...))",
    "action_ranges": ("data.segments.build_segments (the segments file holds action_ranges; pass segments=FILE) "
                      "or ActionDiscretizer.save(WM_DIR/action_ranges.json)"),
}


def require(path: str, what: str, kind: str = "file") -> Path:
    p = Path(path) if path else None
    if p is None or not (p.is_dir() if kind == "dir" else p.exists()):
        raise FileNotFoundError(f"RFT needs the {what} checkpoint but {path or '(unset)'} does not exist; "
                                f"make it with: {MAKES[what]}")
    return p


def load_world(cfg, device, dtype: torch.dtype):
    """The LearnedWorld of an RFT config: world dir, its tokenizer (or cfg.tokenizer), its action ranges (or
    cfg.action_ranges, or the segments file's)."""
    from ..layout import ActionDiscretizer
    from ..models.world import LearnedWorld
    from ..utils import load_checkpoint
    p = require(cfg.world_model, "world_model", "dir")
    tok = require(cfg.tokenizer, "tokenizer") if cfg.tokenizer else None
    ranges = cfg.action_ranges or None
    if ranges is None and not (p / "action_ranges.json").is_file() and not (p / "world.json").is_file():
        if not cfg.segments:
            raise FileNotFoundError("RFT needs the world model's action ranges (the discretizer its action tokens "
                                    f"were made with): set action_ranges=FILE.json or segments=FILE; made by "
                                    f"{MAKES['action_ranges']}")
        seg = load_checkpoint(require(cfg.segments, "action_ranges"), "tokenized segments file")
        if "action_ranges" not in seg:
            raise ValueError(f"{cfg.segments} has no action_ranges; rebuild it with data.segments.build_segments")
        ranges = ActionDiscretizer(**seg["action_ranges"])
    return LearnedWorld.load(p, tokenizer=tok, action_ranges=ranges, device=device, dtype=dtype,
                             attn_backend=cfg.wm_attn_backend or None)


def load_sft_policy(path: str, device):
    from ..train.sft import load_policy
    return load_policy(require(path, "policy"), device)


class StartStates:
    """The pool of start states of a demos dict (load_demos / collect_demos format)."""

    def __init__(self, demos: dict, chunk_len: int, image_size: int):
        for k in ("frames", "actions", "proprio", "instructions"):
            if k not in demos:
                raise ValueError(f"demos lack '{k}' (expected the collect_demos / load_demos format)")
        self.frames = torch.as_tensor(np.asarray(demos["frames"]))  # (E, T+1, H, W, 3) uint8
        acts = torch.as_tensor(np.asarray(demos["actions"], dtype=np.float32))  # (E, T, A)
        self.proprio = torch.as_tensor(np.asarray(demos["proprio"], dtype=np.float32))
        self.instructions = list(demos["instructions"])
        E, T, A = acts.shape
        if not torch.isfinite(acts).all() or not torch.isfinite(self.proprio).all():
            raise ValueError("demos hold NaN/Inf actions or proprio")
        C = chunk_len
        self.chunks = torch.cat([acts, acts[:, -1:].expand(E, C - 1, A)], 1).unfold(1, C, 1).permute(0, 1, 3, 2)
        lengths = np.asarray(demos.get("lengths", np.full(E, T)))
        # before success only: after it the expert idles and every action is a no-op
        self.index = torch.tensor([(e, t) for e in range(E) for t in range(max(1, min(T, int(lengths[e]))))])
        self.C, self.image_size, self.T = C, image_size, T

    def __len__(self) -> int:
        return len(self.index)

    def _frames(self, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.frames[e, t].permute(0, 3, 1, 2).float() / 255.0  # (b, 3, H, W)
        if x.shape[-1] != self.image_size:  # demos at another size than the tokenizer
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.clamp(0, 1)

    def get(self, idx: torch.Tensor) -> dict:
        """Start states by pool index: policy_image (b, H, W, 3) uint8 as the demos hold it, image (b, 3, S, S)
        in [0, 1] at the tokenizer's size, instruction list, proprio (b, P), ref_actions (b, C, A) raw,
        next_frames (b, C, 3, S, S) (o_{t+1..t+C}, R2's target)."""
        e, t = self.index[idx].unbind(1)
        nxt = (t[:, None] + torch.arange(1, self.C + 1)).clamp(max=self.T)
        b = len(idx)
        return {"policy_image": self.frames[e, t], "image": self._frames(e, t), "instruction": [self.instructions[i] for i in e.tolist()],
                "proprio": self.proprio[e, t], "ref_actions": self.chunks[e, t],
                "next_frames": self._frames(e[:, None].expand_as(nxt).flatten(), nxt.flatten()).view(
                    b, self.C, 3, self.image_size, self.image_size)}
