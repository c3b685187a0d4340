"""CPU decode step for the rollout engine: the same model and cache, fewer and cheaper ops per step.

At the CPU RFT shape (small preset, 34 rows) a decode step written as torch ops is a few hundred small ops, so
per-op overhead and needless passes over the scores matter as much as the matmuls. Here:
  - each layer is one call of kernels/decode_layer_cpu.py: in fp32 a C++ layer (rotary, cache writes, norms and
    GEMMs in one call), torch ops otherwise;
  - q/k/v and gate/up are one matmul each (WorldModel.fused_weights), every weight packed once per rollout for
    kernels/linear_cpu.py, a GEMM that prefetches the next panel of weights while it multiplies this one (the K/V
    pass evicts the weights before each step's GEMMs, where MKL runs at about half its in-cache rate); the residual
    adds ride in the GEMM;
  - rotary tables are built once per rollout for every suffix slot of every group;
  - attention is kernels/decode_attention_cpu.py: the group-shared prefix (packed once per rollout) as a GEMM over
    the group's queries, each row's suffix read once (no mask: every filled suffix slot is visible, causal inside
    a chunk of more than one token; the ragged prefix is cut at each group's length);
  - the LM head runs over the dynamics-code rows of the last position only.
Math follows WorldModel.hidden op for op (HF RMSNorm order, rotate_half rotary, fp32 softmax).
"""
from __future__ import annotations

import torch

from vla_rft_engine.kernels.decode_attention_cpu import pack_prefix
from vla_rft_engine.kernels.decode_layer_cpu import decode_layer_cpu, layer_weights, rms_norm_cpu
from vla_rft_engine.kernels.linear_cpu import linear_cpu, pack_linear_cpu


class CpuDecoder:
    def __init__(self, wm, cache, prefix_lens: torch.Tensor):
        cfg = wm.config
        self.wm, self.cache, self.cfg = wm, cache, cfg
        dtype = wm.output.weight.dtype
        self.layers = [layer_weights(blk.attention_norm.weight, wqkv, blk.attention.wo.weight, blk.ffn_norm.weight,
                                     w13, blk.feed_forward.w2.weight)
                       for (wqkv, w13), blk in zip(wm.fused_weights(), wm.layers)]
        head = wm.output.weight[:cfg.num_codes].detach()  # dynamics codes only
        self.head = (head, pack_linear_cpu(head))
        # rotary tables for suffix slot s of group g: position prefix_lens[g] + s
        pos = prefix_lens.to(torch.int64)[:, None] + torch.arange(cache.suffix_len)
        cos, sin = wm.rope(pos)  # (G, S, D/2) fp32
        self.cos, self.sin = cos.to(dtype).contiguous(), sin.to(dtype).contiguous()
        self.prefix_lens = prefix_lens.to(torch.int64).cpu().contiguous()  # host copy: no sync per step
        # the prompt prefix is final after the prefill: packed once for the attention's GEMMs
        self.prefix_packed = [pack_prefix(k, v, self.prefix_lens) for k, v in zip(cache.prefix_k, cache.prefix_v)]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) at the cache's current fill level -> dynamics-code logits (B, num_codes) of the last one."""
        c, cfg = self.cache, self.cfg
        s0 = c.s0_host
        x = self.wm.embed(ids, c)  # (B, L, dim), + action conditioning when the model has it
        for i, w in enumerate(self.layers):
            x = decode_layer_cpu(x, w, self.cos, self.sin, c.prefix_k[i], c.prefix_v[i], self.prefix_lens,
                                 c.suffix_k[i], c.suffix_v[i], s0, cfg.n_head, cfg.rms_eps, self.prefix_packed[i])
        c.advance(ids.shape[1])
        return linear_cpu(rms_norm_cpu(x[:, -1], self.wm.norm.weight, cfg.rms_eps), *self.head)
