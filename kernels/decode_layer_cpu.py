"""One world-model layer for a CPU decode step: x (B, L, dim), the step's L tokens per row at suffix slots
[s0, s0 + L), updated layer by layer.

    w = layer_weights(attention_norm, wqkv, wo, ffn_norm, w13, w2)      # once per rollout (packs the GEMM panels)
    x = decode_layer_cpu(x, w, cos, sin, pk, pv, plens, sk, sv, s0, n_head, eps, packed_prefix)

    h = x + wo @ attention(rotary(q), [group prefix | row suffix, this step's rotary(k) and v written at s0..s0+L))
    x = h + w2 @ (silu(w1 @ rms(h)) * (w3 @ rms(h)))      q, k, v = wqkv @ rms(x)

as WorldModel.hidden computes it (HF RMSNorm order, rotate_half rotary with cos/sin (G, Smax, D/2) holding suffix
slot s's angles for group g, fp32 softmax). In fp32 with the extension built, the whole layer is one C++ call
(csrc/decode_attention_cpu.cpp, module vla_rft_engine._attn_cpu): GEMMs of kernels/linear_cpu.py, attention of
kernels/decode_attention_cpu.py, rotary and cache writes in one loop. At the CPU RFT shape the ~45 small torch ops
a layer takes otherwise cost more in dispatch than in arithmetic. `decode_layer_cpu_reference` (torch ops, the
attention's reference) runs for other dtypes or without the build.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .decode_attention_cpu import decode_attention_cpu_reference
from .linear_cpu import pack_linear_cpu
from .rotary_kv import apply_rotary

try:
    from vla_rft_engine import _attn_cpu as _ext  # type: ignore[attr-defined]  # compiled, no stub
except ImportError:  # not built: the reference runs (kernels/decode_attention_cpu.py warns once)
    _ext = None
if _ext is not None and not hasattr(_ext, "decode_layer"):  # a build from before the op: rebuild to get it
    import warnings
    warnings.warn("vla_rft_engine._attn_cpu predates decode_layer; CPU decode layers run as torch ops. Rebuild with "
                  "`pip install --no-build-isolation -e .`")
    _ext = None


class LayerWeights(NamedTuple):
    attention_norm: torch.Tensor
    wqkv: torch.Tensor  # q | k | v rows
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor  # gate | up rows
    w2: torch.Tensor
    packed: tuple[torch.Tensor, ...] | None  # (wqkv, wo, w13, w2) packed for the C++ layer; None: the reference


def layer_weights(attention_norm, wqkv, wo, ffn_norm, w13, w2) -> LayerWeights:
    an, qkv, o, fn, gu, down = (t.detach() for t in (attention_norm, wqkv, wo, ffn_norm, w13, w2))
    packs = [pack_linear_cpu(w) for w in (qkv, o, gu, down)] if _ext is not None else [None]
    packed = None if any(p is None for p in packs) else tuple(p for p in packs if p is not None)
    return LayerWeights(an, qkv, o, fn, gu, down, packed)


def rms_norm_cpu(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # bitwise equal to RMSNorm.forward in fp32, one op
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def decode_layer_cpu_reference(x, w: LayerWeights, cos, sin, pk, pv, plens, sk, sv, s0: int, n_head: int,
                               eps: float) -> torch.Tensor:
    B, L, dim = x.shape
    G, HKV, D = pk.shape[0], sk.shape[1], sk.shape[3]
    N, H = B // G, n_head
    x = x.reshape(B * L, dim)
    qkv = torch.mm(rms_norm_cpu(x, w.attention_norm, eps), w.wqkv.t())
    c, s = (t[:, s0:s0 + L].repeat_interleave(N, 0) for t in (cos, sin))  # (G, S, D/2) -> each row's (B, L, D/2)
    rot = apply_rotary(qkv[:, :(H + HKV) * D].view(B, L, H + HKV, D), c, s)
    sk[:, :, s0:s0 + L] = rot[:, :, H:].transpose(1, 2)
    sv[:, :, s0:s0 + L] = qkv[:, (H + HKV) * D:].view(B, L, HKV, D).transpose(1, 2)
    y = decode_attention_cpu_reference(rot[:, :, :H], pk, pv, plens, sk, sv, s0 + L).reshape(B * L, H * D)
    x = x + torch.mm(y, w.wo.t())  # low precision: the product rounds first, as the module does
    gu = torch.mm(rms_norm_cpu(x, w.ffn_norm, eps), w.w13.t())
    Ih = gu.shape[1] // 2
    x = x + torch.mm(F.silu(gu[:, :Ih]) * gu[:, Ih:], w.w2.t())
    return x.view(B, L, dim)


def decode_layer_cpu(x, w: LayerWeights, cos, sin, pk, pv, plens, sk, sv, s0: int, n_head: int, eps: float,
                     packed_prefix=None) -> torch.Tensor:
    """See the module docstring. plens (G,) int64 host lengths; packed_prefix: kernels.decode_attention_cpu
    .pack_prefix(pk, pv, plens) (the C++ layer runs only with it). Returns the new x; the C++ layer writes it in
    place of a contiguous x."""
    if (w.packed is not None and packed_prefix is not None and x.dtype == torch.float32 and sk.is_contiguous()
            and sv.is_contiguous() and cos.dtype == torch.float32
            and not (x.requires_grad and torch.is_grad_enabled())):  # the C++ layer writes x, untracked
        wqkv, wo, w13, w2 = w.packed
        return _ext.decode_layer(x.contiguous(), w.attention_norm, wqkv, wo, w.ffn_norm, w13, w2,
                                 cos.contiguous(), sin.contiguous(), *packed_prefix, plens, sk, sv, s0, n_head, eps)
    return decode_layer_cpu_reference(x, w, cos, sin, pk, pv, plens, sk, sv, s0, n_head, eps)
