"""What action conditioning (WorldModelConfig.action_cond + action_cond_sum, the quickstart's world model) costs
in an engine rollout: the same engine and backbone weights with and without the action projection, same rows,
same run. One JSON record.

    python bench/wm_action_cond.py              # CPU: tiny preset (the quickstart's), its RFT shape, 1 thread
    python bench/wm_action_cond.py --profile    # CUDA: cudaProfilerStart/Stop around the timed repeats

Sides (each rolls out G x N rows greedily, as the quickstart's RFT does, with the model's default backend):
  action_cond   the backbone plus the action projection of the last block and of the running sum
  tokens_only   the same backbone, actions as tokens only (the paper's world model): the baseline
Default shape: 4 start states x 9 rows (8 rollouts + the reference), 8 frames of 64 tokens, 327-token prompt
(the built-in tokenizer's layout: 320 shared by a group + each row's own a_0), 240 codes + 256 action bins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels
from bench.common import device_name, emit, parse_args, time_fn  # noqa: E402

LABELS = {"action_cond": "engine rollout, action_cond + action_cond_sum world model (the quickstart's default)",
          "tokens_only": "same engine and backbone weights, actions as tokens only (the paper's world model)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--num-codes", type=int, default=240, help="tokenizer codes (the quickstart's FSQ 8,6,5: 240)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--samples", type=int, default=9)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=327)
    ap.add_argument("--tokens-per-frame", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    a = parse_args(ap, argv)

    from vla_rft_engine.engine.rollout import rollout
    from vla_rft_engine.layout import TokenLayout
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    from vla_rft_engine.utils import nvtx_range

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, N, T, Fr, P = a.groups, a.samples, a.frames, a.tokens_per_frame, a.prompt_len
    lay = TokenLayout(num_codes=a.num_codes)  # 256 action bins x 7 dims, as the quickstart's
    size = dict(num_codes=a.num_codes, vocab_size=lay.vocab_size, max_position=max(1024, P + T * 71 + 64))
    base = WorldModelConfig.preset(a.preset, **size)
    cond = WorldModelConfig.preset(a.preset, action_cond=True, action_cond_sum=True, **size)
    models = {"action_cond": init_weights(WorldModel(cond), seed=0)}
    models["tokens_only"] = WorldModel(base)
    models["tokens_only"].load_state_dict({k: v for k, v in models["action_cond"].state_dict().items()
                                           if not k.startswith("action_proj.")})
    models = {k: m.to(dev).eval() for k, m in models.items()}
    a0, nb, A = lay.action_offset, lay.num_action_bins, lay.action_dim
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(lay.context_offset, lay.context_offset + lay.num_codes, (G, P - A), generator=g).to(dev)
    own_a0 = torch.randint(a0, a0 + nb, (G * N, A), generator=g).to(dev)
    acts = torch.randint(a0, a0 + nb, (G * N, T - 1, A), generator=g).to(dev)

    def run(side):
        with nvtx_range(f"bench.{side}"), torch.no_grad():
            rollout(models[side], prompt, acts, tokens_per_frame=Fr, num_samples=N, temperature=0.0,
                    row_prompt_ids=own_a0)

    res = {s: {"what": LABELS[s], **time_fn(lambda s=s: run(s), repeats=a.repeats, warmup=1, device=dev)}
           for s in LABELS}
    emit({"bench": "wm_action_cond", "device": device_name(dev), "dtype": "float32", "preset": a.preset,
          "params": models["action_cond"].num_params(), "vocab_size": base.vocab_size,
          "groups": G, "samples": N, "frames": T, "tokens_per_frame": Fr, "prompt_len": P, "sampling": "greedy",
          "torch_threads": torch.get_num_threads(), "sides": res,
          "overhead_vs_tokens_only": res["action_cond"]["median_s"] / res["tokens_only"]["median_s"]}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
