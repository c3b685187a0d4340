"""Cached attention backends for the rollout engine (prefix shared per group + suffix per sample).

Every backend takes q (B, L, H, D), the layer's prefix caches (G, Hkv, P, D) with valid lengths
prefix_lens (G,), suffix caches (B, Hkv, S, D) with the current chunk already written at [s0, s0+L),
and returns (B, L, H, D):
  triton -- kernels/decode_attention.py: split-K, prefix K/V read once per group.
  eager  -- plain torch matmuls; prefix scores computed per group (queries of the N samples stacked),
            so the prefix is also read once per group.
  sdpa   -- torch SDPA over a per-sample [prefix | suffix] view. SDPA returns no log-sum-exp, so two
            partial attentions cannot be merged; this path copies the prefix per sample per step
            (compute is still shared: the prompt was prefilled once). Fine for CPU; prefer triton/flash.
  flash  -- flash_attn_with_kvcache on prefix (grouped queries) and suffix, merged by log-sum-exp.
  auto   -- the default: triton on CUDA (sdpa where Triton is not installed), sdpa on the CPU (whose decode
            steps run through engine/cpu_decode.py, which reads the prefix once per group). See resolve_backend.
`kv_hint` (host int or None) bounds the suffix length for slicing on eager paths; None under CUDA graphs.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "flash", "eager")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The attention backend a rollout runs: `auto` becomes the fastest correct one for the device."""
    if name not in BACKENDS:
        raise ValueError(f"attn_backend '{name}' unknown; choose one of {BACKENDS}")
    if name != "auto":
        return name
    return ("triton" if has_triton() else "sdpa") if torch.device(device).type == "cuda" else "sdpa"


def _masks(prefix_lens, P, s0, L, S_used, device):
    pre = torch.arange(P, device=device)[None, :] < prefix_lens[:, None]  # (G, P)
    qpos = s0 + torch.arange(L, device=device)  # s0 may be a 0-d tensor
    suf = torch.arange(S_used, device=device)[None, :] <= qpos[:, None]  # (L, S_used)
    return pre, suf


def eager_attention(q, pk, pv, plens, sk, sv, s0, kv_hint=None):
    B, L, H, D = q.shape
    G, HKV, P, _ = pk.shape
    N, rep = B // G, H // HKV
    S_used = sk.shape[2] if kv_hint is None else kv_hint
    sk, sv = sk[:, :, :S_used], sv[:, :, :S_used]
    scale = D ** -0.5
    qg = q.view(G, N, L, HKV, rep, D).permute(0, 3, 1, 4, 2, 5).reshape(G, HKV, N * rep * L, D)
    sp = (qg @ pk.transpose(-1, -2)).float() * scale  # (G, HKV, N*rep*L, P): one pass over the prefix per group
    qs = q.view(B, L, HKV, rep, D).permute(0, 2, 3, 1, 4).reshape(B, HKV, rep * L, D)
    ss = (qs @ sk.transpose(-1, -2)).float() * scale  # (B, HKV, rep*L, S_used)
    pre, suf = _masks(plens, P, s0, L, S_used, q.device)
    sp = sp.masked_fill(~pre[:, None, None, :], float("-inf"))
    ss = ss.masked_fill(~suf.repeat(rep, 1)[None, None], float("-inf"))
    sp = sp.view(G, HKV, N, rep * L, P).transpose(1, 2).reshape(B, HKV, rep * L, P)
    prob = torch.cat([sp, ss], -1).softmax(-1).to(q.dtype)
    pp = prob[..., :P].reshape(G, N, HKV, rep * L, P).transpose(1, 2).reshape(G, HKV, N * rep * L, P)
    out = (pp @ pv).view(G, HKV, N, rep * L, D).transpose(1, 2).reshape(B, HKV, rep * L, D)
    out = out + prob[..., P:] @ sv
    return out.view(B, HKV, rep, L, D).permute(0, 3, 1, 2, 4).reshape(B, L, H, D)


def sdpa_attention(q, pk, pv, plens, sk, sv, s0, kv_hint=None):
    B, L, H, D = q.shape
    G, HKV, P, _ = pk.shape
    N = B // G
    S_used = sk.shape[2] if kv_hint is None else kv_hint
    k = torch.cat([pk.repeat_interleave(N, 0), sk[:, :, :S_used]], 2)
    v = torch.cat([pv.repeat_interleave(N, 0), sv[:, :, :S_used]], 2)
    pre, suf = _masks(plens, P, s0, L, S_used, q.device)
    mask = torch.cat([pre.repeat_interleave(N, 0)[:, None, :].expand(B, L, P), suf[None].expand(B, L, S_used)], -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None], enable_gqa=H != HKV)
    return out.transpose(1, 2)


def triton_attention(q, pk, pv, plens, sk, sv, s0, kv_hint=None, split_size=None):
    from vla_rft_engine.kernels.decode_attention import decode_attention
    if split_size is None:  # about one wave of programs on a GPU; small splits under the interpreter
        split_size = 256 if q.is_cuda else 32
    return decode_attention(q, pk, pv, plens, sk, sv, s0, split_size=split_size)


def flash_attention(q, pk, pv, plens, sk, sv, s0, kv_hint=None):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        raise RuntimeError("attn_backend='flash' needs flash-attn (pip install flash-attn); use 'triton' or 'sdpa'") from e
    from vla_rft_engine.kernels.decode_attention import merge_partials
    B, L, H, D = q.shape
    G, HKV, _, _ = pk.shape
    N = B // G
    # prefix: the N samples' queries of a group ride as one longer query sequence, no causal mask
    qg = q.reshape(G, N * L, H, D)
    op, lp = flash_attn_with_kvcache(qg, pk.transpose(1, 2), pv.transpose(1, 2), cache_seqlens=plens.int(),
                                     causal=False, return_softmax_lse=True)
    s_len = (torch.as_tensor(s0, device=q.device) + L).int().expand(B).contiguous()
    os_, ls = flash_attn_with_kvcache(q, sk.transpose(1, 2), sv.transpose(1, 2), cache_seqlens=s_len, causal=True,
                                      return_softmax_lse=True)
    op = op.reshape(B, L, H, D).float()
    lp = lp.view(G, H, N, L).permute(0, 2, 1, 3).reshape(B, H, L).transpose(1, 2)  # (B, L, H)
    ls = ls.transpose(1, 2)
    out = merge_partials(torch.stack([op, os_.float()], 2), torch.stack([lp, ls], 2))
    return out.to(q.dtype)


BACKEND_FNS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention, "flash": flash_attention}


def prefill_attention(q, k, v, backend: str):
    """Causal attention of a right-padded prompt over itself (padding sits after every valid token)."""
    H, HKV = q.shape[2], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "eager":
        k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        L = q.shape[2]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != HKV).transpose(1, 2)
