"""The authors' rollout protocol on a transformers LlamaForCausalLM, as the baseline and test oracle.

Per frame: call generate on the WHOLE sequence so far (prompt + earlier frames + actions: the prefix is
re-sent and re-prefilled every frame, for every sample), take tokens_per_frame new tokens restricted to
dynamics codes by a logits processor, append the next action's tokens, repeat.
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

    from .nvtx import nvtx_range

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
