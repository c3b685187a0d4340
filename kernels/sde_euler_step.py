"""Fused Euler-Maruyama step of the SDE policy (Eq. 5-7), one launch per denoising step.

Per row m (one sampled chunk, D = chunk_len * action_dim values):
    mu      = a + delta * v
    a_next  = mu + sigma * eps                                   (eps ~ N(0, I) drawn by the caller)
    logp[m] = sum_d log N(a_next | mu, sigma^2)
    ent[m]  = sum_d (log sigma + 0.5 * log(2 pi e))
Eager PyTorch runs this as ~8 kernels (mul, add, mul, add, Normal.log_prob's sub/div/pow/log, two
sums); here it is one pass over the data. eps comes from the caller so a seeded torch.Generator
gives the same samples on both backends.

Dtypes: bf16/fp16/fp32 inputs compute in fp32, fp64 in fp64. a_next is returned in the compute
dtype, never bf16: a bf16 ulp near |a| = 1 is 2^-8 ~ 0.004, the size of sigma_min, so rounding
the chain would change its own log-prob by O(1).

triton is imported lazily (inside _kernel) so TRITON_INTERPRET can be set first.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch.distributions import Normal

LOG_2PI = math.log(2.0 * math.pi)
HALF_LOG_2PIE = 0.5 * math.log(2.0 * math.pi * math.e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def check_like(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in `others` has `ref`'s shape, which is (rows, ...); shared by the SDE ops."""
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")
    if ref.dim() < 2:
        raise ValueError(f"{op}: {ref_name} must be (rows, ...), got shape {tuple(ref.shape)}")


def check_inputs(a, v, sigma, eps) -> None:
    check_like("sde euler step", "a", a, v=v, sigma=sigma, eps=eps)


def euler_step_reference(a, v, sigma, eps, delta: float):
    """PyTorch reference on torch.distributions.Normal: -> (a_next, logp (M,), entropy (M,))."""
    check_inputs(a, v, sigma, eps)
    cd = compute_dtype(a.dtype)
    af, vf, sf, ef = (_rows(t).to(cd) for t in (a, v, sigma, eps))
    mu = af + delta * vf
    a_next = mu + sf * ef
    dist = Normal(mu, sf)
    return a_next.reshape(a.shape), dist.log_prob(a_next).sum(-1), dist.entropy().sum(-1)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sde_euler_step_kernel(a_ptr, v_ptr, s_ptr, e_ptr, out_ptr, lp_ptr, ent_ptr, M, D, delta,
                              LOG_2PI_C: tl.constexpr, HALF_LOG_2PIE_C: tl.constexpr, CD: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < M
        mask = rmask[:, None] & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CD)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CD)
        s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(CD)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(CD)
        mu = a + delta * v
        x = mu + s * e
        r = (x - mu) / s  # same rounding as Normal.log_prob(x), not eps itself
        log_s = tl.log(s)
        lp = tl.where(mask, -0.5 * r * r - log_s - 0.5 * LOG_2PI_C, 0.0)
        ent = tl.where(mask, log_s + HALF_LOG_2PIE_C, 0.0)
        tl.store(out_ptr + offs, x, mask=mask)
        tl.store(lp_ptr + rows, tl.sum(lp, axis=1), mask=rmask)
        tl.store(ent_ptr + rows, tl.sum(ent, axis=1), mask=rmask)

    return sde_euler_step_kernel


def euler_step_triton(a, v, sigma, eps, delta: float, block_m: int | None = None):
    import triton
    import triton.language as tl
    check_inputs(a, v, sigma, eps)
    cd = compute_dtype(a.dtype)
    a2, v2, s2, e2 = (_rows(t).contiguous() for t in (a, v, sigma, eps))
    M, D = a2.shape
    out = torch.empty((M, D), dtype=cd, device=a.device)
    lp = torch.empty(M, dtype=cd, device=a.device)
    ent = torch.empty(M, dtype=cd, device=a.device)
    block_d = triton.next_power_of_2(D)
    # interpreter: few fat programs (each program costs Python overhead); GPU: ~4K elements a program
    if block_m is None:
        block_m = 64 if a.device.type != "cuda" else max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(M, block_m),)
    acc = tl.float64 if cd == torch.float64 else tl.float32
    _kernel()[grid](a2, v2, s2, e2, out, lp, ent, M, D, float(delta), LOG_2PI, HALF_LOG_2PIE, acc,
                    BLOCK_M=block_m, BLOCK_D=block_d)
    return out.reshape(a.shape), lp, ent


def euler_step(a, v, sigma, eps, delta: float, backend: str = "auto"):
    """-> (a_next in compute dtype, logp (M,), entropy (M,)). backend: 'triton' | 'torch' | 'auto'.

    'triton' where Triton cannot run (CPU without TRITON_INTERPRET=1, no triton) falls back to torch.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"sde backend must be 'triton', 'torch' or 'auto', got {backend!r}")
    if backend == "torch" or not triton_usable(a.device) or (backend == "auto" and a.device.type != "cuda"):
        return euler_step_reference(a, v, sigma, eps, delta)
    return euler_step_triton(a, v, sigma, eps, delta)
