"""Probe for issue #10: does stronger action conditioning make world-model rollouts action-sensitive?

Compares a world model trained with `action_cond=true` (WorldModelConfig.action_cond: a learned projection of the
preceding action block's 7 bin values added to the input embedding of every token of the next frame) against
the plain baseline, with ONE rollout code for both: a plain PyTorch greedy per-token loop with a simple
per-layer KV cache (`PlainLoopWorld.imagine`, written before the engine supported action_cond; it is
now an independent reference for the engine). The metric is the
official one (train/wm_eval.py `evaluate_world`: moving-pixel L1 to the real frames under each episode's own
actions vs under episode e-1's, 16 held-out episodes, 8 frames, greedy). `--engine` also evaluates with the
engine's rollout, to check the plain loop against it.

Teacher-forced: mean next-token NLL on the generated-frame targets, own vs swapped action tokens (each segment
takes the previous segment's action tokens), overall and on the targets that differ from the token one frame
earlier ("changed"), on 96 random training segments and on the held-out episodes cut
into segments.

  python bench/wm_action_conditioning_probe.py --wm RUN/world_model --heldout val.pt --segments seg.pt --out x.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vla_rft_engine.kernels.rotary_kv import apply_rotary
from vla_rft_engine.layout import TokenLayout
from vla_rft_engine.models.world import LearnedWorld
from vla_rft_engine.models.world_model import WorldModel


class _Cache:
    """Per-layer K/V lists for WorldModel.layers' `cache.attend` hook (plain PyTorch, any chunk length)."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def attend(self, layer, q, k, v, cos, sin):
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        pk, pv = self.k[layer], self.v[layer]
        K = k if pk is None else torch.cat([pk, k], 1)
        V = v if pv is None else torch.cat([pv, v], 1)
        self.k[layer], self.v[layer] = K, V
        Lq, Lk = q.shape[1], K.shape[1]
        mask = torch.arange(Lk, device=q.device)[None, :] <= (Lk - Lq + torch.arange(Lq, device=q.device))[:, None]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=q.shape[2] != K.shape[2])
        return y.transpose(1, 2)


@torch.no_grad()
def _step(wm: WorldModel, ids: torch.Tensor, n_new: int, cache: _Cache) -> torch.Tensor:
    """Feed the last n_new of ids (the whole history is given so the action features see their block)."""
    L = ids.shape[1]
    x = wm.embed(ids)[:, L - n_new:] if wm.action_proj is not None else wm.tok_embeddings(ids[:, L - n_new:])
    cos, sin = wm.rope(torch.arange(L - n_new, L, device=ids.device).expand(ids.shape[0], n_new))
    for i, layer in enumerate(wm.layers):
        x = layer(x, cos, sin, i, cache)
    return wm.output(wm.norm(x[:, -1])).float()


class PlainLoopWorld(LearnedWorld):
    """LearnedWorld whose imagine is a plain greedy (or T>0 sampled) per-token loop: works for action_cond."""

    @torch.no_grad()
    def imagine(self, start, actions, num_samples=1, temperature=1.0, top_p=1.0, top_k=0, generator=None,
                return_tokens=False, timings=None, guidance=0.0):
        if top_p != 1.0 or top_k or guidance:
            raise ValueError("the plain loop supports greedy / plain temperature sampling only")
        ctx, shared, bins = self.prompt(start, actions, num_samples)
        N, T = bins.shape[1], bins.shape[2]
        lay, wm = self.layout, self.world_model
        bins = bins.flatten(0, 1)  # (B*N, T, A)
        ids = torch.cat([shared.repeat_interleave(N, 0), bins[:, 0]], 1)
        cache = _Cache(len(wm.layers))
        n_new, out = ids.shape[1], []
        for t in range(T):
            for _ in range(lay.dynamics_tokens):
                logits = _step(wm, ids, n_new, cache)
                logits[:, lay.num_codes:] = float("-inf")  # dynamics codes only, as the engine
                if temperature > 0:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
                else:
                    nxt = logits.argmax(-1, keepdim=True)
                ids, n_new = torch.cat([ids, nxt], 1), 1
                out.append(nxt)
            if t + 1 < T:
                # the action block goes in as one chunk, with the last generated token (not fed yet)
                ids, n_new = torch.cat([ids, bins[:, t + 1]], 1), 1 + bins.shape[-1]
        return self.frames(ctx, torch.cat(out, 1), N, T, return_tokens)  # out: (B*N, T*64) dynamics ids


@torch.no_grad()
def tf_nll(wm: WorldModel, ids: torch.Tensor, mask: torch.Tensor, lay: TokenLayout) -> dict:
    """Teacher-forced NLL own vs swapped action tokens (all targets and changed targets)."""
    fs = lay.dynamics_tokens + lay.action_dim
    a0 = lay.action_offset
    is_act = (ids >= a0) & (ids < a0 + lay.num_action_bins)
    out: dict = {"segments": int(ids.shape[0])}
    for name, x in (("own", ids), ("swapped", torch.where(is_act, ids.roll(1, 0), ids))):
        tot, totc, n, nc = 0.0, 0.0, 0, 0
        for s in range(0, len(x), 16):
            xi, mi = x[s:s + 16], mask[s:s + 16]
            inp = xi[:, :-1]
            B, L = inp.shape
            h = wm.hidden(inp, torch.arange(L).expand(B, L))
            m, tgt = mi[:, 1:], xi[:, 1:]
            nll = F.cross_entropy(wm.output(h[m]).float(), tgt[m], reduction="none")
            prev = torch.full_like(tgt, -1)
            prev[:, fs:] = tgt[:, :-fs]
            ch = (tgt != prev)[m]
            tot += nll.sum().item()
            n += nll.numel()
            totc += nll[ch].sum().item()
            nc += int(ch.sum())
        out[name] = {"nll": tot / n, "nll_changed": totc / max(nc, 1), "changed_share": nc / n}
    out["gap"] = out["swapped"]["nll"] - out["own"]["nll"]
    out["gap_changed"] = out["swapped"]["nll_changed"] - out["own"]["nll_changed"]
    return out


def motion(video: torch.Tensor, frames: dict) -> dict:
    """How much the rollouts move where the real frames move: mean |frame - o_0| on the moving pixels (real o_t
    differs from o_0; metrics.moving_mask), for the real frames and the own / swapped rollouts. A rollout that
    barely leaves o_0 there is a copy of the start frame, whatever the actions."""
    from vla_rft_engine import metrics as M
    real = frames["real"]
    start = video[:, 0].permute(0, 3, 1, 2).float().div(255).to(real.device)[:, None]
    mov = M.moving_mask(real, start[:, 0])
    out: dict = {}
    for k in ("real", "own", "swapped"):
        if k in frames:
            out[f"motion_{k}"] = float(M.masked_l1(frames[k].float(), start.expand_as(real), mov))
    if "swapped" in frames:  # own/swapped moving-L1 ratio of each frame t = 1..T (does the effect fade?)
        out["ratio_by_frame"] = [float(M.masked_l1(frames["own"][:, t].float(), real[:, t], mov[:, t])
                                       / M.masked_l1(frames["swapped"][:, t].float(), real[:, t], mov[:, t]))
                                 for t in range(real.shape[1])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wm", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--segments", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--engine", action="store_true", help="also roll out with the engine")
    ap.add_argument("--skip_rollout", action="store_true")
    ap.add_argument("--skip_tf", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled, seed 0")
    a = ap.parse_args()
    from vla_rft_engine.data.demos import load_demos
    from vla_rft_engine.data.segments import build_segments, load_segments
    from vla_rft_engine.train.wm_eval import evaluate_world
    torch.manual_seed(0)
    world = PlainLoopWorld.load(a.wm)
    wm, lay = world.world_model, world.layout
    res: dict = {"wm": a.wm, "action_cond": wm.config.action_cond}
    demos = load_demos(a.heldout)
    video = torch.as_tensor(demos["frames"])[:a.episodes, :a.frames + 1]
    acts = torch.as_tensor(demos["actions"]).float()[:a.episodes, :a.frames]
    if not a.skip_rollout:
        t0 = time.time()
        m, frames = evaluate_world(world, video, acts, temperature=a.temperature)
        res["plain_loop"] = {**m, **motion(video, frames), "wall_s": round(time.time() - t0, 1)}
        print("plain loop:", json.dumps({k: m[k] for k in ("moving_l1", "moving_l1_swapped", "moving_l1_ratio")}),
              flush=True)
        if a.engine:
            eng = LearnedWorld(world.tokenizer, wm, world.discretizer, world.action_dropout)
            t0 = time.time()
            m2, frames2 = evaluate_world(eng, video, acts, temperature=a.temperature)
            res["engine"] = {**m2, "wall_s": round(time.time() - t0, 1),
                             "frames_equal_to_plain_loop": float((frames2["own"] == frames["own"]).float().mean())}
            print("engine:", json.dumps({k: m2[k] for k in ("moving_l1", "moving_l1_swapped", "moving_l1_ratio")}),
                  flush=True)
    if a.skip_tf:
        Path(a.out).write_text(json.dumps(res, indent=1))
        return
    t0 = time.time()
    seg = load_segments(a.segments)
    idx = torch.randperm(seg["ids"].shape[0], generator=torch.Generator().manual_seed(0))[:96]
    res["tf_train_segments"] = tf_nll(wm, seg["ids"][idx], seg["loss_mask"][idx], lay)
    hs = build_segments(demos, world.tokenizer, world.discretizer, frames=9, stride=4)  # all held-out episodes
    res["tf_heldout_segments"] = tf_nll(wm, hs["ids"], hs["loss_mask"], lay)
    res["tf_wall_s"] = round(time.time() - t0, 1)
    print("tf:", json.dumps({k: res[k] for k in ("tf_train_segments", "tf_heldout_segments")}), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
