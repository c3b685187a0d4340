"""Decode attention on the CPU: each row's queries over its group's prompt prefix and its own suffix.

    out = decode_attention_cpu(q, pk, pv, plens, sk, sv, S)
q (B, H, D), one token per row, or (B, L, H, D), a chunk of L tokens per row that fills the last L of the S suffix
slots (position l sees slots [0, S - L + 1 + l): causal inside the chunk); prefix caches pk/pv (G, Hkv, P, D), read
for slots [0, plens[g]) by the B/G rows of group g; suffix caches sk/sv (B, Hkv, Smax, D), slots [0, S) of each
row; returns q's shape. GQA when H > Hkv.

fp32 runs C++ (csrc/decode_attention_cpu.h, module vla_rft_engine._attn_cpu): the prefix as one matrix product
per (group, kv head), each row's suffix as matrix-vector loops that read it once, faster than batched matmuls over
the (row, head) pairs (bench/results/cpu_inference_cpu.json). Other dtypes, non-contiguous caches (the engine's
never are), or a build without the extension run `decode_attention_cpu_reference`: the prefix scored once per
group with the N rows' queries stacked, fp32 softmax, as WorldModel.hidden computes. Prefix padding slots must hold finite values (the
cache starts at zeros): the reference multiplies them by probability 0, the C++ op does not read them.
"""
from __future__ import annotations

import warnings

import torch

try:
    from vla_rft_engine import _attn_cpu as _ext  # type: ignore[attr-defined]  # compiled, no stub
except ImportError as e:  # not built (e.g. torch was missing at install time): the reference runs instead
    _ext, _WHY = None, str(e)
_warned = False


def extension_available() -> bool:
    return _ext is not None


def decode_attention_cpu_reference(q, pk, pv, plens, sk, sv, S: int) -> torch.Tensor:
    if q.dim() == 4:  # a chunk: position l sees the suffix up to its own slot
        L = q.shape[1]
        return torch.stack([decode_attention_cpu_reference(q[:, l], pk, pv, plens, sk, sv, S - L + 1 + l)
                            for l in range(L)], 1)
    B, H, D = q.shape
    G, HKV, P, _ = pk.shape
    N, rep = B // G, H // HKV
    qg = q.reshape(G, N, HKV, rep, D).transpose(1, 2).reshape(G, HKV, N * rep, D)
    sp = torch.matmul(qg, pk.transpose(-1, -2))  # (G, HKV, N*rep, P): the prompt read once per group
    pad = torch.arange(P)[None, :] >= plens.cpu()[:, None]  # (G, P)
    if bool(pad.any()):
        sp = sp.masked_fill(pad.to(sp.device)[:, None, None], float("-inf"))
    ss = torch.matmul(q.reshape(B, HKV, rep, D), sk[:, :, :S].transpose(-1, -2))  # (B, HKV, rep, S)
    sp = sp.view(G, HKV, N, rep, P).transpose(1, 2).reshape(B, HKV, rep, P)
    prob = torch.cat([sp, ss], -1).float().mul_(D ** -0.5).softmax(-1).to(q.dtype)
    out = torch.matmul(prob[..., P:], sv[:, :, :S])  # (B, HKV, rep, D)
    pp = prob[..., :P].reshape(G, N, HKV, rep, P).transpose(1, 2).reshape(G, HKV, N * rep, P)
    out += torch.matmul(pp, pv).view(G, HKV, N, rep, D).transpose(1, 2).reshape(B, HKV, rep, D)
    return out.view(B, H, D)


def pack_prefix(pk, pv, plens):
    """The prefix caches as the C++ op's GEMM panels (once per rollout: the prefix does not change after the
    prefill), or None where the reference runs (other dtypes, no extension)."""
    if _ext is None or pk.dtype != torch.float32 or pk.device.type != "cpu":
        return None
    return tuple(_ext.pack_prefix(pk.contiguous(), pv.contiguous(), plens.to(torch.int64).contiguous()))


def decode_attention_cpu(q, pk, pv, plens, sk, sv, S: int, packed=None) -> torch.Tensor:
    """See the module docstring. plens: (G,) int64 on the CPU (host lengths; no device sync needed); packed:
    pack_prefix(pk, pv, plens), made here when not given."""
    if _ext is not None and q.dtype == torch.float32 and q.device.type == "cpu" and sk.is_contiguous() and \
            sv.is_contiguous():
        kp, vp = packed if packed is not None else pack_prefix(pk, pv, plens)
        return _ext.decode_attention(q.contiguous(), kp, vp, plens, sk, sv, S)
    global _warned
    if _ext is None and not _warned:
        _warned = True
        warnings.warn(f"vla_rft_engine._attn_cpu is not built ({_WHY}); CPU decode attention runs as batched matmuls, "
                      "about 1.5x slower. Reinstall with `pip install --no-build-isolation -e .` once torch is installed.")
    return decode_attention_cpu_reference(q, pk, pv, plens, sk, sv, S)
