"""The rollout's per-token work as programs over static buffers, so that on CUDA each is one graph replay.

    decode  sample a token from `logits`, write it, then the single-token step          (tokens 0 .. F-2 of a frame)
    action  sample, write, then one (1 + A)-token step: the frame's last token + `acts`  (a frame's last token)
    last    sample and write only                                                       (the rollout's last token)

Sampling covers guidance (lerp of each row's conditional and unconditional logits), the finite-logits flag, the
Gumbel transform of the uniform draw `u`, the sampler itself, and the writes of the token and its log-prob at the
device-side position `pos`. Nothing inside reads a device value on the host, so on CUDA `capture` records decode
and action once as CUDA graphs and each token is one replay; elsewhere the same code runs eagerly (the CPU tests
run it). The uniform draw is made by the caller from its generator (torch.rand into `u`) outside the graph: the
random stream is the one a fresh draw per step gives, and no generator state is captured.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from vla_rft_engine.kernels.sampling import gumbel_from_uniform_


class TokenStep:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], sample: Callable, logits: torch.Tensor,
                 tokens: torch.Tensor, logps: torch.Tensor | None, *, groups: int, samples: int, temperature: float,
                 top_k: int, top_p: float, guidance: float, first_action: torch.Tensor | None, clock=None):
        """logits: (rows, V) after the prompt, rows = groups * samples (x2 with guidance: each row's unconditional
        twin); tokens / logps: (groups * samples, T, F) outputs; first_action: (rows, A), the action after the first
        frame (None in a one-frame rollout), which also gives the action step's shape for capture."""
        self.forward, self.sample, self.clock = forward, sample, clock
        self.G, self.N, self.guidance = groups, samples, guidance
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        dev, B = logits.device, groups * samples
        self.logits = logits
        self.tokens = tokens.view(B, -1)
        self.logps = None if logps is None else logps.view(B, -1)
        self.u = None if temperature == 0 else torch.full((B, logits.shape[1]), 0.5, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)  # next (t * F + f) to write
        self.finite = torch.ones((), dtype=torch.bool, device=dev)  # all logits finite so far
        self.acts = None if first_action is None else first_action.clone()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.static = False  # True from capture on: logits is a fixed buffer
        self._timing = True  # off while capture runs the programs

    def _lap(self, key: str) -> None:
        if self.clock is not None and self._timing:
            self.clock.lap(key)

    def _sample(self) -> torch.Tensor:
        logits = self.logits
        if self.guidance > 0:
            lc, lu = logits.view(self.G, 2, self.N, -1).unbind(1)
            logits = torch.lerp(lu, lc, 1.0 + self.guidance).reshape(self.G * self.N, -1)  # lc + w (lc - lu)
        self.finite &= torch.isfinite(logits.sum())  # one pass (isfinite().all() is ~20x slower on a CPU);
        # flags NaN/Inf, and finite logits whose sum overflows fp32, which are as broken
        noise = None
        if self.u is not None:
            noise = gumbel_from_uniform_(self.u)
        tok, lp = self.sample(logits, noise, self.temperature, self.top_k, self.top_p)
        self.tokens.index_copy_(1, self.pos, tok[:, None])
        if self.logps is not None:
            self.logps.index_copy_(1, self.pos, lp[:, None].float())
        self.pos += 1
        self._lap("sample_s")
        if self.guidance > 0:  # both twins continue from the same token
            tok = tok.view(self.G, 1, self.N).expand(self.G, 2, self.N).reshape(-1)
        return tok

    def _step(self, ids: torch.Tensor, key: str) -> None:
        out = self.forward(ids)
        if self.static:
            self.logits.copy_(out)
        else:
            self.logits = out
        self._lap(key)

    def _decode(self) -> None:
        self._step(self._sample()[:, None], "decode_s")

    def _action(self) -> None:
        assert self.acts is not None
        self._step(torch.cat([self._sample()[:, None], self.acts], 1), "action_s")

    def decode(self) -> None:
        self._run("decode", self._decode, "decode_s")

    def action(self, acts: torch.Tensor) -> None:
        """acts (rows, A): the action after this frame."""
        if self.acts is None:
            raise ValueError("this TokenStep was built for a one-frame rollout (first_action=None): no action step")
        self.acts.copy_(acts)
        self._run("action", self._action, "action_s")

    def last(self) -> None:
        self._sample()

    def _run(self, name: str, fn: Callable[[], None], key: str) -> None:
        g = self.graphs.get(name)
        if g is None:
            fn()  # laps its own phases
        else:
            g.replay()
            self._lap(key)  # sampling included: it is inside the graph

    def capture(self, cache, decode: bool = True) -> None:
        """Record decode (when frames have more than one token) and action (when there is a frame after the
        first) as CUDA graphs. A warm-up on a side stream compiles and autotunes first. After each warm-up
        program and each capture, everything it moved (cache fill level and action carry, pos, flags, logits)
        is restored, so it takes at most one token and 1 + A suffix slots, which the real steps overwrite."""
        self.static, self._timing, self.logits = True, False, self.logits.clone()  # the graphs' fixed input
        carry = cache.action_carry or ()
        live = [cache.s0, self.pos, self.finite, self.logits, *carry]
        saved = [t.clone() for t in live]
        cache.s0_host = None  # every step that moves the cache is in a graph from here on: no host mirror

        def restore():
            for t, s in zip(live, saved):
                t.copy_(s)
        names = ([("decode", self._decode)] if decode else []) + ([("action", self._action)] if self.acts is not None else [])
        with _side_stream():
            for _ in range(2):
                for _, fn in names:
                    fn()
                    restore()
        pool = None
        for name, fn in names:
            self.graphs[name] = g = _record(fn, pool)
            pool = g.pool()
            restore()
        self._timing = True


@contextlib.contextmanager
def _side_stream():
    """Warm-up before capture runs on a side stream, joined after (PyTorch's capture recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def _record(fn: Callable[[], None], pool):
    """fn's kernels as a CUDA graph (recorded, not run). The one place that captures: tests swap it for a
    stand-in that re-runs fn on replay, to run the capture path's bookkeeping on the CPU."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g
