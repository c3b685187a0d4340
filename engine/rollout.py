"""Interactive world-model rollouts: prompt prefilled once per group, per-frame decode, action prefill.

    frames = rollout(wm, prompt_ids, action_ids, tokens_per_frame=64, num_samples=N, temperature=1.0, top_p=0.8,
                     row_prompt_ids=first_actions)

prompt_ids (G, P): the part of the prompt a group's N samples share, prefilled and stored once per group,
RIGHT-padded when ragged, with prompt_lengths (G,) giving each row's true length (padding ignored; for an
action_cond model a padded prompt must not end inside an action block).
row_prompt_ids (G*N, L), optional: each sample's own end of the prompt, fed after the shared part and before
the first generated frame. RFT (Eq. 10): shared = context frame + first dynamics frame (1088 tokens at paper
sizes), own = the rollout's first action a_0 (7 tokens), so the policy's a_0 reaches the first frame.
Without it the whole prompt (e.g. ctx + dyn + a_0, 1095 tokens) is shared.
action_ids (G, T-1, A) shared by a group's samples, or (G*N, T-1, A) one sequence per sample (RFT: each
sampled action chunk gets its own rollout); action t is appended after generated frame t.
Returns frame tokens (G*N, T, F) (samples of one prompt adjacent), and log-probs (G*N, T, F) when asked.
Frame tokens are sampled only among dynamics codes [0, cfg.num_codes); other logits are masked.
A model whose input embeddings depend on earlier tokens (WorldModel.embed with action_cond) keeps that state in
cache.action_carry: per group after the prefill, then per row (RolloutCache.spread_carry).

Action guidance (guidance = w > 0; classifier-free guidance over the actions): each rollout also runs an
unconditional twin whose action tokens are `uncond_row_prompt_ids` / `uncond_action_ids` (the null action id,
for a model trained with action dropout). The twins share the group's prefix and every sampled token; tokens
are drawn from (1 + w) * logits_cond - w * logits_uncond, which amplifies what the actions change. 2x rows.

Per frame: F-1 single-token decode steps, then one (1 + A)-token step feeding the frame's last token
and the next action together. Each token's work (sampling, the writes, the model step it feeds) is a program
over static buffers (engine/token_step.py); the loop never reads device values on the host, and on CUDA each
token is one CUDA-graph replay, the frame-end + action step included. The LM head is evaluated over the
dynamics-code rows only.
On the CPU (eager/sdpa backends) decode steps run through engine/cpu_decode.py (cpu_fast=False: the
generic path) and sampling through kernels/sampling.sample_cpu (same tokens as the sort-based reference).
"""
from __future__ import annotations

from typing import Callable

import torch

from .nvtx import nvtx_range

from .attention import resolve_backend
from .kv_cache import RolloutCache
from .token_step import TokenStep


def _check_inputs(wm, prompt_ids, action_ids, tokens_per_frame, num_samples, prompt_lengths, max_seq_len,
                  row_prompt_ids):
    cfg = wm.config
    if not torch.is_tensor(prompt_ids) or prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a (batch, prompt_len) integer tensor, got "
                         f"{tuple(prompt_ids.shape) if torch.is_tensor(prompt_ids) else type(prompt_ids)}")
    G, P = prompt_ids.shape
    if num_samples < 1 or tokens_per_frame < 1:
        raise ValueError(f"num_samples ({num_samples}) and tokens_per_frame ({tokens_per_frame}) must be >= 1")
    if not torch.is_tensor(action_ids) or action_ids.dim() != 3 or action_ids.shape[0] not in (G, G * num_samples):
        raise ValueError(f"action_ids must be (batch, frames-1, action_dim) with batch {G} (shared by the samples) "
                         f"or {G * num_samples} (one per sample), got "
                         f"{tuple(action_ids.shape) if torch.is_tensor(action_ids) else type(action_ids)}")
    if prompt_lengths is None:
        lens = torch.full((G,), P, dtype=torch.int64)
    else:
        lens = torch.as_tensor(prompt_lengths, dtype=torch.int64).cpu().flatten()
        if lens.numel() != G or int(lens.min()) < 1 or int(lens.max()) > P:
            raise ValueError(f"prompt_lengths must hold {G} lengths in [1, {P}] (prompts are right-padded), got {lens.tolist()}")
    valid = torch.arange(P)[None, :] < lens[:, None]
    wm.check_ids(prompt_ids.cpu()[valid], "prompt_ids")
    if getattr(cfg, "action_cond", False) and bool((lens < P).any()):
        last = prompt_ids.cpu()[torch.arange(G), lens - 1]
        if bool((wm.is_action(last) & (lens < P)).any()):
            raise ValueError("a right-padded prompt ends inside an action block: an action_cond model carries the "
                             "block across chunks, and the padding would break it; end each padded prompt on a frame "
                             "token (or a whole action block), or pass the block in row_prompt_ids")
    wm.check_ids(action_ids, "action_ids")
    R = 0
    if row_prompt_ids is not None:
        if not torch.is_tensor(row_prompt_ids) or row_prompt_ids.dim() != 2 or row_prompt_ids.shape[0] != G * num_samples:
            raise ValueError(f"row_prompt_ids must be (batch * num_samples = {G * num_samples}, length), one prompt "
                             f"end per rollout, got "
                             f"{tuple(row_prompt_ids.shape) if torch.is_tensor(row_prompt_ids) else type(row_prompt_ids)}")
        wm.check_ids(row_prompt_ids, "row_prompt_ids")
        R = row_prompt_ids.shape[1]
    T, A = action_ids.shape[1] + 1, action_ids.shape[2]
    S = R + T * tokens_per_frame + (T - 1) * A
    limit = min(cfg.max_position, max_seq_len or cfg.max_position)
    if P + S > limit:
        raise ValueError(f"prompt ({P} + {R} tokens) + rollout ({T} frames x {tokens_per_frame} + {T - 1} actions x {A} = {S}) "
                         f"= {P + S} tokens exceeds the cache/positions limit {limit}; shorten the prompt or the rollout")
    return G, P, T, A, S, lens, valid


def _with_twins(wm, G, N, acts, row_prompt_ids, uncond_acts, uncond_row):
    """(G*N, ...) conditional rows + their unconditional twins -> (G*2N, ...), each group's N then its N twins."""
    if row_prompt_ids is None or uncond_row is None or uncond_acts is None:
        raise ValueError("guidance > 0 needs row_prompt_ids (the rows' own first action), uncond_row_prompt_ids and "
                         "uncond_action_ids (the same with null action ids)")
    uncond_acts = uncond_acts.to(acts.device)
    if uncond_acts.shape[0] == G and N > 1:
        uncond_acts = uncond_acts.repeat_interleave(N, 0)
    if uncond_acts.shape != acts.shape or uncond_row.shape != row_prompt_ids.shape:
        raise ValueError(f"uncond_action_ids {tuple(uncond_acts.shape)} / uncond_row_prompt_ids {tuple(uncond_row.shape)} "
                         f"must match action_ids {tuple(acts.shape)} / row_prompt_ids {tuple(row_prompt_ids.shape)}")
    wm.check_ids(uncond_acts, "uncond_action_ids")
    wm.check_ids(uncond_row, "uncond_row_prompt_ids")

    def twin(c, u):
        return torch.stack([c.view(G, N, *c.shape[1:]), u.to(c.device).view(G, N, *u.shape[1:])], 1).flatten(0, 2)
    return twin(acts, uncond_acts), twin(row_prompt_ids, uncond_row)


def _sampler(backend, device, logprob: bool):
    if backend == "triton":
        from vla_rft_engine.kernels.sampling import sample
        return sample
    if device.type == "cpu":  # same tokens as sample_reference without its full sort
        from vla_rft_engine.kernels.sampling import sample_cpu
        return lambda logits, noise, temperature, top_k, top_p: sample_cpu(logits, noise, temperature, top_k, top_p,
                                                                           logprob=logprob)
    from vla_rft_engine.kernels.sampling import sample_reference
    return sample_reference


def _generic_forward(wm, cache: RolloutCache) -> Callable[[torch.Tensor], torch.Tensor]:
    """wm on a suffix chunk against the cache -> dynamics-code logits of its last token (graph-safe on CUDA)."""
    head = wm.output.weight[:wm.config.num_codes]  # only dynamics-code logits are ever sampled

    def forward(ids: torch.Tensor) -> torch.Tensor:
        h = wm.hidden(ids, cache.row_positions(ids.shape[1]), cache)[:, -1]
        cache.advance(ids.shape[1])
        return torch.nn.functional.linear(h, head)
    return forward


class _Clock:
    """Adds wall time per phase into `timings` (no-op when None); syncs CUDA at each lap, so only for benches."""

    def __init__(self, timings: dict | None, device: torch.device):
        import time
        self.t, self.now, self.cuda = timings, time.perf_counter, device.type == "cuda"
        self.last = self.now() if timings is not None else 0.0

    def lap(self, key: str) -> None:
        if self.t is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = self.now()
        self.t[key] = self.t.get(key, 0.0) + now - self.last
        self.last = now


@torch.no_grad()
def rollout(wm, prompt_ids, action_ids, tokens_per_frame: int = 64, num_samples: int = 1, temperature: float = 1.0,
            top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None, return_logprobs: bool = False,
            prompt_lengths=None, use_cuda_graph: bool | None = None, max_seq_len: int | None = None,
            backend: str | None = None, cpu_fast: bool | None = None, timings: dict | None = None,
            row_prompt_ids: torch.Tensor | None = None, guidance: float = 0.0,
            uncond_row_prompt_ids: torch.Tensor | None = None, uncond_action_ids: torch.Tensor | None = None):
    """See the module docstring. `timings` (a dict) receives seconds per phase: prefill_s, sample_s (noise +
    sampling), decode_s (single-token steps), action_s (frame-end + action steps), setup_s (CUDA-graph capture
    included). Under CUDA graphs sampling runs inside the replays, so it is counted in decode_s / action_s."""
    cfg = wm.config
    if not guidance >= 0:
        raise ValueError(f"guidance must be >= 0 (0 = off), got {guidance}")
    if not temperature >= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling settings out of range: temperature {temperature} (>= 0; 0 = greedy), top_k {top_k} "
                         f"(>= 0; 0 = off), top_p {top_p} (in (0, 1]; 1 = off)")
    G, P, T, A, S, lens, valid = _check_inputs(wm, prompt_ids, action_ids, tokens_per_frame, num_samples,
                                               prompt_lengths, max_seq_len, row_prompt_ids)
    dev = wm.output.weight.device
    dtype = wm.output.weight.dtype
    backend = resolve_backend(backend or cfg.attn_backend, dev)
    N, B, F = num_samples, G * num_samples, tokens_per_frame
    clock = _Clock(timings, dev)
    prompt = torch.where(valid, prompt_ids.cpu(), 0).to(dev)
    lens_d = lens.to(dev)
    acts = action_ids.to(dev)
    if acts.shape[0] == G and N > 1:
        acts = acts.repeat_interleave(N, 0)
    guided = guidance > 0
    if guided:  # rows per group: N conditional, then their N unconditional twins
        acts, row_prompt_ids = _with_twins(wm, G, N, acts, row_prompt_ids, uncond_action_ids, uncond_row_prompt_ids)
    NR = 2 * N if guided else N  # rows per group in the cache
    cache = RolloutCache(cfg, G, NR, P, S, dtype, dev, backend)
    cache.set_prefix_lens(lens_d)
    sample = _sampler(backend, dev, return_logprobs)
    tokens = torch.empty((B, T, F), dtype=torch.int64, device=dev)
    logps = torch.empty((B, T, F), dtype=torch.float32, device=dev) if return_logprobs else None

    with nvtx_range("wm.prefill"):  # once per group, not per sample
        pos = torch.arange(P, device=dev).expand(G, P)
        h = wm.hidden(prompt, pos, cache)
        if row_prompt_ids is None:
            head = wm.output.weight[:cfg.num_codes]  # the head over dynamics codes only: the rest would be masked
            logits = torch.nn.functional.linear(h[torch.arange(G, device=dev), lens_d - 1], head).repeat_interleave(N, 0)
    cache.mode = "decode"
    cache.spread_carry()
    clock.lap("prefill_s")
    if use_cuda_graph is None:
        use_cuda_graph = dev.type == "cuda" and backend in ("triton", "sdpa", "flash")
    if use_cuda_graph and dev.type != "cuda":
        raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
    if cpu_fast is None:
        cpu_fast = dev.type == "cpu" and backend in ("eager", "sdpa")
    if cpu_fast and dev.type != "cpu":
        raise ValueError("cpu_fast=True is the CPU decode path; the model is on " + str(dev))
    step: Callable[[torch.Tensor], torch.Tensor]  # a model step on a chunk: CpuDecoder or the generic one
    if cpu_fast:
        from .cpu_decode import CpuDecoder
        step = CpuDecoder(wm, cache, lens)
    else:
        step = _generic_forward(wm, cache)
    clock.lap("setup_s")
    if row_prompt_ids is not None:  # each sample's own prompt end (its a_0), one chunk into its suffix
        with nvtx_range("wm.row_prompt"):
            logits = step(row_prompt_ids.to(dev))
        clock.lap("prefill_s")
    prog = TokenStep(step, sample, logits, tokens, logps, groups=G, samples=N, temperature=temperature, top_k=top_k,
                     top_p=top_p, guidance=guidance, first_action=acts[:, 0] if T > 1 else None, clock=clock)
    if use_cuda_graph:
        with nvtx_range("wm.capture"):
            prog.capture(cache, decode=F > 1)
        clock.lap("setup_s")
    for t in range(T):
        with nvtx_range(f"wm.frame{t}"):
            for f in range(F):
                if prog.u is not None:  # the generator's stream, as a fresh draw per step
                    torch.rand(prog.u.shape, generator=generator, device=dev, out=prog.u)
                if f < F - 1:
                    prog.decode()
                elif t < T - 1:
                    with nvtx_range("wm.action_prefill"):
                        prog.action(acts[:, t])
                else:
                    prog.last()
    if not bool(prog.finite):  # the one host read of the rollout
        raise FloatingPointError("the world model produced NaN/Inf logits during the rollout, so its frames are "
                                 "meaningless; the checkpoint is corrupt or was saved from a diverged run")
    return (tokens, logps) if return_logprobs else tokens
