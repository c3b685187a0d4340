"""Fused, differentiable log-prob and entropy of the SDE policy's transitions (Eq. 6-8), for training.

Per row m (one transition a -> x of one chunk, D values):
    mu      = a + delta * v
    logp[m] = sum_d log N(x | mu, sigma^2) = sum_d [-0.5 r^2 - log sigma - 0.5 log 2 pi],  r = (x - mu) / sigma
    ent[m]  = sum_d (log sigma + 0.5 log(2 pi e))
Backward (g = dL/dlogp, h = dL/dent per row), closed form, one more pass:
    dL/dmu = g r / sigma  -> dL/dv = delta * dL/dmu,  dL/da = dL/dmu,  dL/dx = -dL/dmu
    dL/dsigma = g (r^2 - 1) / sigma + h / sigma
Eager autograd keeps ~6 intermediates of size (M, D) alive per step for this; the fused Function
saves only its inputs. fp64 runs in fp64 (torch.autograd.gradcheck), everything else in fp32.
"""
from __future__ import annotations

import functools

import torch
from torch.distributions import Normal

from .sde_euler_step import HALF_LOG_2PIE, LOG_2PI, _rows, check_like, compute_dtype, triton_usable


def check_inputs(x, a, v, sigma) -> None:
    check_like("sde log-prob", "x", x, a=a, v=v, sigma=sigma)


def log_prob_reference(x, a, v, sigma, delta: float):
    """Autograd reference on torch.distributions.Normal: -> (logp (M,), entropy (M,))."""
    check_inputs(x, a, v, sigma)
    cd = compute_dtype(x.dtype)
    xf, af, vf, sf = (_rows(t).to(cd) for t in (x, a, v, sigma))
    dist = Normal(af + delta * vf, sf)
    return dist.log_prob(xf).sum(-1), dist.entropy().sum(-1)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def sde_log_prob_fwd_kernel(x_ptr, a_ptr, v_ptr, s_ptr, lp_ptr, ent_ptr, M, D, delta,
                                LOG_2PI_C: tl.constexpr, HALF_LOG_2PIE_C: tl.constexpr, CD: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < M
        mask = rmask[:, None] & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CD)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CD)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CD)
        s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(CD)
        r = (x - (a + delta * v)) / s
        log_s = tl.log(s)
        lp = tl.where(mask, -0.5 * r * r - log_s - 0.5 * LOG_2PI_C, 0.0)
        ent = tl.where(mask, log_s + HALF_LOG_2PIE_C, 0.0)
        tl.store(lp_ptr + rows, tl.sum(lp, axis=1), mask=rmask)
        tl.store(ent_ptr + rows, tl.sum(ent, axis=1), mask=rmask)

    @triton.jit
    def sde_log_prob_bwd_kernel(x_ptr, a_ptr, v_ptr, s_ptr, glp_ptr, gent_ptr,
                                gx_ptr, ga_ptr, gv_ptr, gs_ptr, M, D, delta, CD: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < M
        mask = rmask[:, None] & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CD)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CD)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CD)
        s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(CD)
        g = tl.load(glp_ptr + rows, mask=rmask, other=0.0).to(CD)[:, None]
        h = tl.load(gent_ptr + rows, mask=rmask, other=0.0).to(CD)[:, None]
        inv_s = 1.0 / s
        r = (x - (a + delta * v)) * inv_s
        gmu = g * r * inv_s
        gs = (g * (r * r - 1.0) + h) * inv_s
        tl.store(gx_ptr + offs, (-gmu).to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(ga_ptr + offs, gmu.to(ga_ptr.dtype.element_ty), mask=mask)
        tl.store(gv_ptr + offs, (delta * gmu).to(gv_ptr.dtype.element_ty), mask=mask)
        tl.store(gs_ptr + offs, gs.to(gs_ptr.dtype.element_ty), mask=mask)

    return sde_log_prob_fwd_kernel, sde_log_prob_bwd_kernel


def _tl_dtype(cd: torch.dtype):
    import triton.language as tl
    return tl.float64 if cd == torch.float64 else tl.float32


def _launch_shape(M: int, D: int, device: torch.device):
    import triton
    block_d = triton.next_power_of_2(D)
    block_m = 64 if device.type != "cuda" else max(1, min(64, 4096 // block_d))
    return block_m, block_d, (triton.cdiv(M, block_m),)


class FusedSDELogProb(torch.autograd.Function):
    """(x, a, v, sigma, delta) -> (logp, entropy), both (M,), forward and backward in Triton."""

    @staticmethod
    def forward(ctx, x, a, v, sigma, delta: float):
        fwd, _ = _kernels()
        x2, a2, v2, s2 = (_rows(t).contiguous() for t in (x, a, v, sigma))
        M, D = x2.shape
        cd = compute_dtype(x.dtype)
        lp = torch.empty(M, dtype=cd, device=x.device)
        ent = torch.empty(M, dtype=cd, device=x.device)
        bm, bd, grid = _launch_shape(M, D, x.device)
        fwd[grid](x2, a2, v2, s2, lp, ent, M, D, float(delta), LOG_2PI, HALF_LOG_2PIE, _tl_dtype(cd),
                  BLOCK_M=bm, BLOCK_D=bd)
        ctx.save_for_backward(x2, a2, v2, s2)
        ctx.delta, ctx.shapes = float(delta), (x.shape, a.shape, v.shape, sigma.shape)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        _, bwd = _kernels()
        x2, a2, v2, s2 = ctx.saved_tensors
        M, D = x2.shape
        cd = compute_dtype(x2.dtype)
        g_lp = torch.zeros(M, dtype=cd, device=x2.device) if g_lp is None else g_lp.to(cd).contiguous()
        g_ent = torch.zeros(M, dtype=cd, device=x2.device) if g_ent is None else g_ent.to(cd).contiguous()
        gx, ga, gv, gs = (torch.empty_like(t) for t in (x2, a2, v2, s2))
        bm, bd, grid = _launch_shape(M, D, x2.device)
        bwd[grid](x2, a2, v2, s2, g_lp, g_ent, gx, ga, gv, gs, M, D, ctx.delta, _tl_dtype(cd),
                  BLOCK_M=bm, BLOCK_D=bd)
        sx, sa, sv, ss = ctx.shapes
        return gx.reshape(sx), ga.reshape(sa), gv.reshape(sv), gs.reshape(ss), None


def sde_log_prob(x, a, v, sigma, delta: float, backend: str = "auto"):
    """-> (logp (M,), entropy (M,)), differentiable w.r.t. x, a, v, sigma. backend: 'triton' | 'torch' | 'auto'
    ('auto' = triton on CUDA, torch elsewhere; 'triton' where Triton cannot run falls back to torch)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"sde backend must be 'triton', 'torch' or 'auto', got {backend!r}")
    if backend == "torch" or not triton_usable(x.device) or (backend == "auto" and x.device.type != "cuda"):
        return log_prob_reference(x, a, v, sigma, delta)
    check_inputs(x, a, v, sigma)
    return FusedSDELogProb.apply(x, a, v, sigma, float(delta))
