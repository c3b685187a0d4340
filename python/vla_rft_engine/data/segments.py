"""Tokenized world-model training segments (Eq. 3) from demos + visual tokenizer + action discretizer.

Segment of K frames starting at frame s: [context tokens of o_s] then per step t = s..s+K-1:
[dynamics tokens of o_t][action tokens of a_t] (the last frame has no action). The first dynamics frame
is the start frame itself, so a rollout prompt is ctx(o_s) + dyn(o_s) + a_s (1095 tokens at paper sizes).
loss_mask marks the tokens the model learns to predict: the dynamics tokens of frames s+1.. (the generated
ones); context, the prompt frame and action tokens are conditioning only.
File: torch dict {ids LongTensor (M, L), loss_mask BoolTensor (M, L), layout dict, action_ranges dict}.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from ..layout import ActionDiscretizer, TokenLayout
from ..utils import atomic_save, load_checkpoint


def segment_loss_mask(layout: TokenLayout, frames: int) -> torch.Tensor:
    parts = [torch.zeros(layout.context_tokens, dtype=torch.bool)]
    for t in range(frames):
        parts.append(torch.full((layout.dynamics_tokens,), t > 0))
        if t < frames - 1:
            parts.append(torch.zeros(layout.action_dim, dtype=torch.bool))
    return torch.cat(parts)


@torch.no_grad()
def build_segments(demos: dict, tok, discretizer: ActionDiscretizer, frames: int = 8, stride: int = 4,
                   batch: int = 64, device="cpu", idle_tail: bool = False) -> dict:
    """idle_tail=False: no segment starts after the step an episode was solved (demos' `lengths`); the
    no-op tail after success is a still image, and a few segments reaching into it are enough."""
    layout: TokenLayout = tok.layout
    video = torch.as_tensor(demos["frames"])  # (N, T+1, H, W, 3) uint8
    actions = torch.as_tensor(demos["actions"]).float()  # (N, T, 7)
    N, T1 = video.shape[:2]
    if T1 < frames:
        raise ValueError(f"episodes have {T1} frames, a segment needs {frames}; lower frames=")
    last = torch.as_tensor(demos["lengths"]) if (not idle_tail and "lengths" in demos) else torch.full((N,), T1)
    starts = [(n, s) for n in range(N) for s in range(0, T1 - frames + 1, stride) if s <= int(last[n])]
    parts = []
    for i in range(0, len(starts), batch):
        chunk = starts[i:i + batch]
        clip = torch.stack([video[n, s:s + frames] for n, s in chunk]).to(device)
        clip = clip.permute(0, 1, 4, 2, 3).float() / 255.0  # (b, K, 3, H, W)
        ctx, dyn = tok.encode_clip(clip)
        bins = discretizer.encode(torch.stack([actions[n, s:s + frames - 1] for n, s in chunk]))
        parts.append(layout.build_segment(ctx.cpu(), dyn.cpu(), bins.cpu()))
    ids = torch.cat(parts)
    mask = segment_loss_mask(layout, frames).expand_as(ids).clone()
    if len(starts) > 1 and ids[mask].unique().numel() < 2:  # every generated frame token is one code
        raise ValueError("the tokenizer's dynamics codes collapsed to a single code: every frame would decode from "
                         "the context frame alone and no world model could show an action's effect. Retrain the "
                         "tokenizer (another seed or more steps) and check its reconstruction.png")
    from ..models.world import tokenizer_hash
    return {"ids": ids, "loss_mask": mask, "layout": asdict(layout), "action_ranges": discretizer.state_dict(),
            "frames": frames, "tokenizer_sha256": tokenizer_hash(tok),
            "fsq_levels": list(tok.cfg.levels) if tok.cfg.quantizer == "fsq" else None}


def save_segments(seg: dict, path) -> None:
    atomic_save(seg, path)


def load_segments(path) -> dict:
    seg = load_checkpoint(path, "tokenized segments file")
    if not isinstance(seg, dict) or "ids" not in seg or "loss_mask" not in seg:
        raise ValueError(f"{path} is not a segments file (needs 'ids' and 'loss_mask'); build it with build_segments")
    if seg["ids"].shape != seg["loss_mask"].shape or seg["ids"].dim() != 2:
        raise ValueError(f"{path}: ids {tuple(seg['ids'].shape)} and loss_mask {tuple(seg['loss_mask'].shape)} must be equal (N, L)")
    return seg
