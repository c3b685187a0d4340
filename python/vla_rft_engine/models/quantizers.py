"""Finite scalar quantisation (FSQ) and a plain learned-codebook VQ.

FSQ index <-> digits: mixed radix with basis = exclusive cumulative product of the levels;
digit d in [0, L) <-> normalised code (d - L//2) / (L//2)  (REFERENCE.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def fsq_basis(levels, device=None) -> torch.Tensor:
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=device)
    return torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long, device=device), lv[:-1]]), 0)


def fsq_indices_to_codes(indices: torch.Tensor, levels) -> torch.Tensor:
    """int ids (...) -> normalised codes (..., len(levels)) in [-1, 1]."""
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=indices.device)
    digits = (indices.long().unsqueeze(-1) // fsq_basis(levels, indices.device)) % lv
    half = (lv // 2).to(torch.float32)
    return (digits.to(torch.float32) - half) / half


def fsq_codes_to_indices(codes: torch.Tensor, levels) -> torch.Tensor:
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=codes.device)
    half = (lv // 2).to(codes.dtype)
    digits = torch.round(codes * half + half).long()
    return (digits * fsq_basis(levels, codes.device)).sum(-1)


class FSQ(nn.Module):
    """Bound each of d channels to L_i levels, round with a straight-through gradient."""

    _levels: torch.Tensor  # buffer registered in __init__

    def __init__(self, levels=(7, 5, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        self.levels = tuple(int(x) for x in levels)
        if any(L < 2 for L in self.levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {self.levels}")
        lv = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", lv, persistent=False)
        self.eps = eps
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor):
        """z (..., d) -> (normalised quantised codes (..., d), indices (...))."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ expects last dim {self.dim}, got {z.shape[-1]}")
        zb = self.bound(z.float())
        q = zb + (torch.round(zb) - zb).detach()
        half = torch.div(self._levels, 2, rounding_mode="floor")
        codes = q / half
        return codes.to(z.dtype), fsq_codes_to_indices(codes.detach().float(), self.levels)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return fsq_indices_to_codes(indices, self.levels)


class VQ(nn.Module):
    """Learned codebook with nearest-neighbour lookup (l2), commitment loss and straight-through."""

    def __init__(self, num_codes: int = 4375, dim: int = 8, beta: float = 0.25):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_codes, dim) * 0.5)
        self.beta = beta
        self.dim = dim
        self.codebook_size = num_codes
        self.last_loss = torch.zeros(())

    def forward(self, z: torch.Tensor):
        flat = z.reshape(-1, self.dim).float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)[None]
        idx = d.argmin(1)
        q = self.codebook[idx].view_as(z)
        self.last_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()
        return q, idx.view(z.shape[:-1])

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook[indices.long()]
