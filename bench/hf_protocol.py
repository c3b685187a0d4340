"""Rollout baselines on a transformers LlamaForCausalLM (same weights as ours), for bench/wm_rollout.py and as
the oracle of tests/test_world_model.py.

hf_frame_by_frame -- the release's loop structure (the release serves it with vLLM): per frame, generate on
    the WHOLE sequence so far (prompt + earlier frames + actions: re-sent and re-prefilled every frame, for
    every sample), tokens_per_frame new tokens restricted to dynamics codes, append the next action, repeat.
hf_kv_cached -- what a competent transformers user writes: one prefill per row, the KV cache kept across
    frames, one token per step, the frame's last token and the next action fed as one (1 + A)-token step.
Neither shares a group's prompt between its samples: every row carries its own full prompt.
"""
from __future__ import annotations

import torch


def hf_frame_by_frame(hf_model, prompt_ids, action_ids, tokens_per_frame: int, num_codes: int, num_samples: int = 1,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      timings: dict | None = None):
    """`timings` (a dict, CPU) receives prefill_s (each generate call up to its first logits processor call,
    i.e. the re-sent prefix's forward) and decode_s (the rest); read off a clock, the protocol is unchanged."""
    import time

    from transformers import LogitsProcessor, LogitsProcessorList

    from vla_rft_engine.utils import nvtx_range

    class DynamicsOnly(LogitsProcessor):
        first: float | None = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                self.first = time.perf_counter()
            scores[:, num_codes:] = float("-inf")
            return scores

    seq = prompt_ids.repeat_interleave(num_samples, 0)
    acts = action_ids if action_ids.shape[0] == seq.shape[0] else action_ids.repeat_interleave(num_samples, 0)
    T = acts.shape[1] + 1
    frames = []
    for t in range(T):
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else dict(do_sample=False)
        proc = DynamicsOnly()
        t0 = time.perf_counter()
        with nvtx_range(f"hf.frame{t}"):
            out = hf_model.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=tokens_per_frame,
                                    min_new_tokens=tokens_per_frame, logits_processor=LogitsProcessorList([proc]),
                                    eos_token_id=None, pad_token_id=0, **kw)
        if timings is not None:
            t1 = time.perf_counter()
            timings["prefill_s"] = timings.get("prefill_s", 0.0) + proc.first - t0
            timings["decode_s"] = timings.get("decode_s", 0.0) + t1 - proc.first
        frame = out[:, seq.shape[1]:]
        frames.append(frame)
        seq = torch.cat([out, acts[:, t].to(out.device)], 1) if t < T - 1 else out
    return torch.stack(frames, 1)


@torch.no_grad()
def hf_kv_cached(hf_model, prompt_ids, action_ids, tokens_per_frame: int, num_codes: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 timings: dict | None = None, static: bool = False, step_fn=None):
    """prompt_ids (B, P) full prompts (one row per rollout), action_ids (B, T-1, A) -> frame tokens (B, T, F).
    `timings` (a dict, CPU) receives prefill_s and decode_s (single-token and action steps).
    static=True: a transformers StaticCache sized for the whole rollout (fixed shapes, so `step_fn`, e.g.
    torch.compile(hf_model), can run the single-token steps without recompiling); step_fn defaults to hf_model."""
    import time

    from vla_rft_engine.utils import nvtx_range

    def pick(logits):
        logits = logits[:, :num_codes].float()  # frames are dynamics codes only
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, -1)
        if top_p < 1.0:  # nucleus: keep the smallest prefix of the sorted probs whose mass reaches top_p
            sp, si = probs.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp >= top_p
            probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    B, P = prompt_ids.shape
    T = action_ids.shape[1] + 1
    past = None
    if static:
        from transformers import StaticCache
        A = action_ids.shape[2]
        past = StaticCache(config=hf_model.config, max_cache_len=P + T * tokens_per_frame + (T - 1) * A)
    step_fn = step_fn or hf_model
    t0 = time.perf_counter()
    with nvtx_range("hf_kv.prefill"):
        out = hf_model(input_ids=prompt_ids, past_key_values=past, use_cache=True,
                       cache_position=torch.arange(P, device=prompt_ids.device))
    past, logits = out.past_key_values, out.logits[:, -1]
    t1 = time.perf_counter()
    frames = torch.empty((B, T, tokens_per_frame), dtype=torch.int64, device=prompt_ids.device)
    pos = P
    for t in range(T):
        with nvtx_range(f"hf_kv.frame{t}"):
            for f in range(tokens_per_frame):
                tok = pick(logits)
                frames[:, t, f] = tok
                if f < tokens_per_frame - 1:
                    ids = tok[:, None]
                elif t < T - 1:
                    ids = torch.cat([tok[:, None], action_ids[:, t].to(tok.device)], 1)
                else:
                    break
                L = ids.shape[1]
                cache_pos = torch.arange(pos, pos + L, device=ids.device)
                fn = step_fn if L == 1 else hf_model  # the compiled step sees one shape only
                out = fn(input_ids=ids, past_key_values=past, use_cache=True, cache_position=cache_pos,
                         position_ids=cache_pos[None].expand(B, L))
                past, logits, pos = out.past_key_values, out.logits[:, -1], pos + L
    if timings is not None:
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + t1 - t0
        timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t1
    return frames
