"""Fused rotary embedding (HF rotate_half convention) + KV-cache write.

q (B, L, H, D), k/v (B, L, Hkv, D), cos/sin (B, L, D/2) fp32, caches (B, Hkv, S, D) (a layer's view, any
strides with contiguous D), write_pos (B,) int64: cache slot of the chunk's first token per row (a device
tensor, so a CUDA graph can replay the same launch at a moving position). Returns rotated q; writes
rotated k and raw v into the caches. One program per (token, head): no intermediate k tensor in HBM.
`apply_rotary` is the plain PyTorch rotary the model and the engine's torch paths use; triton is imported
only when the kernel is first launched.
"""
from __future__ import annotations

import functools

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D); cos/sin (B, L, D/2). HF rotate_half: halves, not interleaved pairs."""
    c, s = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rotary_kv_reference(q, k, v, cos, sin, cache_k, cache_v, write_pos):
    B, L = q.shape[:2]
    idx = write_pos[:, None] + torch.arange(L, device=q.device)  # (B, L)
    rows = torch.arange(B, device=q.device)[:, None]
    cache_k[rows, :, idx] = apply_rotary(k, cos, sin).to(cache_k.dtype)  # advanced indices first: (B, L, Hkv, D)
    cache_v[rows, :, idx] = v.to(cache_v.dtype)
    return apply_rotary(q, cos, sin)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kv_kernel(Q, K, V, COS, SIN, CK, CV, POS, QO,
                          sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sc_b, sc_l,
                          sck_b, sck_h, sck_s, scv_b, scv_h, scv_s, so_b, so_l, so_h,
                          L, HKV, HALF: tl.constexpr):
        bl = tl.program_id(0)
        h = tl.program_id(1)
        b = bl // L
        l = bl % L
        d = tl.arange(0, HALF)
        c = tl.load(COS + b * sc_b + l * sc_l + d)
        s = tl.load(SIN + b * sc_b + l * sc_l + d)
        qp = Q + b * sq_b + l * sq_l + h * sq_h
        q1 = tl.load(qp + d).to(tl.float32)
        q2 = tl.load(qp + HALF + d).to(tl.float32)
        op = QO + b * so_b + l * so_l + h * so_h
        tl.store(op + d, (q1 * c - q2 * s).to(QO.dtype.element_ty))
        tl.store(op + HALF + d, (q2 * c + q1 * s).to(QO.dtype.element_ty))
        if h < HKV:
            slot = tl.load(POS + b) + l
            kp = K + b * sk_b + l * sk_l + h * sk_h
            k1 = tl.load(kp + d).to(tl.float32)
            k2 = tl.load(kp + HALF + d).to(tl.float32)
            ckp = CK + b * sck_b + h * sck_h + slot * sck_s
            tl.store(ckp + d, (k1 * c - k2 * s).to(CK.dtype.element_ty))
            tl.store(ckp + HALF + d, (k2 * c + k1 * s).to(CK.dtype.element_ty))
            vp = V + b * sv_b + l * sv_l + h * sv_h
            cvp = CV + b * scv_b + h * scv_h + slot * scv_s
            tl.store(cvp + d, tl.load(vp + d).to(CV.dtype.element_ty))
            tl.store(cvp + HALF + d, tl.load(vp + HALF + d).to(CV.dtype.element_ty))

    return _rotary_kv_kernel


def rotary_kv(q, k, v, cos, sin, cache_k, cache_v, write_pos):
    B, L, H, D = q.shape
    HKV = k.shape[2]
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"rotary_kv needs an even head_dim with a power-of-two half, got {D}")
    for t in (q, k, v, cache_k, cache_v):
        if t.stride(-1) != 1:
            raise ValueError("rotary_kv needs a contiguous last (head_dim) dimension")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    write_pos = write_pos.to(torch.int64).contiguous()  # an expand()ed scalar has stride 0: materialise
    qo = torch.empty_like(q)
    _kernel()[(B * L, H)](
        q, k, v, cos, sin, cache_k, cache_v, write_pos, qo,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), L, HKV, HALF=D // 2)
    return qo
