"""Split-K (flash-decoding) attention for group rollouts: a shared per-group prefix + a per-sample suffix.

Layout: prefix caches (G, Hkv, P, D) hold each start state's prompt once, valid length prefix_lens[g];
suffix caches (B = G*N, Hkv, S, D) hold each sample's generated tokens, the chunk being decoded already
written at [s0, s0+L). Query q (B, L, H, D), head h uses kv head h // (H // Hkv).

The prefix pass runs one program per (group, kv head, key split, query tile) whose queries are all the
N samples x rep heads x L tokens of that group: each prefix K/V block is read from HBM once per group,
not once per sample. The suffix pass is the same kernel per sample with a causal mask. Partial results
(output, log-sum-exp) of all splits of both passes are merged at the end.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): there we upcast them to fp32.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention_reference(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, s0: int):
    """Materialised per-sample [prefix | suffix] attention in fp32 (the plain definition)."""
    B, L, H, D = q.shape
    G, HKV, P, _ = prefix_k.shape
    N, rep = B // G, H // HKV
    k = torch.cat([prefix_k.repeat_interleave(N, 0), suffix_k[:, :, :s0 + L]], 2).float()
    v = torch.cat([prefix_v.repeat_interleave(N, 0), suffix_v[:, :, :s0 + L]], 2).float()
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, P+s0+L, D)
    s = torch.einsum("blhd,bhkd->bhlk", q.float(), k) / D ** 0.5
    lens = prefix_lens.repeat_interleave(N)
    j = torch.arange(P + s0 + L, device=q.device)
    pre_ok = j[None, :] < lens[:, None]  # (B, K)
    suf_ok = (j[None, :] >= P) & (j[None, :] - P <= s0 + torch.arange(L, device=q.device)[:, None])  # (L, K)
    ok = (pre_ok[:, None, :] & (j < P)[None, None, :]) | suf_ok[None]
    s = s.masked_fill(~ok[:, None], float("-inf"))
    return torch.einsum("bhlk,bhkd->blhd", s.softmax(-1), v).to(q.dtype)


@triton.jit
def _partial_kernel(Q, K, V, O, LSE, LENS, QOFF,
                    sq_x, sq_h, sq_m, sk_x, sk_h, sk_s, sv_x, sv_h, sv_s,
                    so_x, so_h, so_sp, so_m, sl_x, sl_h, sl_sp,
                    len_stride, HKV, M, L_CHUNK, split_size, scale,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
    xh = tl.program_id(0)
    sp = tl.program_id(1)
    mt = tl.program_id(2)
    x = xh // HKV
    h = xh % HKV
    kv_len = tl.load(LENS + x * len_stride)
    start = sp * split_size
    end = tl.minimum(start + split_size, kv_len)
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + x * sq_x + h * sq_h + rows[:, None] * sq_m + d[None, :], mask=rmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if CAUSAL:
        qpos = tl.load(QOFF) + rows % L_CHUNK  # suffix slot of each query row (rows ordered rep-major, token-minor)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k = tl.load(K + x * sk_x + h * sk_h + cols[None, :] * sk_s + d[:, None], mask=cmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PREC) * scale
        ok = cmask[None, :] & rmask[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay at zero weight
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + x * sv_x + h * sv_h + cols[:, None] * sv_s + d[None, :], mask=cmask[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = p.to(v.dtype)  # bf16 operands for the tensor cores (rounded like them under the interpreter)
        if UPCAST:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O + x * so_x + h * so_h + sp * so_sp + rows[:, None] * so_m + d[None, :], out, mask=rmask[:, None])
    tl.store(LSE + x * sl_x + h * sl_h + sp * sl_sp + rows, lse, mask=rmask)


def _partials(q4, k, v, lens, len_stride, qoff, causal, l_chunk, split_size, block_n):
    """q4 (X, Hkv, M, D) against k/v (X, Hkv, S, D) -> O (X, Hkv, splits, M, D) fp32, LSE (X, Hkv, splits, M)."""
    X, HKV, M, D = q4.shape
    S = k.shape[2]
    splits = max(1, triton.cdiv(S, split_size))
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    o = torch.empty((X, HKV, splits, M, D), dtype=torch.float32, device=q4.device)
    lse = torch.empty((X, HKV, splits, M), dtype=torch.float32, device=q4.device)
    grid = (X * HKV, splits, triton.cdiv(M, block_m))
    _partial_kernel[grid](q4, k, v, o, lse, lens, qoff,
                          q4.stride(0), q4.stride(1), q4.stride(2), k.stride(0), k.stride(1), k.stride(2),
                          v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), o.stride(3),
                          lse.stride(0), lse.stride(1), lse.stride(2), len_stride, HKV, M, l_chunk, split_size,
                          D ** -0.5, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D,
                          PREC="ieee" if q4.dtype == torch.float32 or _INTERPRET else "tf32", UPCAST=_INTERPRET)
    return o, lse


def merge_partials(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Combine split results along dim 2: softmax-weighted by their log-sum-exp."""
    m = lse.amax(2, keepdim=True)
    w = torch.exp(lse - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    return (o * w[..., None]).sum(2) / w.sum(2).clamp_min(1e-30)[..., None]


def decode_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, s0, split_size: int = 256,
                     block_n: int = 32):
    """q (B, L, H, D) -> (B, L, H, D). s0: suffix tokens cached before this chunk (int or 0-d device tensor).

    split_size: keys per program (a multiple of block_n); smaller -> more parallelism for short batches.
    """
    B, L, H, D = q.shape
    G, HKV, _, _ = prefix_k.shape
    if B % G or H % HKV:
        raise ValueError(f"batch {B} must be a multiple of groups {G} and heads {H} of kv heads {HKV}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"decode_attention needs a power-of-two head_dim >= 16, got {D}")
    N, rep = B // G, H // HKV
    split_size = max(block_n, split_size // block_n * block_n)
    s0_t = torch.as_tensor(s0, device=q.device, dtype=torch.int64).reshape(1)
    plens = prefix_lens.to(device=q.device, dtype=torch.int64).contiguous()
    qp = q.view(G, N, L, HKV, rep, D).permute(0, 3, 1, 4, 2, 5).reshape(G, HKV, N * rep * L, D)
    op, lp = _partials(qp, prefix_k, prefix_v, plens, 1, s0_t, False, L, split_size, block_n)
    qs = q.view(B, L, HKV, rep, D).permute(0, 2, 3, 1, 4).reshape(B, HKV, rep * L, D)
    op = op.view(G, HKV, -1, N, rep * L, D).permute(0, 3, 1, 2, 4, 5).reshape(B, HKV, -1, rep * L, D)
    lp = lp.view(G, HKV, -1, N, rep * L).permute(0, 3, 1, 2, 4).reshape(B, HKV, -1, rep * L)
    os_, ls = _partials(qs, suffix_k, suffix_v, s0_t + L, 0, s0_t, True, L, split_size, block_n)
    out = merge_partials(torch.cat([op, os_], 2), torch.cat([lp, ls], 2))  # (B, HKV, rep*L, D)
    return out.view(B, HKV, rep, L, D).permute(0, 3, 1, 2, 4).reshape(B, L, H, D).to(q.dtype)
