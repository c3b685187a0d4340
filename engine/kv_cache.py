"""Static KV cache for one batch of group rollouts, sized up front, and the `attend` hook the model calls.

Memory layout (per layer, K and V alike):
  prefix (G, Hkv, P, D)       -- the group's prompt, prefilled once and read by all N samples of the group
  suffix (G*N, Hkv, S, D)     -- each sample's own generated frames + appended actions
Prompts are RIGHT-padded: row g's prompt occupies prefix slots [0, prefix_lens[g]); its generated tokens
take rotary positions prefix_lens[g] + s. The suffix fill level `s0` is the same for every sample (all
rows advance in lock-step), kept as a device scalar so a captured CUDA graph can replay at moving slots.
"""
from __future__ import annotations

import torch

from .attention import BACKEND_FNS, prefill_attention, resolve_backend


class RolloutCache:
    def __init__(self, cfg, groups: int, samples: int, prefix_len: int, suffix_len: int, dtype, device,
                 backend: str | None = None):
        shape_p = (cfg.n_layer, groups, cfg.n_kv_head, prefix_len, cfg.head_dim)
        shape_s = (cfg.n_layer, groups * samples, cfg.n_kv_head, suffix_len, cfg.head_dim)
        self.prefix_k = torch.zeros(shape_p, dtype=dtype, device=device)
        self.prefix_v = torch.zeros(shape_p, dtype=dtype, device=device)
        self.suffix_k = torch.zeros(shape_s, dtype=dtype, device=device)
        self.suffix_v = torch.zeros(shape_s, dtype=dtype, device=device)
        self.groups, self.samples = groups, samples
        self.prefix_len, self.suffix_len = prefix_len, suffix_len
        self.backend = resolve_backend(backend or cfg.attn_backend, device)
        self.prefix_lens = torch.full((groups,), prefix_len, dtype=torch.int64, device=device)
        self.s0 = torch.zeros((), dtype=torch.int64, device=device)  # suffix slots filled
        self.s0_host: int | None = 0  # host mirror for slicing on eager paths; None from capture on
        self.mode = "prefill"
        self.action_carry: tuple | None = None  # per-row model state across chunks (WorldModel.embed, action_cond)

    def spread_carry(self) -> None:
        """After the prefill: each group's carried state goes to each of its rows."""
        if self.action_carry is not None:
            self.action_carry = tuple(t.repeat_interleave(self.samples, 0) for t in self.action_carry)

    def set_prefix_lens(self, lens: torch.Tensor) -> None:
        self.prefix_lens.copy_(lens)

    def row_positions(self, L: int) -> torch.Tensor:
        """Rotary positions (B, L) of the next suffix chunk."""
        base = self.prefix_lens.repeat_interleave(self.samples) + self.s0
        return base[:, None] + torch.arange(L, device=self.s0.device)

    def advance(self, L: int) -> None:
        self.s0 += L  # in place: replays of a captured graph keep advancing
        if self.s0_host is not None:
            self.s0_host += L

    def _write(self, ck, cv, q, k, v, cos, sin, write_pos):
        if self.backend == "triton":
            from vla_rft_engine.kernels.rotary_kv import rotary_kv
            return rotary_kv(q, k, v, cos, sin, ck, cv, write_pos)
        from vla_rft_engine.kernels.rotary_kv import apply_rotary
        L = q.shape[1]
        idx = write_pos[:1] + torch.arange(L, device=q.device)  # rows share the slot within each cache
        ck.index_copy_(2, idx, apply_rotary(k, cos, sin).transpose(1, 2).to(ck.dtype))
        cv.index_copy_(2, idx, v.transpose(1, 2).to(cv.dtype))
        return apply_rotary(q, cos, sin)

    def attend(self, layer: int, q, k, v, cos, sin):
        if self.mode == "prefill":  # the prompt of each group: write prefix slots [0, P), causal over itself
            zero = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
            q = self._write(self.prefix_k[layer], self.prefix_v[layer], q, k, v, cos, sin, zero)
            L = q.shape[1]
            kr = self.prefix_k[layer][:, :, :L].transpose(1, 2)
            return prefill_attention(q, kr, self.prefix_v[layer][:, :, :L].transpose(1, 2),
                                     "eager" if self.backend == "eager" else "sdpa")
        pos = self.s0.expand(q.shape[0])
        q = self._write(self.suffix_k[layer], self.suffix_v[layer], q, k, v, cos, sin, pos)
        hint = None if self.s0_host is None else self.s0_host + q.shape[1]
        return BACKEND_FNS[self.backend](q, self.prefix_k[layer], self.prefix_v[layer], self.prefix_lens,
                                         self.suffix_k[layer], self.suffix_v[layer], self.s0, hint)
