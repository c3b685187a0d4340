"""`vla-rft pretrain-wm`: MLE pretraining of the world model on tokenized segments (Eq. 3).

Loss = cross-entropy of the next token, only where the segments' loss_mask marks a generated frame
token (context, prompt frame and action tokens condition but are not predicted). AdamW lr 5e-5 (paper).
Checkpoints are atomic (out_dir/ckpt.pt) and resume by default; the final model is also written as a
Hugging Face LlamaForCausalLM directory (out_dir/world_model), with the action ranges the segments were
tokenized with beside it (world_model/action_ranges.json), so rollouts discretize actions the same way.

Data: `segments=FILE` (from data.segments.build_segments), or `demos=FILE tokenizer=DIR` to tokenize
demos here (written to out_dir/segments.pt and reused on resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cli import parse_command
from ..config import ConfigError, save_config, to_dict
from ..data.segments import load_segments
from ..layout import ActionDiscretizer, TokenLayout
from ..models.world_model import WorldModel, WorldModelConfig, init_weights
from ..utils import RunLogger, atomic_save, load_checkpoint, resolve_device, seed_everything


@dataclass
class WMTrainConfig:
    segments: str = ""  # torch file from data.segments.build_segments
    demos: str = ""  # or: a demos file (data.demos.save_demos) ...
    tokenizer: str = ""  # ... tokenized with this tokenizer dir (vla-rft pretrain-tokenizer)
    segment_frames: int = 9  # prompt frame + 8 generated frames (the paper's rollout length)
    segment_stride: int = 4
    out_dir: str = "runs/world_model"
    preset: str = "small"  # paper | small | tiny (ignored when init is set)
    init: str = ""  # optional HF LlamaForCausalLM directory to start from
    steps: int = 1000  # paper: 150k
    batch_size: int = 16  # paper: 16
    lr: float = 5e-5  # paper
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    log_every: int = 10
    ckpt_every: int = 200
    resume: bool = True
    progress: bool = True
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.segments and not (self.demos and self.tokenizer):
            raise ConfigError("pretrain-wm needs segments=<file> (data.segments.build_segments), or demos=<file> "
                              "tokenizer=<dir> to tokenize demos here")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("steps, batch_size must be >= 1 and lr > 0")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, got {self.dtype!r}")


def masked_nll(wm: WorldModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the masked targets. The vocabulary projection runs only at those positions
    (the generated frames' tokens, ~60% of a segment): the same loss, and the (B, L, V) logits never exist."""
    x = ids[:, :-1]
    wm.check_ids(x)
    B, L = x.shape
    h = wm.hidden(x, torch.arange(L, device=x.device).expand(B, L))
    m = mask[:, 1:]
    nll = F.cross_entropy(wm.output(h[m]).float(), ids[:, 1:][m], reduction="sum")
    return nll / m.sum().clamp_min(1)  # no masked target: 0, not NaN


def _segments_from_demos(cfg: WMTrainConfig, out: Path, dev) -> dict:
    from ..data.demos import load_demos
    from ..data.segments import build_segments, save_segments
    from ..models.tokenizer import VisualTokenizer
    path = out / "segments.pt"
    if path.is_file():
        return load_segments(path)
    demos = load_demos(cfg.demos)
    tok = VisualTokenizer.load(cfg.tokenizer).to(dev)
    disc = ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"]))
    print(f"pretrain-wm: tokenizing {len(demos['frames'])} episodes with {cfg.tokenizer} -> {path}", flush=True)
    seg = build_segments(demos, tok, disc, frames=cfg.segment_frames, stride=cfg.segment_stride, device=dev)
    save_segments(seg, path)
    return seg


def main(argv: list[str]) -> int:
    cfg = parse_command("pretrain-wm", WMTrainConfig, argv)
    if cfg is None:
        return 0
    train(cfg)
    return 0


def train(cfg: WMTrainConfig) -> dict:
    """Train (or resume) and write out_dir/world_model. -> {"step", "loss", "world_model"}."""
    cfg.validate()
    from tqdm import tqdm
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seg = load_segments(cfg.segments) if cfg.segments else _segments_from_demos(cfg, out, dev)
    ids, mask = seg["ids"], seg["loss_mask"]
    if cfg.init:
        wm = WorldModel.from_pretrained(cfg.init)
    else:
        lay = seg.get("layout") or {}
        sizes = {}
        if lay:  # the vocabulary follows the tokenizer that made the segments (paper: 4375 codes, 9008 ids)
            tl = TokenLayout(**lay)
            sizes = {"vocab_size": tl.vocab_size, "num_codes": tl.num_codes}
        wm = init_weights(WorldModel(WorldModelConfig.preset(cfg.preset, max_position=max(2048, ids.shape[1]), **sizes)),
                          seed=cfg.seed)
    wm.check_ids(ids, "segments ids")
    if ids.shape[1] > wm.config.max_position:
        raise ValueError(f"segments have {ids.shape[1]} tokens, the model {wm.config.max_position} positions")
    wm.to(dev).train()
    opt = torch.optim.AdamW(wm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path, step = out / "ckpt.pt", 0
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, "world-model checkpoint", map_location=dev)
        wm.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"])
    log = RunLogger(out, resume=step > 0)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16" and dev.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-wm", dynamic_ncols=True, disable=not cfg.progress)
    loss = torch.tensor(float("nan"))
    while step < cfg.steps:
        idx = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen)
        with autocast:
            loss = masked_nll(wm, ids[idx].to(dev), mask[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(wm.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.log(step, {"loss": loss.item(), "grad_norm": float(gnorm), "lr": cfg.lr})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            atomic_save({"model": wm.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "rng": torch.get_rng_state(), "config": to_dict(cfg)}, ckpt_path)
    bar.close()
    log.close()
    wm.eval().save_pretrained(out / "world_model")
    if seg.get("action_ranges"):
        ActionDiscretizer(**seg["action_ranges"]).save(out / "world_model" / "action_ranges.json")
    print(f"pretrain-wm: {step} steps, world model written to {out / 'world_model'}")
    return {"step": step, "loss": float(loss.detach()), "world_model": str(out / "world_model")}
