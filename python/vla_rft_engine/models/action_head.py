"""DiT-style networks over the action chunk: the flow head v_theta and the Sigma Net sigma_psi.

Both are `ChunkDiT(z, s, a, tau)`: the T actions of the chunk are T tokens (linear embed + learned
position), self-attention blocks with adaLN-Zero modulation (Peebles & Xie) from the condition
c = emb(tau) + W_z z + MLP(s); output (B, T, action_dim).
  FlowHead:  v = ChunkDiT(...)                          (Eq. 4, 5)
  SigmaNet:  sigma = exp(log s_min + (log s_max - log s_min) * sigmoid(ChunkDiT(...)))   (Eq. 7)
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn


def timestep_embedding(tau: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of tau in [0, 1] (scaled by 1000 like DiT's integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
    args = (tau.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class DiTBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, int(d * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(d * mlp_ratio), d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(cast(nn.Linear, self.ada[1]).weight)  # adaLN-Zero: each block starts as the identity
        nn.init.zeros_(cast(nn.Linear, self.ada[1]).bias)

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.mlp(h)


class ChunkDiT(nn.Module):
    def __init__(self, action_dim: int, chunk_len: int, z_dim: int, proprio_dim: int, d_model: int = 128,
                 depth: int = 3, heads: int = 4):
        super().__init__()
        self.action_dim, self.chunk_len, self.z_dim, self.proprio_dim = action_dim, chunk_len, z_dim, proprio_dim
        self.d = d_model
        self.a_in = nn.Linear(action_dim, d_model)
        self.pos = nn.Parameter(torch.randn(1, chunk_len, d_model) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.z_in = nn.Linear(z_dim, d_model)
        self.s_in = nn.Sequential(nn.Linear(proprio_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.blocks = nn.ModuleList(DiTBlock(d_model, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
        nn.init.zeros_(cast(nn.Linear, self.ada_out[1]).weight)
        nn.init.zeros_(cast(nn.Linear, self.ada_out[1]).bias)
        self.out = nn.Linear(d_model, action_dim)

    def check(self, z, s, a, tau) -> None:
        B = a.shape[0]
        if a.dim() != 3 or a.shape[1:] != (self.chunk_len, self.action_dim):
            raise ValueError(f"action chunk must be (B, {self.chunk_len}, {self.action_dim}); got {tuple(a.shape)}")
        if z.shape != (B, self.z_dim):
            raise ValueError(f"z must be (B={B}, {self.z_dim}); got {tuple(z.shape)}")
        if s.shape != (B, self.proprio_dim):
            raise ValueError(f"proprio s must be (B={B}, {self.proprio_dim}); got {tuple(s.shape)}")
        if tau.shape != (B,):
            raise ValueError(f"tau must be (B={B},); got {tuple(tau.shape)}")

    def forward(self, z, s, a, tau):
        self.check(z, s, a, tau)
        c = self.t_mlp(timestep_embedding(tau, self.d)) + self.z_in(z) + self.s_in(s)
        x = self.a_in(a) + self.pos
        for blk in self.blocks:
            x = blk(x, c)
        sh, sc = self.ada_out(c)[:, None].chunk(2, -1)
        return self.out(self.norm_out(x) * (1 + sc) + sh)


class FlowHead(ChunkDiT):
    """v_theta(z, s, a_tau, tau) -> velocity (B, T, A); tau = 0 is noise, tau = 1 is data."""


class SigmaNet(ChunkDiT):
    """sigma_psi(z, s, a_k, tau_k) -> per-element std (B, T, A) in [sigma_min, sigma_max].

    log sigma = log s_min + (log s_max - log s_min) * sigmoid(raw): bounded and smooth, and the
    log scale spreads resolution evenly from 1e-3 to 1. Init: the output layer's weights are zero
    and its bias is logit of the fraction for sigma_init, so at step 0 of RFT every state gets
    exactly sigma_init (small, default 2x sigma_min): the SDE policy starts as a slightly noisy
    copy of the SFT ODE policy, and gradients still reach the weights (sigmoid is far from
    saturation there, unlike init at sigma_min itself).
    """

    def __init__(self, *args, sigma_min: float = 0.01, sigma_max: float = 0.5, sigma_init: float | None = None,
                 **kw):
        super().__init__(*args, **kw)
        sigma_init = 2.0 * sigma_min if sigma_init is None else sigma_init
        self.set_bounds(sigma_min, sigma_max)
        self.reset_sigma(sigma_init)

    def set_bounds(self, sigma_min: float, sigma_max: float) -> None:
        """New output range; the current weights then map to other sigmas, so reset_sigma should follow."""
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"Sigma Net bounds need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)

    @torch.no_grad()
    def reset_sigma(self, sigma: float) -> None:
        """Output exactly `sigma` for every input (output layer zeroed, bias at the matching logit)."""
        if not self.sigma_min < sigma < self.sigma_max:
            raise ValueError(f"sigma_init={sigma} must lie strictly inside ({self.sigma_min}, {self.sigma_max})")
        frac = (math.log(sigma) - self.log_min) / (self.log_max - self.log_min)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, math.log(frac / (1 - frac)))

    def forward(self, z, s, a, tau):
        raw = super().forward(z, s, a, tau)
        return torch.exp(self.log_min + (self.log_max - self.log_min) * torch.sigmoid(raw.float()))
