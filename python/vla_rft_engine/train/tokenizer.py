"""`vla-rft pretrain-tokenizer`: train the visual tokenizer on episodes of frames.

Each batch: a context frame per episode window and `frames_per_context` later frames of the same episode
(offsets 0..max_offset), reconstructed through the context and dynamics tokens. Loss: MSE (+ L1) +
LPIPS when its weights are on disk. Held-out episodes (1/50 by default, as the paper's split) give
MSE / PSNR / SSIM / LPIPS of the token path (encode -> ids -> fused decode) and a PNG.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import metrics
from ..config import check_resume_config, save_config, to_dict
from ..models.tokenizer import VisualTokenizer
from .tokenizer_config import TokenizerTrainConfig
from ..utils import (RunDirLock, warmup_cosine_lr, RunLogger, atomic_save, check_finite_step, load_checkpoint, nvtx_range,
                     resolve_device, seed_everything)
from ..viz import save_frame_grid


def _to_frames(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x))
    if t.dim() == 4:  # one episode
        t = t[None]
    if t.dim() != 5 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected uint8 frames (episodes, T, H, W, 3), got {tuple(t.shape)} {t.dtype}")
    return t


def load_frames(cfg: TokenizerTrainConfig) -> torch.Tensor:
    """-> uint8 (episodes, T, H, W, 3) at the model's image size."""
    src = cfg.data
    if src == "builtin":
        from ..envs.tabletop import random_episodes
        frames, _ = random_episodes(cfg.builtin_episodes, cfg.builtin_steps, seed=cfg.seed, image_size=cfg.model.image_size)
        frames = _to_frames(frames, "builtin episodes")
    else:
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(f"data={src}: no such file or folder (use data=builtin, a demos .pt file, a "
                                    ".npy/.npz of uint8 (episodes, T, H, W, 3), LIBERO .hdf5 demos, or a folder of "
                                    "episode folders of images)")
        if p.suffix in (".hdf5", ".h5") or (p.is_dir() and any(p.glob("*.hdf5"))):  # LIBERO demos
            from ..data.libero_hdf5 import load_libero_hdf5
            frames = _to_frames(load_libero_hdf5(p)["frames"], src)
        elif p.is_dir():
            from PIL import Image
            eps = []
            for d in sorted(x for x in p.iterdir() if x.is_dir()):
                files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
                if files:
                    eps.append(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
            if not eps:
                raise ValueError(f"data={src}: no episode sub-folders with .png/.jpg frames found")
            T = min(len(e) for e in eps)
            frames = _to_frames(np.stack([e[:T] for e in eps]), src)
        elif p.suffix == ".pt":
            obj = load_checkpoint(p, "frames file")
            frames = _to_frames(obj["frames"] if isinstance(obj, dict) else obj, src)
        elif p.suffix in (".npz", ".npy"):
            obj = np.load(p)
            frames = _to_frames(obj["frames"] if p.suffix == ".npz" else obj, src)
        else:
            raise ValueError(f"data={src}: unsupported file type {p.suffix} (.pt, .npz, .npy, .hdf5 or a folder)")
    s = cfg.model.image_size
    if frames.shape[2:4] != (s, s):  # resize once, here, rather than per batch
        N, T, H, W, _ = frames.shape
        x = frames.reshape(N * T, H, W, 3).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).reshape(N, T, s, s, 3)
    return frames


def split_episodes(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(n * frac))
    if n - k < 1:
        raise ValueError(f"only {n} episodes: need at least 2 to hold one out")
    return perm[k:], perm[:k]


def sample_batch(frames: torch.Tensor, eps: torch.Tensor, B: int, F_: int, max_off: int, g: torch.Generator):
    """-> context (B, 3, H, W), targets (B, F_, 3, H, W), float in [0, 1]."""
    T = frames.shape[1]
    e = eps[torch.randint(len(eps), (B,), generator=g)]
    t0 = torch.randint(T, (B,), generator=g)
    off = torch.randint(max_off + 1, (B, F_), generator=g)
    tt = (t0[:, None] + off).clamp(max=T - 1)
    ctx = frames[e, t0]
    tgt = frames[e[:, None], tt]
    f = lambda x: x.movedim(-1, -3).float() / 255
    return f(ctx), f(tgt)


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(tok: VisualTokenizer, frames, eps, n_pairs: int, max_off: int, lp=None, device="cpu", png=None) -> dict:
    """Token-path reconstruction of held-out frames: ids through the fused decode, as the RL loop sees them."""
    tok.eval()
    g = torch.Generator().manual_seed(1234)
    ctx, tgt = sample_batch(frames, eps, n_pairs, 1, max_off, g)
    ctx, tgt = ctx.to(device), tgt[:, 0].to(device)
    out_c, out_d = [], []
    for i in range(0, n_pairs, 64):
        c, t = ctx[i:i + 64], tgt[i:i + 64]
        cid = tok.encode_context(c)
        did = tok.encode_dynamics(t, c)
        out_d.append(tok.decode(cid, did[:, None])[:, 0])
        out_c.append(tok.decode_context(cid))
    rc, rd = torch.cat(out_c), torch.cat(out_d)
    res = {}
    for name, a, b in (("context", rc, ctx), ("dynamics", rd, tgt)):
        res[f"mse_{name}"] = metrics.mse(a, b).mean().item()
        res[f"psnr_{name}"] = metrics.psnr(a, b).mean().item()
        res[f"ssim_{name}"] = metrics.ssim(a, b).mean().item()
        if lp is not None:
            res[f"lpips_{name}"] = lp(a, b, zero_one=True).mean().item()
    for k in ("mse", "psnr", "ssim") + (("lpips",) if lp is not None else ()):
        res[k] = (res[f"{k}_context"] + res[f"{k}_dynamics"]) / 2
    if png is not None:
        n = 8
        save_frame_grid([ctx[:n], rc[:n], tgt[:n], rd[:n]], png,
                        labels=["context", "recon", "frame t", "recon t"],
                        title="tokenizer on held-out frames: context frame and a later frame t, each with its "
                              "reconstruction (one sample per column)")
    tok.train()
    return res


# ------------------------------------------------------------------------------------------------ train
def lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    return warmup_cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)


def motion_weights(ctx: torch.Tensor, frames: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight of dynamics frames (B, T, 3, H, W): 1, plus `weight` where the frame differs from its
    context frame (the gripper and what it moves, a few % of the pixels). Without it the reconstruction loss is
    spent on the static table and the dynamics tokens barely encode where the gripper went; the world model
    then has nothing action-dependent to predict."""
    if weight <= 0:
        return torch.ones_like(frames[:, :, :1])
    moved = (frames - ctx[:, None]).abs().amax(2, keepdim=True) > 0.1
    return 1.0 + weight * moved.float()


def train(cfg: TokenizerTrainConfig) -> dict:
    with RunDirLock(cfg.out_dir):
        return _train(cfg)


def _train(cfg: TokenizerTrainConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    frames = load_frames(cfg)
    train_eps, held_eps = split_episodes(frames.shape[0], cfg.heldout_fraction, cfg.seed)
    print(f"tokenizer: {frames.shape[0]} episodes x {frames.shape[1]} frames at {frames.shape[2]}x{frames.shape[3]}, "
          f"{len(held_eps)} held out; device {device}", flush=True)
    tok = VisualTokenizer(cfg.model).to(device)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lp = None
    if cfg.lpips_weight > 0:
        try:
            lp = metrics.load_lpips(cfg.lpips_net, required=True, device=device)
        except FileNotFoundError:
            print("tokenizer: LPIPS weights are not on disk (`vla-rft info` says which files and where): "
                  "training with MSE + L1 only")
    g = torch.Generator().manual_seed(cfg.seed)
    step = 0
    ck_path = out / "train_state.pt"
    if ck_path.exists():  # resume
        ck = load_checkpoint(ck_path, "tokenizer training state")
        check_resume_config(ck.get("config"), cfg, out)
        tok.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        g.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        print(f"tokenizer: resuming from step {step}", flush=True)
    save_config(cfg, out / "train_config.yaml")  # after the resume check: it records the settings in use
    logger = RunLogger(out, resume_step=step)
    bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer", file=sys.stdout, mininterval=10)
    t_start = time.time()
    last_eval: dict = {}
    while step < cfg.steps:
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, cfg)
        with nvtx_range("tokenizer/batch"):
            ctx, tgt = sample_batch(frames, train_eps, cfg.batch_size, cfg.frames_per_context, cfg.max_offset, g)
            ctx, tgt = ctx.to(device), tgt.to(device)
        with nvtx_range("tokenizer/step"):
            rc, rd, aux = tok(ctx, tgt)
            w = motion_weights(ctx, tgt, cfg.motion_weight)
            mse_c, err_d = F.mse_loss(rc, ctx), rd - tgt
            rec = mse_c + err_d.pow(2).mean()  # unweighted: what the logs and PSNR report
            loss = (mse_c + (err_d.pow(2) * w).mean()
                    + cfg.l1_weight * ((rc - ctx).abs().mean() + (err_d.abs() * w).mean()) + aux)
            if lp is not None:
                loss = loss + cfg.lpips_weight * (lp(rc, ctx, zero_one=True, check_range=False).mean()
                                                  + lp(rd, tgt, zero_one=True, check_range=False).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip)
            check_finite_step("pretrain-tokenizer", step + 1, loss.detach(), gn, opt.param_groups[0]["lr"])
            opt.step()
        step += 1
        bar.update(1)
        m = {"loss": loss.item(), "mse": rec.item() / 2, "grad_norm": gn.item(), "lr": opt.param_groups[0]["lr"]}
        if step % 10 == 0:
            logger.log(step, m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{-10 * math.log10(max(m['mse'], 1e-12)):.1f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = evaluate(tok, frames, held_eps, cfg.eval_pairs, cfg.max_offset, lp, device,
                                 png=out / "reconstruction.png")
            logger.log(step, {f"eval/{k}": v for k, v in last_eval.items()})
            tqdm.write(f"step {step}: held-out PSNR {last_eval['psnr']:.2f} dB (context {last_eval['psnr_context']:.2f}, "
                       f"dynamics {last_eval['psnr_dynamics']:.2f}), SSIM {last_eval['ssim']:.3f}", file=sys.stdout)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            atomic_save({"model": tok.state_dict(), "optim": opt.state_dict(), "step": step,
                         "data_rng": g.get_state(), "torch_rng": torch.get_rng_state(), "config": to_dict(cfg)}, ck_path)
    bar.close()
    if not last_eval:
        last_eval = evaluate(tok, frames, held_eps, cfg.eval_pairs, cfg.max_offset, lp, device, png=out / "reconstruction.png")
    tok.cpu().save(out)
    last_eval.update(steps=step, train_seconds=round(time.time() - t_start, 1), lpips_used=lp is not None,
                     heldout_episodes=len(held_eps), image_size=cfg.model.image_size,
                     context_tokens=tok.layout.context_tokens, dynamics_tokens=tok.layout.dynamics_tokens)
    (out / "eval.json").write_text(json.dumps(last_eval, indent=2))
    logger.close()
    print(f"tokenizer saved to {out}: held-out PSNR {last_eval['psnr']:.2f} dB, SSIM {last_eval['ssim']:.3f}, "
          f"MSE {last_eval['mse']:.5f}", flush=True)
    return last_eval


def main(argv: list[str]) -> int:
    from ..config import parse_command
    cfg = parse_command("pretrain-tokenizer", TokenizerTrainConfig, argv)
    if cfg is None:
        return 0
    train(cfg)
    return 0
