"""CPU decode step for the rollout engine: the same model and cache, fewer and cheaper ops per step.

At the CPU RFT shape (small preset, 34 rows) a decode step is a few hundred small ops, so per-op
overhead and needless passes over the scores matter as much as the matmuls. Here:
  - q/k/v and gate/up are one matmul each (WorldModel.fused_weights); the residual adds ride in the GEMM;
  - rotary tables are built once per rollout for every suffix slot of every group and sliced per step;
  - rotary results are written into preallocated buffers, K straight from there into its cache slot;
  - attention is kernels/decode_attention_cpu.py: the group-shared prefix (packed once per rollout)
    as a GEMM over the group's queries, each row's suffix as matrix-vector loops in C++ that read it once (no
    mask: every filled suffix slot is visible; the ragged prefix is cut at each group's length);
  - the LM head runs over the dynamics-code rows of the last position only;
  - in fp32 every weight is packed once per rollout for kernels/linear_cpu.py, a GEMM that prefetches the next
    panel of weights while it multiplies this one: the K/V pass evicts the weights before each step's GEMMs, where
    MKL runs at about half its in-cache rate. The residual adds are its accumulate mode.
Chunks of more than one token (a row's a_0, frame end + action) take the same C++ attention in fp32 (causal inside
the chunk), the generic cached-attention path otherwise.
Math follows WorldModel.hidden op for op (HF RMSNorm order, rotate_half rotary, fp32 softmax).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vla_rft_engine.kernels.decode_attention_cpu import decode_attention_cpu, pack_prefix
from vla_rft_engine.kernels.linear_cpu import linear_cpu, pack_linear_cpu

from .attention import eager_attention


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # bitwise equal to RMSNorm.forward in fp32, one op
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class CpuDecoder:
    def __init__(self, wm, cache, groups: int, samples: int, prefix_lens: torch.Tensor):
        cfg = wm.config
        self.wm, self.cache, self.cfg = wm, cache, cfg
        self.G, self.N, self.B = groups, samples, groups * samples
        self.H, self.HKV, self.D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        dtype = wm.output.weight.dtype
        self.fused = wm.fused_weights()
        head = wm.output.weight[:cfg.num_codes]  # dynamics codes only
        # per layer: (wqkv, w13, wo, w2), each with its packed panels (None: torch.mm runs)
        self.weights = [tuple((w, pack_linear_cpu(w)) for w in (wqkv, w13, blk.attention.wo.weight,
                                                                 blk.feed_forward.w2.weight))
                        for (wqkv, w13), blk in zip(self.fused, wm.layers)]
        self.head = (head, pack_linear_cpu(head))
        # rotary tables for suffix slot s of group g: position prefix_lens[g] + s
        pos = prefix_lens.to(torch.int64)[:, None] + torch.arange(cache.suffix_len)
        cos, sin = wm.rope(pos)  # (G, S, D/2) fp32
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.prefix_lens = prefix_lens.to(torch.int64).cpu().contiguous()  # host copy: no sync per step
        # the prompt prefix is final after the prefill: packed once for the attention's GEMMs
        self.prefix_packed = [pack_prefix(k, v, self.prefix_lens) for k, v in zip(cache.prefix_k, cache.prefix_v)]
        self._bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, L: int):
        if L not in self._bufs:  # rotated q and k, and a scratch product, per chunk length
            shape = (self.G, self.N, L, self.H + self.HKV, 2, self.D // 2)
            dt = self.cos.dtype
            self._bufs[L] = (torch.empty(shape, dtype=dt), torch.empty(shape[:-2] + (self.D // 2,), dtype=dt))
        return self._bufs[L]

    def _rotary(self, qk: torch.Tensor, s0: int, L: int) -> torch.Tensor:
        """qk (G, N, L, H+Hkv, 2, D/2) view of the projections -> rotated copy (rotate_half convention)."""
        out, tmp = self._buffers(L)
        c = self.cos[:, None, s0:s0 + L, None]  # (G, 1, L, 1, D/2)
        s = self.sin[:, None, s0:s0 + L, None]
        x1, x2 = qk[..., 0, :], qk[..., 1, :]
        o1, o2 = out[..., 0, :], out[..., 1, :]
        torch.mul(x1, c, out=o1)
        o1.sub_(torch.mul(x2, s, out=tmp))
        torch.mul(x2, c, out=o2)
        o2.add_(torch.mul(x1, s, out=tmp))
        return out

    @staticmethod
    def _residual(x, y, weight):  # x + y @ w.T
        w, packed = weight
        if x.dtype == torch.float32:  # the add rides in the GEMM
            return linear_cpu(y, w, packed, out=x, accumulate=True)  # x is always this step's own tensor
        return x + torch.mm(y, w.t())  # low precision: round the product first, as the module does

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) at the cache's current fill level -> dynamics-code logits (B, num_codes) of the last one."""
        c, cfg = self.cache, self.cfg
        B, L = ids.shape
        G, N, H, HKV, D = self.G, self.N, self.H, self.HKV, self.D
        s0 = c.s0_host
        x = self.wm.embed(ids, c).view(B * L, -1)  # + action conditioning when the model has it
        for i, (blk, (wqkv, w13, wo, w2)) in enumerate(zip(self.wm.layers, self.weights)):
            qkv = linear_cpu(_rms(x, blk.attention_norm.weight, cfg.rms_eps), *wqkv)
            qk = qkv[:, :(H + HKV) * D].view(G, N, L, H + HKV, 2, D // 2)
            rot = self._rotary(qk, s0, L).view(B, L, H + HKV, D)
            sk, sv = c.suffix_k[i], c.suffix_v[i]
            sk[:, :, s0:s0 + L].copy_(rot[:, :, H:].transpose(1, 2))
            sv[:, :, s0:s0 + L].copy_(qkv[:, (H + HKV) * D:].view(B, L, HKV, D).transpose(1, 2))
            if L == 1 or self.prefix_packed[i] is not None:  # C++ (one token, or the action step's chunk)
                q = rot[:, 0, :H] if L == 1 else rot[:, :, :H]
                y = decode_attention_cpu(q, c.prefix_k[i], c.prefix_v[i], self.prefix_lens, sk, sv, s0 + L,
                                         packed=self.prefix_packed[i]).reshape(B * L, H * D)
            else:
                y = eager_attention(rot[:, :, :H].contiguous(), c.prefix_k[i], c.prefix_v[i], c.prefix_lens, sk, sv, c.s0,
                                    s0 + L).reshape(B * L, H * D)
            x = self._residual(x, y, wo)
            gu = linear_cpu(_rms(x, blk.ffn_norm.weight, cfg.rms_eps), *w13)
            I = gu.shape[1] // 2
            g = F.silu(gu[:, :I], inplace=True) * gu[:, I:]  # a new contiguous tensor for the GEMM
            x = self._residual(x, g, w2)
        c.advance(L)
        h = _rms(x.view(B, L, -1)[:, -1], self.wm.norm.weight, cfg.rms_eps)
        return linear_cpu(h, *self.head)
