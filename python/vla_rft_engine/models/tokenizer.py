"""Compressive visual tokenizer in the authors' shape (REFERENCE.md):

- the context frame is encoded densely: an FSQ (or VQ) token per latent cell (paper: 32x32 = 1024);
- every later frame is encoded, conditioned on the context frame's encoder features, into a small grid
  of "dynamics" tokens: the latent grid cut into p x p patches (paper: 32x32 / 4x4 -> 8x8 = 64);
- decoding a dynamics frame is conditioned on the context frame's decoder features.

Token ids -> latent grid (code lookup, projection, de-patchify) is the fused `ops.vq_decode` at inference;
training runs the same math differentiably. Frames are float (B, 3, H, W) in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import from_dict, save_config, to_dict
from ..ops.vq_decode import vq_decode
from ..utils import load_checkpoint, load_weights, save_weights
from .quantizers import FSQ, VQ
from .tokenizer_config import TokenizerConfig

FORMAT, WEIGHTS, LEGACY = "vla-rft-tokenizer/1", "tokenizer.safetensors", "tokenizer.pt"


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _stages(h, mixes, blocks, cond: list[torch.Tensor] | None):
    """Per resolution: mix in the conditioning features (if any), keep the stage's features, run its block."""
    feats = []
    for i, (mix, block) in enumerate(zip(mixes, blocks)):
        if cond is not None:
            h = mix(torch.cat([h, cond[i]], 1))
        feats.append(h)
        h = block(h)
    return h, feats


class Encoder(nn.Module):
    """Full-res -> latent grid; `cond` features (one per resolution) are concatenated when given."""

    def __init__(self, chans: list[int], cond: bool):
        super().__init__()
        k = 2 if cond else 1
        self.stem = nn.Conv2d(3, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.mix = nn.ModuleList()
        for i, ch in enumerate(chans):
            self.mix.append(nn.Conv2d(ch * k, ch, 1) if cond else nn.Identity())
            down = nn.Conv2d(ch, chans[i + 1], 4, stride=2, padding=1) if i + 1 < len(chans) else nn.Identity()
            # no residual block at full resolution: it would dominate the cost on the CPU
            self.blocks.append(nn.Sequential(ResBlock(ch) if i > 0 else nn.Identity(), down))

    def forward(self, x, cond: list[torch.Tensor] | None = None):
        return _stages(self.stem(x), self.mix, self.blocks, cond)

    @torch.no_grad()
    def frames(self, x: torch.Tensor, cond: list[torch.Tensor], per_cond: int) -> torch.Tensor:
        """forward(x, cond repeated per_cond times)[0] in less time (inference, as Decoder.frames)."""
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        for mix, block, c in zip(self.mix, self.blocks, cond):
            h = block(_mix_once(cast(nn.Conv2d, mix), h, c, per_cond))
        return h.contiguous()


class Decoder(nn.Module):
    """Latent grid -> full-res frame; `cond` decoder features (latent -> full res) concatenated when given."""

    def __init__(self, chans: list[int], latent_channels: int, cond: bool):
        super().__init__()
        rev = list(reversed(chans))
        k = 2 if cond else 1
        self.inp = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mix = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(rev):
            self.mix.append(nn.Conv2d(ch * k, ch, 1) if cond else nn.Identity())
            up = (nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, rev[i + 1], 3, padding=1))
                  if i + 1 < len(rev) else nn.Identity())
            self.blocks.append(nn.Sequential(ResBlock(ch) if i + 1 < len(rev) else nn.Identity(), up))
        self.out = nn.Sequential(nn.GroupNorm(8, rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], 3, 3, padding=1))

    def forward(self, z, cond: list[torch.Tensor] | None = None):
        h, feats = _stages(self.inp(z), self.mix, self.blocks, cond)
        return self.out(h), feats

    @torch.no_grad()
    def frames(self, z: torch.Tensor, cond: list[torch.Tensor], per_cond: int) -> torch.Tensor:
        """forward(z, cond repeated per_cond times)[0] in less time (inference; within float rounding):
        channels-last activations (oneDNN's fast layout on the CPU), the 1x1 mix split into its h half and its
        cond half, the latter once per cond and broadcast (no repeated, concatenated copies), and each
        nearest-2x upsample + 3x3 conv run on the low-res input (_up_conv)."""
        cl = torch.channels_last
        h = self.inp(z.contiguous(memory_format=cl))
        for mix, block, c in zip(self.mix, self.blocks, cond):
            res, up = cast(nn.Sequential, block)  # (ResBlock | Identity, Sequential(Upsample, Conv2d) | Identity)
            h = res(_mix_once(cast(nn.Conv2d, mix), h, c, per_cond))
            h = _up_conv(h, cast(nn.Conv2d, up[1])) if isinstance(up, nn.Sequential) else up(h)
        return self.out(h).contiguous()


def _mix_once(mix: nn.Conv2d, h: torch.Tensor, c: torch.Tensor, per_cond: int) -> torch.Tensor:
    """mix(cat([h, c repeated per_cond times])) for a 1x1 conv: its h half on h, its c half once per c row,
    broadcast over that row's per_cond frames (channels-last out)."""
    cl, C = torch.channels_last, h.shape[1]
    hc = F.conv2d(h, mix.weight[:, :C].contiguous(memory_format=cl))
    cc = F.conv2d(c.contiguous(memory_format=cl), mix.weight[:, C:].contiguous(memory_format=cl), mix.bias)
    return (hc.unflatten(0, (-1, per_cond)) + cc[:, None]).flatten(0, 1).contiguous(memory_format=cl)


def _up_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_upsample_2x(x)) for a 3x3, padding-1 conv, computed on x: output pixel (2i+a, 2j+b) sees
    low-res rows i-1+a, i+a and columns j-1+b, j+b, with the 3x3 taps summed per parity (a, b). One 3x3 conv
    with 4x the output channels (a 2x2 block of taps per parity, zeros elsewhere) then interleaves them: no
    upsampled copy, and a better GEMM shape than the full-res conv."""
    w = conv.weight
    Co, Ci = w.shape[:2]
    taps = (lambda k: torch.stack([k[:, :, 0], k[:, :, 1] + k[:, :, 2]], 2),  # parity 0: rows i-1, i
            lambda k: torch.stack([k[:, :, 0] + k[:, :, 1], k[:, :, 2]], 2))  # parity 1: rows i, i+1
    k = w.new_zeros(2, 2, Co, Ci, 3, 3)
    for a in (0, 1):
        for b in (0, 1):
            k[a, b, :, :, a:a + 2, b:b + 2] = taps[b](taps[a](w).transpose(2, 3)).transpose(2, 3)
    B, _, H, W = x.shape
    bias = None if conv.bias is None else conv.bias.repeat(4)
    y = F.conv2d(x, k.flatten(0, 2).contiguous(memory_format=torch.channels_last), bias, padding=1)
    y = y.permute(0, 2, 3, 1).reshape(B, H, W, 2, 2, Co).transpose(2, 3)  # (B, H, a, W, b, Co)
    return y.reshape(B, 2 * H, 2 * W, Co).permute(0, 3, 1, 2)  # channels-last memory


class VisualTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TokenizerConfig()
        cfg.validate()
        C, d, p = cfg.latent_channels, cfg.code_dim, cfg.dyn_patch
        self.ctx_encoder = Encoder(cfg.channels, cond=False)
        self.dyn_encoder = Encoder(cfg.channels, cond=True)
        self.ctx_to_code = nn.Conv2d(cfg.channels[-1], d, 1)
        self.dyn_to_code = nn.Linear(cfg.channels[-1] * p * p, d)
        self.ctx_quant = FSQ(cfg.levels) if cfg.quantizer == "fsq" else VQ(cfg.vq_codes, d)
        self.dyn_quant = FSQ(cfg.levels) if cfg.quantizer == "fsq" else VQ(cfg.vq_codes, d)
        self.ctx_proj = nn.Linear(d, C)  # the 1x1 conv of the context latent, kept as (C, d) for vq_decode
        self.dyn_proj = nn.Linear(d, C * p * p)  # out index c*p*p + u*p + v, as vq_decode de-patchifies
        self.ctx_decoder = Decoder(cfg.channels, C, cond=False)
        self.dyn_decoder = Decoder(cfg.channels, C, cond=True)
        self.layout = cfg.layout()

    # --- patch helpers (same ordering as ops.vq_decode) ---
    def _patchify(self, h: torch.Tensor) -> torch.Tensor:
        B, Ch, G, _ = h.shape
        p, g = self.cfg.dyn_patch, G // self.cfg.dyn_patch
        return h.view(B, Ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, Ch * p * p)

    def _depatchify(self, y: torch.Tensor) -> torch.Tensor:
        B, N, _ = y.shape
        p, g, C = self.cfg.dyn_patch, self.cfg.latent_grid // self.cfg.dyn_patch, self.cfg.latent_channels
        return y.view(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def _check_frames(self, x: torch.Tensor, name: str) -> None:
        s = self.cfg.image_size
        if x.dim() != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"{name} must be (B, 3, {s}, {s}) float in [0, 1], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be float in [0, 1] (divide uint8 frames by 255), got {x.dtype}")

    # --- encoding ---
    def _encode_context(self, ctx: torch.Tensor):
        h, enc_feats = self.ctx_encoder(ctx * 2 - 1)
        z = self.ctx_to_code(h).permute(0, 2, 3, 1)  # (B, G, G, d)
        codes, ids = self.ctx_quant(z)
        return codes.flatten(1, 2), ids.flatten(1), enc_feats

    def _encode_dynamics(self, frames: torch.Tensor, enc_feats: list[torch.Tensor], per_cond: int = 1):
        """frames (B*per_cond, ...), enc_feats of their B context frames (each frame's context repeats per_cond)."""
        if torch.is_grad_enabled():
            h, _ = self.dyn_encoder(frames * 2 - 1, [f.repeat_interleave(per_cond, 0) for f in enc_feats])
        else:  # inference: the faster path (Encoder.frames), same function
            h = self.dyn_encoder.frames(frames * 2 - 1, enc_feats, per_cond)
        codes, ids = self.dyn_quant(self.dyn_to_code(self._patchify(h)))
        return codes, ids

    @torch.no_grad()
    def encode_context(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> context code ids (B, G*G)."""
        self._check_frames(ctx, "context frames")
        return self._encode_context(ctx)[1]

    @torch.no_grad()
    def encode_dynamics(self, frames: torch.Tensor, context_frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) frames, each with its context frame -> dynamics code ids (B, (G/p)^2)."""
        self._check_frames(frames, "frames")
        self._check_frames(context_frames, "context frames")
        if frames.shape[0] != context_frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} frames but {context_frames.shape[0]} context frames")
        _, _, feats = self._encode_context(context_frames)
        return self._encode_dynamics(frames, feats)[1]

    @torch.no_grad()
    def encode_clip(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 3, H, W), frame 0 the context -> (context ids (B, G*G), dynamics ids (B, K, n) of all K frames).
        Same ids as encode_context + encode_dynamics, with the context encoder run once per clip, not per frame."""
        if clip.dim() != 5:
            raise ValueError(f"clip must be (B, K, 3, H, W), got {tuple(clip.shape)}")
        B, K = clip.shape[:2]
        self._check_frames(clip.flatten(0, 1), "clip frames")
        _, ctx_ids, feats = self._encode_context(clip[:, 0])
        return ctx_ids, self._encode_dynamics(clip.flatten(0, 1), feats, K)[1].view(B, K, -1)

    # --- decoding ---
    def _latent_from_codes(self, ctx_codes: torch.Tensor, dyn_codes: torch.Tensor | None):
        G = self.cfg.latent_grid
        zc = self.ctx_proj(ctx_codes).view(-1, G, G, self.cfg.latent_channels).permute(0, 3, 1, 2)
        zd = self._depatchify(self.dyn_proj(dyn_codes)) if dyn_codes is not None else None
        return zc, zd

    def _decode_latents(self, zc: torch.Tensor, zd: torch.Tensor | None, frames_per_ctx: int):
        """zc (B, C, G, G), zd (B*T, C, G, G) -> context frame (B, 3, H, W), frames (B*T, 3, H, W)."""
        ctx_img, dec_feats = self.ctx_decoder(zc)
        if zd is None:
            return ctx_img, None
        if not torch.is_grad_enabled():  # inference: the faster path (Decoder.frames), same function
            return ctx_img, self.dyn_decoder.frames(zd, dec_feats, frames_per_ctx)
        cond = [f.repeat_interleave(frames_per_ctx, 0) for f in dec_feats]
        img, _ = self.dyn_decoder(zd, cond)
        return ctx_img, img

    def _ids_to_latent(self, ids: torch.Tensor, proj: nn.Linear, quant, grid: tuple[int, int], patch: int):
        kw = {"levels": self.cfg.levels} if self.cfg.quantizer == "fsq" else {"codebook": quant.codebook.detach()}
        return vq_decode(ids, proj.weight.detach(), proj.bias.detach(), grid, patch, **kw)

    @torch.no_grad()
    def decode(self, context_ids: torch.Tensor, dynamics_ids: torch.Tensor) -> torch.Tensor:
        """context_ids (B, G*G), dynamics_ids (B, T, N) -> frames (B, T, 3, H, W) in [0, 1]."""
        G, p = self.cfg.latent_grid, self.cfg.dyn_patch
        if context_ids.dim() != 2 or context_ids.shape[1] != G * G:
            raise ValueError(f"context_ids must be (B, {G * G}), got {tuple(context_ids.shape)}")
        n = (G // p) ** 2
        if dynamics_ids.dim() != 3 or dynamics_ids.shape[0] != context_ids.shape[0] or dynamics_ids.shape[2] != n:
            raise ValueError(f"dynamics_ids must be (B={context_ids.shape[0]}, T, {n}), got {tuple(dynamics_ids.shape)}")
        B, T = dynamics_ids.shape[:2]
        zc = self._ids_to_latent(context_ids, self.ctx_proj, self.ctx_quant, (G, G), 1)
        zd = self._ids_to_latent(dynamics_ids.reshape(B * T, n), self.dyn_proj, self.dyn_quant, (G // p, G // p), p)
        _, img = self._decode_latents(zc, zd, T)
        return ((img.clamp(-1, 1) + 1) / 2).view(B, T, 3, *img.shape[-2:])

    @torch.no_grad()
    def decode_context(self, context_ids: torch.Tensor) -> torch.Tensor:
        G = self.cfg.latent_grid
        zc = self._ids_to_latent(context_ids, self.ctx_proj, self.ctx_quant, (G, G), 1)
        return (self._decode_latents(zc, None, 1)[0].clamp(-1, 1) + 1) / 2

    # --- training ---
    def forward(self, ctx: torch.Tensor, frames: torch.Tensor):
        """Reconstruct the context frame (B, 3, H, W) and T frames per context (B, T, 3, H, W).

        Returns (ctx_recon, frames_recon) in [-1, 1] scale-free outputs mapped to [0, 1], and the VQ loss."""
        B, T = frames.shape[:2]
        ctx_codes, _, enc_feats = self._encode_context(ctx)
        dyn_codes, _ = self._encode_dynamics(frames.flatten(0, 1), enc_feats, T)
        zc, zd = self._latent_from_codes(ctx_codes, dyn_codes)
        ctx_img, img = self._decode_latents(zc, zd, T)
        aux = torch.zeros((), device=ctx.device)
        if self.cfg.quantizer == "vq":
            aux = cast(VQ, self.ctx_quant).last_loss + cast(VQ, self.dyn_quant).last_loss
        return (ctx_img + 1) / 2, ((img + 1) / 2).view(B, T, *img.shape[1:]), aux

    # --- persistence ---
    def save(self, path: str | Path) -> None:
        """DIR/tokenizer.safetensors (weights + config in its header) and DIR/tokenizer_config.yaml."""
        path = Path(path)
        save_weights(path / WEIGHTS, self.state_dict(), {"format": FORMAT, "config": to_dict(self.cfg)})
        save_config(self.cfg, path / "tokenizer_config.yaml")

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "VisualTokenizer":
        """A tokenizer dir (tokenizer.safetensors, or a legacy tokenizer.pt) or either file itself."""
        path = Path(path)
        f = path
        if path.is_dir():
            f = path / WEIGHTS if (path / WEIGHTS).is_file() or not (path / LEGACY).is_file() else path / LEGACY
        if f.suffix == ".safetensors":
            sd, meta = load_weights(f, "tokenizer weights")
        else:  # legacy torch file, read as plain data (weights_only)
            meta = load_checkpoint(f, "tokenizer checkpoint", map_location)
            sd = meta.get("state_dict", {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{f} is not a vla-rft tokenizer (format={meta.get('format')!r})")
        tok = cls(from_dict(TokenizerConfig, meta["config"]))
        missing, unexpected = tok.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"tokenizer checkpoint {f} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return tok.to(map_location).eval()

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether `path` holds a tokenizer (a dir with either file, or the file itself)."""
        path = Path(path)
        return (path / WEIGHTS).is_file() or (path / LEGACY).is_file() or path.is_file()
