"""`vla-rft wm-eval`: world-model rollout quality (Table 1) and action sensitivity, on demos.

For each episode the LearnedWorld (models/world.py) imagines `frames` frames from o_0 under the episode's own
actions a_0.. (greedy by default); they are compared with the real frames o_1..o_T: MSE, PSNR, SSIM, L1, and
LPIPS when its backbone weights are on disk.

Reward response (R3 signal): the same start frames rolled out under the episode's chunk plus Gaussian noise at
several scales, K chunks per scale: the mean R3 (the L1 term of Eq. 11 against the unperturbed chunk's rollout)
per scale, and the Spearman correlation between R3 and minus the chunk's L1 distance among the K chunks of one
scale, as RFT ranks a group. A world model whose reward ranks chunks shows R3 falling and rho > 0 at the scales
a policy's group spans.

Action swap: the same start frames rolled out under ANOTHER episode's actions (episode e takes e-1's). A world
model that simulates actions is closer to the real frames under the true actions, most of all on the pixels
that move (the gripper, pushed objects): `moving_l1` is the L1 over pixels where the real frame differs from
o_0. An action-blind model has `moving_l1_own == moving_l1_swapped` (ratio 1). Writes metrics.json and a PNG
(real / own actions / swapped actions rows per episode).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import parse_command
from .wm_eval_config import WMEvalConfig


@torch.no_grad()
def evaluate_world(world, video: torch.Tensor, actions: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, swap: bool = True, lpips_model=None, guidance: float = 0.0) -> tuple[dict, dict]:
    """video (E, T+1, H, W, 3) uint8, actions (E, T, A) raw -> (metrics, {"real", "own", "swapped"} frames)."""
    from .. import metrics as M
    dev = world.world_model.output.weight.device
    clip = video.permute(0, 1, 4, 2, 3).float().div(255).to(dev)  # (E, T+1, 3, H, W)
    E, T = clip.shape[0], clip.shape[1] - 1
    if clip.shape[-1] != world.image_size:
        raise ValueError(f"demo frames are {clip.shape[-1]}px, the world's tokenizer takes {world.image_size}px")
    start, real = clip[:, 0], clip[:, 1:]
    moving = M.moving_mask(real, start)
    names = ["own", "swapped"] if swap and E >= 2 else ["own"]
    # episode e under its own actions and under episode e-1's: two rollouts of one group, one engine call
    acts = torch.stack([actions, actions.roll(1, 0)][:len(names)], 1).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    preds = world.imagine(start, acts, temperature=temperature, top_p=top_p, generator=gen, guidance=guidance).float()
    res: dict = {"episodes": E, "frames": T, "temperature": temperature, "guidance": guidance,
                 "moving_pixel_fraction": float(moving.float().mean())}
    out = {"real": real}
    for i, name in enumerate(names):
        pred = preds[:, i]
        out[name] = pred
        a, b = pred.flatten(0, 1), real.flatten(0, 1)
        sfx = "" if name == "own" else "_swapped"
        res.update({f"mse{sfx}": float(M.mse(a, b).mean()), f"psnr{sfx}": float(M.psnr(a, b).mean()),
                    f"l1{sfx}": float((a - b).abs().mean()), f"moving_l1{sfx}": float(M.masked_l1(pred, real, moving))})
        if name == "own":
            res["ssim"] = float(M.ssim(a, b).mean())
            if lpips_model is not None:
                res["lpips"] = float(lpips_model(a, b, zero_one=True).mean())
    if "swapped" in out:
        res["moving_l1_gap"] = res["moving_l1_swapped"] - res["moving_l1"]
        res["moving_l1_ratio"] = res["moving_l1"] / max(res["moving_l1_swapped"], 1e-12)  # < 1: reacts to actions
        res["own_vs_swapped_mean_abs"] = float((out["own"] - out["swapped"]).abs().mean())
    return res, out


@torch.no_grad()
def reward_response(world, start: torch.Tensor, actions: torch.Tensor, scales, chunks: int = 8, seed: int = 0,
                    temperature: float = 0.0) -> dict:
    """start (E, 3, H, W), actions (E, T, A) raw -> {"reward_by_scale", "spearman_by_scale"} (see the module doc)."""
    from ..metrics import spearman
    dev = world.world_model.output.weight.device
    E, T, A = actions.shape
    low, high = world.discretizer.low.float().to(dev), world.discretizer.high.float().to(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    ref = actions.to(dev)
    noise = torch.randn(E, len(scales), chunks, T, A, generator=g, device=dev)
    scale = torch.tensor(scales, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
    pert = torch.minimum(torch.maximum(ref[:, None, None] + scale * noise, low), high).flatten(1, 2)
    frames = world.imagine(start, torch.cat([pert, ref[:, None]], 1), temperature=temperature, generator=g).float()
    R = -(frames[:, :-1] - frames[:, -1:]).abs().mean((2, 3, 4, 5)).view(E, len(scales), chunks)
    dist = (pert - ref[:, None]).abs().sum((2, 3)).view(E, len(scales), chunks)
    rho = [spearman(R[:, i], -dist[:, i]) for i in range(len(scales))]
    return {"reward_by_scale": {str(s): float(R[:, i].mean()) for i, s in enumerate(scales)},
            "spearman_by_scale": {str(s): float(r.nanmean()) for s, r in zip(scales, rho)}}


def main(argv: list[str]) -> int:
    cfg = parse_command("wm-eval", WMEvalConfig, argv)
    if cfg is None:
        return 0
    from .. import metrics
    from ..data.demos import load_demos
    from ..models.world import LearnedWorld
    from ..utils import resolve_device
    from ..viz import save_frame_grid

    dev = resolve_device(cfg.device)
    world = LearnedWorld.load(cfg.wm, tokenizer=cfg.tokenizer or None, action_ranges=cfg.action_ranges or None,
                              device=dev)
    demos = load_demos(cfg.demos)
    video = torch.as_tensor(demos["frames"])[:cfg.episodes]
    T = min(cfg.frames, video.shape[1] - 1)
    acts = torch.as_tensor(demos["actions"]).float()[:cfg.episodes, :T]
    res, frames = evaluate_world(world, video[:, :T + 1], acts, cfg.temperature, cfg.top_p, cfg.seed, cfg.swap,
                                 metrics.load_lpips(device=dev), cfg.guidance)
    if cfg.response_chunks > 0 and cfg.response_scales:
        clip = video[:, 0].permute(0, 3, 1, 2).float().div(255).to(dev)
        res["reward_response"] = reward_response(world, clip, acts, cfg.response_scales, cfg.response_chunks,
                                                 cfg.seed, cfg.temperature)
    outd = Path(cfg.out_dir)
    outd.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for e in range(min(cfg.strip_episodes, res["episodes"])):
        for name in frames:
            rows.append(frames[name][e].cpu())
            labels.append(f"{name} {e}" if name == "real" else f"wm {e} ({name} actions)")
    save_frame_grid(rows, outd / "rollouts.png", labels=labels, col_labels=[f"t={t}" for t in range(1, T + 1)],
                    title=f"world model vs real frames o_1..o_{T}: under the episode's own actions and another's")
    (outd / "metrics.json").write_text(json.dumps(res, indent=2))
    print("wm-eval: " + json.dumps(res))
    return 0
