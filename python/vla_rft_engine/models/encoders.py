"""f_VLM(image, instruction, proprio) -> z: the policy's observation encoders.

Every encoder returns z of shape (B, encoder.z_dim), float32, one vector per start state (the flow
head and Sigma Net condition on it through adaLN). Inputs:
  image:       uint8 (B, H, W, 3) in [0, 255]  (env / demo frames)   or
               float (B, 3, H, W) in [0, 1]     (already a tensor image)
  instruction: list[str] of length B, or int64 token ids (B, L) with -1 marking padding
  proprio:     float (B, P)

SmallEncoder: a CNN + hashed bag-of-words + proprio MLP, small enough to train on the CPU.
HFVLMEncoder: hidden states of a Hugging Face vision-language model (LLaVA-style: image tokens
first, then the text), masked-mean-pooled; frozen, with optional LoRA on the text attention.
"""
from __future__ import annotations

import contextlib
import math
import re
import zlib
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F


_deferred = [0]  # > 0: inside deferred_finite_checks


@contextlib.contextmanager
def deferred_finite_checks():
    """check_finite does nothing inside: a NaN/Inf flows on into the result, which the caller checks instead
    (a multi-process training step: every rank must reach the same collectives, see distributed.agreed_loss)."""
    _deferred[0] += 1
    try:
        yield
    finally:
        _deferred[0] -= 1


def check_finite(name: str, t: torch.Tensor) -> None:
    """Eager input check; skipped while torch.export / torch.compile trace (a data-dependent branch there) and
    inside deferred_finite_checks."""
    if _deferred[0] or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if t.is_floating_point() and not torch.isfinite(t).all():
        from ..config import NonFiniteError
        raise NonFiniteError(f"{name} holds NaN or Inf values ({int((~torch.isfinite(t)).sum())} of {t.numel()})")


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> float32 (B, 3, H, W) in [0, 1]."""
    if image.dim() != 4:
        raise ValueError(f"image must be 4-D: uint8 (B,H,W,3) or float (B,3,H,W); got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        if image.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B,H,W,3) channels-last; got shape {tuple(image.shape)}")
        return image.permute(0, 3, 1, 2).float().div_(255.0)
    if not image.is_floating_point():
        raise ValueError(f"image dtype must be uint8 or float, got {image.dtype}")
    if image.shape[1] != 3:
        raise ValueError(f"float images must be (B,3,H,W) channels-first in [0,1]; got shape {tuple(image.shape)}")
    check_finite("image", image)
    return image.float()


_WORD = re.compile(r"[a-z0-9]+")


def hash_tokens(instructions: list[str], num_buckets: int) -> torch.Tensor:
    """Words -> stable bucket ids (crc32, not Python's salted hash), padded with -1: (B, L) int64."""
    toks = [[zlib.crc32(w.encode()) % num_buckets for w in _WORD.findall(s.lower())] or [0] for s in instructions]
    L = max(len(t) for t in toks)
    return torch.tensor([t + [-1] * (L - len(t)) for t in toks], dtype=torch.long)


def pixel_grid(H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """World coordinates of the pixel centres of an (H, W) image of the table (render.py's frame):
    x right, y UP, both in [-1, 1]; column j -> x = -1 + (j + 0.5) * 2 / W, row i -> y = 1 - (i + 0.5) * 2 / H
    (row 0 is the far edge of the table, y = +1). Returns xs (W,), ys (H,)."""
    xs = -1.0 + (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * (2.0 / W)
    ys = 1.0 - (torch.arange(H, device=device, dtype=torch.float32) + 0.5) * (2.0 / H)
    return xs, ys


def spatial_softmax(h: torch.Tensor, world: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2C): per channel, the softmax-weighted mean x (first C) and y (last C).

    world=True: in the table's world frame (pixel_grid: y up, so a keypoint and the proprio's gripper
    x, y are directly comparable). world=False: the legacy frame of version-1 encoders (linspace(-1, 1)
    over rows, i.e. y DOWN), kept so their checkpoints behave as trained."""
    B, C, H, W = h.shape
    p = torch.softmax(h.flatten(2), -1).view(B, C, H, W)
    if world:
        xs, ys = pixel_grid(H, W, h.device)
    else:
        xs, ys = torch.linspace(-1, 1, W, device=h.device), torch.linspace(-1, 1, H, device=h.device)
    return torch.cat([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], -1)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class SmallEncoder(nn.Module):
    """CNN(image | instruction) + bag-of-words(instruction) + MLP(proprio) -> z (B, z_dim).

    What the table-top tasks need: x/y coordinate channels (CoordConv) and a spatial-softmax readout so
    object positions come out as numbers, and the instruction FiLM-modulates the conv features so they
    can single out the named object (colour) before the readout.

    version 2 (default): conv stem at full resolution (a 64 px frame shows a block as ~5 px, the reach
    tolerance is ~2 px), FiLM at 1/2 resolution, then `keypoints` 1x1-conv heat maps read out by a
    spatial softmax with a learned temperature (sharp from the start: a plain softmax over unit-scale
    features is nearly uniform, so its expected x, y barely move with the object), in world
    coordinates (y up, like the proprio). The keypoints (2K numbers in world units) go into z through
    their own projection; a small global-average-pooled feature summary goes next to them (no
    position-specific grid, which mostly memorises layouts).
    version 1: the original network (kept so old checkpoints load).
    """

    def __init__(self, proprio_dim: int, z_dim: int = 128, channels: int = 32, vocab_buckets: int = 1024,
                 text_dim: int = 64, version: int = 2, keypoints: int = 16, text_queries: int = 4, dropout: float = 0.0,
                 kp_temp: float = 64.0):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"SmallEncoder version must be 1 or 2, got {version}")
        self.proprio_dim, self.vocab_buckets, self.version = proprio_dim, vocab_buckets, version
        # v2: z = [features (z_dim), the instruction queries' points x, y in world units (2Q)] -- the raw
        # points reach the head linearly, so "target minus gripper" is one linear map of (z, s) away
        self.z_dim = z_dim + (2 * text_queries if version == 2 else 0)
        c = channels
        self.word_emb = nn.Embedding(vocab_buckets, text_dim)
        self.txt_proj = nn.Linear(text_dim, z_dim)
        self.prop_mlp = nn.Sequential(nn.Linear(proprio_dim, z_dim), nn.SiLU(), nn.Linear(z_dim, z_dim))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(3 * z_dim, z_dim), nn.LayerNorm(z_dim))
        if version == 1:
            self.conv1 = nn.Sequential(nn.Conv2d(3 + 2, c, 5, stride=2, padding=2), nn.GroupNorm(8, c), nn.SiLU(),
                                       nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * c))
            self.film = nn.Linear(text_dim, 4 * c)
            self.conv2 = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c),
                                       nn.SiLU())
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
            self.img_proj = nn.Linear(2 * c * 16 + 4 * c, z_dim)
        else:
            self.conv1 = nn.Sequential(nn.Conv2d(3 + 2, c, 5, stride=2, padding=2), _gn(c), nn.SiLU(),
                                       nn.Conv2d(c, c, 3, padding=1), _gn(c))
            self.film = nn.Linear(text_dim, 2 * c)
            self.conv2 = nn.Sequential(nn.SiLU(), nn.Conv2d(c + 2, c, 3, padding=1), _gn(c), nn.SiLU())
            self.kp = nn.Conv2d(c, keypoints, 1)
            # per-pixel colour features at full resolution (no norm, no coordinates): what the instruction's
            # queries attend over -- "the red block" is found by colour, pixel by pixel
            self.pix = nn.Sequential(nn.Conv2d(3, c, 1), nn.SiLU(), nn.Conv2d(c, c, 1))
            self.query = nn.Linear(text_dim, text_queries * c)
            self.text_queries = text_queries
            nq = keypoints + text_queries
            # logit scale, learned; starts sharp (a near-uniform softmax over 4096 pixels barely moves its mean)
            self.kp_log_temp = nn.Parameter(torch.full((nq,), math.log(kp_temp)))
            self.kp_proj = nn.Sequential(nn.Linear(2 * nq, z_dim), nn.SiLU(), nn.Linear(z_dim, z_dim))
            self.img_proj = nn.Linear(c, z_dim)
            self.out = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(4 * z_dim, z_dim), nn.LayerNorm(z_dim))
        nn.init.zeros_(self.film.weight)  # starts as plain conv features
        nn.init.zeros_(self.film.bias)

    def encode_text(self, instruction, device) -> torch.Tensor:
        """-> pooled word embedding (B, text_dim)."""
        ids = instruction if torch.is_tensor(instruction) else hash_tokens(list(instruction), self.vocab_buckets)
        ids = ids.to(device)
        mask = (ids >= 0).float()
        e = self.word_emb(ids.clamp_min(0) % self.vocab_buckets) * mask[..., None]
        return e.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)

    @staticmethod
    def coords(B: int, H: int, W: int, device, world: bool = True) -> torch.Tensor:
        """(B, 2, H, W) CoordConv channels: x, y of each pixel (world frame unless world=False)."""
        if world:
            xs, ys = pixel_grid(H, W, device)
        else:
            xs, ys = torch.linspace(-1, 1, W, device=device), torch.linspace(-1, 1, H, device=device)
        return torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W)])[None].expand(B, 2, H, W)

    def keypoints(self, image, instruction) -> torch.Tensor:
        """version 2: (B, 2K) keypoint x (first K) and y (last K) in world units."""
        x = image_to_float(image).to(self.txt_proj.weight.device)
        return self._features(x, self.encode_text(instruction, x.device))[0]

    def _features(self, x, t):
        B, _, H, W = x.shape
        x = x * 2.0 - 1.0
        c = self.kp.in_channels
        q = self.query(t).view(B, self.text_queries, c)  # instruction -> what to look for (the named object)
        txt_logits = torch.einsum("bkc,bchw->bkhw", q, self.pix(x)) / math.sqrt(c)
        h = self.conv1(torch.cat([x, self.coords(B, H, W, x.device)], 1))
        scale, shift = self.film(t)[:, :, None, None].chunk(2, 1)
        h = h * (1 + scale) + shift
        h = self.conv2(torch.cat([h, self.coords(B, h.shape[2], h.shape[3], x.device)], 1))
        nk = self.kp.out_channels
        temp = self.kp_log_temp.exp()
        kp = spatial_softmax(self.kp(h) * temp[None, :nk, None, None])              # (B, 2K) image keypoints
        tq = spatial_softmax(txt_logits * temp[None, nk:, None, None])              # (B, 2Q) named-object points
        return torch.cat([kp[:, :nk], tq[:, :self.text_queries], kp[:, nk:], tq[:, self.text_queries:]], 1), h.mean((2, 3))

    def forward(self, image, instruction, proprio) -> torch.Tensor:
        x = image_to_float(image).to(self.txt_proj.weight.device)
        B, _, H, W = x.shape
        nb = instruction.shape[0] if torch.is_tensor(instruction) else len(instruction)  # shape: symbolic in export
        if nb != B or proprio.shape != (B, self.proprio_dim):
            raise ValueError(f"encoder batch mismatch: image B={B}, {nb} instructions, "
                             f"proprio {tuple(proprio.shape)} (expected ({B}, {self.proprio_dim}))")
        check_finite("proprio", proprio)
        t = self.encode_text(instruction, x.device)
        p = self.prop_mlp(proprio.float().to(x.device))
        if self.version == 1:
            h = self.conv1(torch.cat([x * 2.0 - 1.0, self.coords(B, H, W, x.device, world=False)], 1))
            scale, shift = self.film(t)[:, :, None, None].chunk(2, 1)
            h = self.conv2(h * (1 + scale) + shift)
            img = self.img_proj(torch.cat([self.pool(h), spatial_softmax(h, world=False)], -1))
            return self.out(torch.cat([img, self.txt_proj(t), p], -1))
        kp, pooled = self._features(x, t)
        nk, Q = self.kp.out_channels, self.text_queries
        points = torch.cat([kp[:, nk:nk + Q], kp[:, 2 * nk + Q:]], 1)  # the text queries' x (Q), y (Q)
        feat = self.out(torch.cat([self.kp_proj(kp), self.img_proj(pooled), self.txt_proj(t), p], -1))
        return torch.cat([feat, points], -1)

    def readout_parameters(self) -> list[nn.Parameter]:
        """The colour-query readout (per-pixel features, queries, softmax temperatures): trained at a higher lr
        in SFT -- its logits must sharpen across 4096 pixels before the points it reads move at all."""
        if self.version != 2:
            return []
        return [*self.pix.parameters(), *self.query.parameters(), self.kp_log_temp]


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x with W frozen; B starts at zero so the wrapped model is unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def add_lora(model: nn.Module, rank: int, targets=("q_proj", "v_proj"), alpha: float = 16.0) -> int:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns how many were wrapped."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                n += 1
    return n


class HFVLMEncoder(nn.Module):
    """z = masked mean over tokens of hidden_states[layer] of a HF vision-language model: (B, hidden_size).

    Built for LLaVA-style models (transformers' LlavaModel: any vision tower + any decoder LM): the
    input is [image_token x num_image_tokens] + instruction tokens. Images are resized to the vision
    tower's size and normalised with `image_mean/std` (SigLIP: 0.5/0.5). Instructions are token ids
    (B, L) (-1 = pad) or strings when a `tokenizer` (any callable str -> list[int]) is given.
    Proprio is not used here; the action head and Sigma Net take it directly.
    The model is frozen (eval mode, no grads) unless lora_rank > 0, which trains LoRA adapters only.
    """

    def __init__(self, model: nn.Module, tokenizer=None, layer: int = -1, lora_rank: int = 0,
                 lora_targets=("q_proj", "v_proj"), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        super().__init__()
        self.model, self.tokenizer, self.layer = model, tokenizer, layer
        cfg: Any = model.config  # a transformers config: attributes differ per model family
        self.image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        if self.image_token_id is None or not hasattr(cfg, "vision_config"):
            raise ValueError(f"{type(model).__name__}: expected a LLaVA-style config with vision_config and "
                             "image_token_id; wrap other families by subclassing HFVLMEncoder.build_inputs")
        vc = cfg.vision_config
        self.image_size = int(vc.image_size)
        self.num_image_tokens = (self.image_size // int(vc.patch_size)) ** 2
        self.z_dim = int(cfg.text_config.hidden_size)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.lora_rank = lora_rank
        if lora_rank > 0 and add_lora(cast(nn.Module, self.model.language_model) if hasattr(self.model, "language_model")
                                      else self.model, lora_rank, lora_targets) == 0:
            raise ValueError(f"LoRA: no nn.Linear named {lora_targets} in the language model")
        self.model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "HFVLMEncoder":
        from transformers import AutoModel
        if not Path(path).is_dir():
            raise FileNotFoundError(f"HF model directory {path} not found (save_pretrained output expected)")
        return cls(AutoModel.from_pretrained(str(path)), **kw)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen backbone: no dropout even while the head trains
        return self

    def build_inputs(self, image, instruction):
        x = image_to_float(image).to(self.image_mean.device)
        B = x.shape[0]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        pixel_values = (x - self.image_mean) / self.image_std
        if torch.is_tensor(instruction):
            ids = instruction.long()
        else:
            if self.tokenizer is None:
                raise ValueError("HFVLMEncoder got string instructions but no tokenizer; pass token ids (B, L)")
            toks = [list(self.tokenizer(s)) for s in instruction]
            L = max(len(t) for t in toks)
            ids = torch.tensor([t + [-1] * (L - len(t)) for t in toks], dtype=torch.long)
        if ids.shape[0] != B:
            raise ValueError(f"HFVLMEncoder: {ids.shape[0]} instructions for {B} images")
        ids = ids.to(x.device)
        text_mask = ids >= 0
        img = torch.full((B, self.num_image_tokens), int(self.image_token_id), dtype=torch.long, device=x.device)
        input_ids = torch.cat([img, ids.clamp_min(0)], 1)
        attn = torch.cat([torch.ones_like(img, dtype=torch.bool), text_mask], 1)
        return input_ids, attn, pixel_values.to(next(self.model.parameters()).dtype)

    def forward(self, image, instruction, proprio=None) -> torch.Tensor:
        input_ids, attn, pixel_values = self.build_inputs(image, instruction)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lora_rank > 0):
            out = self.model(input_ids=input_ids, attention_mask=attn.long(), pixel_values=pixel_values,
                             output_hidden_states=True)
        h = out.hidden_states[self.layer].float()
        m = attn.float()[..., None]
        return (h * m).sum(1) / m.sum(1)
