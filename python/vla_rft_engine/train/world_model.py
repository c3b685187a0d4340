"""`vla-rft pretrain-wm`: MLE pretraining of the world model on tokenized segments (Eq. 3).

Loss = cross-entropy of the next token, only where the segments' loss_mask marks a generated frame
token (context, prompt frame and action tokens condition but are not predicted). AdamW lr 5e-5 (paper).
Checkpoints are atomic (out_dir/ckpt.pt) and resume by default; the final model is also written as a
Hugging Face LlamaForCausalLM directory (out_dir/world_model), with the action ranges the segments were
tokenized with beside it (world_model/action_ranges.json), so rollouts discretize actions the same way.

Data: `segments=FILE` (from data.segments.build_segments), or `demos=FILE tokenizer=DIR` to tokenize
demos here (written to out_dir/segments.pt and reused on resume).

Multi-process: `torchrun --nproc_per_node=K -m vla_rft_engine.cli pretrain-wm ...` (DDP; NCCL on GPUs, gloo
on CPUs). Every rank draws the same global batch and trains on its share; the loss is normalised by the
global target weight, so K ranks take the same steps as one process with the same batch_size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as du
from ..config import ConfigError, check_resume_config, parse_command, save_config, to_dict
from ..data.segments import load_segments
from ..layout import ActionDiscretizer, TokenLayout
from ..models.world_model import WorldModel, WorldModelConfig, init_weights
from .world_model_config import WMTrainConfig
from ..utils import (RunLogger, atomic_save, check_finite_step, load_checkpoint, resolve_device, seed_everything,
                     warmup_cosine_lr)


def masked_nll(wm: WorldModel, ids: torch.Tensor, mask: torch.Tensor, change_weight: float = 0.0,
               frame_step: int = 0, total_weight=None) -> torch.Tensor:
    """Mean next-token NLL over the masked targets. The vocabulary projection runs only at those positions
    (the generated frames' tokens, ~60% of a segment): the same loss, and the (B, L, V) logits never exist.

    change_weight > 0: a weighted mean where a target whose id differs from the token at the same place one
    frame earlier (`frame_step` = dynamics + action tokens back) weighs 1 + change_weight. change_weight=0 is
    Eq. 3's plain MLE. total_weight (a callable: local weight sum -> the mean over ranks of their sums)
    replaces the local denominator, so a data-parallel step equals the one-process step."""
    x = ids[:, :-1]
    wm.check_ids(x)
    B, L = x.shape
    h = wm.hidden(x, torch.arange(L, device=x.device).expand(B, L))
    m = mask[:, 1:]
    tgt = ids[:, 1:]
    nll = F.cross_entropy(wm.output(h[m]).float(), tgt[m], reduction="none")
    if change_weight <= 0:
        w = torch.ones_like(nll)
    else:
        prev = torch.full_like(tgt, -1)
        prev[:, frame_step:] = tgt[:, :-frame_step]  # masked targets are frames >= 1: their previous frame exists
        w = 1.0 + change_weight * (tgt != prev)[m].float()
    denom = w.sum() if total_weight is None else total_weight(w.sum().detach())
    return (nll * w).sum() / denom.clamp_min(1)  # no masked target: 0, not NaN


class _Loss(torch.nn.Module):
    """masked_nll as a module's forward, so DDP (which syncs gradients of what its forward ran) can wrap it."""

    def __init__(self, wm: WorldModel):
        super().__init__()
        self.wm = wm

    def forward(self, ids, mask, change_weight, frame_step, total_weight=None):
        return masked_nll(self.wm, ids, mask, change_weight, frame_step, total_weight)


def _segments_from_demos(cfg: WMTrainConfig, out: Path, dev) -> dict:
    from ..data.demos import load_demos
    from ..data.segments import build_segments, save_segments
    from ..models.tokenizer import VisualTokenizer
    from ..models.world import tokenizer_hash
    from ..utils import file_sha256
    path = out / "segments.pt"
    tok = VisualTokenizer.load(cfg.tokenizer).to(dev)
    made_from = {"demos_sha256": file_sha256(cfg.demos), "tokenizer_sha256": tokenizer_hash(tok),
                 "frames": cfg.segment_frames, "stride": cfg.segment_stride}
    if path.is_file():  # a cache: reused only when it was made from these very inputs
        seg = load_segments(path)
        if seg.get("made_from") == made_from:
            return seg
        print(f"pretrain-wm: {path} was made from other demos, tokenizer or segment settings; rebuilding it", flush=True)
    demos = load_demos(cfg.demos)
    disc = ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"]))
    print(f"pretrain-wm: tokenizing {len(demos['frames'])} episodes with {cfg.tokenizer} -> {path}", flush=True)
    seg = build_segments(demos, tok, disc, frames=cfg.segment_frames, stride=cfg.segment_stride, device=dev)
    seg["made_from"] = made_from
    save_segments(seg, path)
    return seg


def drop_actions(ids: torch.Tensor, layout: TokenLayout, drop: torch.Tensor) -> torch.Tensor:
    """ids with every action token of the rows where `drop` (B,) is True replaced by the null action id."""
    a0 = layout.action_offset
    is_action = (ids >= a0) & (ids < a0 + layout.num_action_bins)
    return torch.where(is_action & drop[:, None], layout.null_action_id, ids)


def structured_token_init(wm: WorldModel, layout: TokenLayout, fsq_levels, seed: int = 0, std: float = 0.02) -> None:
    """Start the token embeddings (and the dynamics-code rows of the LM head) from what the ids mean instead of
    i.i.d. noise: an FSQ code from its digits (codes that differ in one digit start close), an action bin from
    its value (bin 200 of 256 starts between 199 and 201), each through a random linear map, plus noise.
    Each of the 4375 codes and 256 bins is otherwise an unrelated vector that a small data set visits rarely;
    with this start a world model learns that "dx = +0.8" and "dx = +0.9" move the gripper alike."""
    from ..models.quantizers import fsq_indices_to_codes
    g = torch.Generator().manual_seed(seed + 7)
    D = wm.config.dim
    emb, head = wm.tok_embeddings.weight, wm.output.weight

    def lin(x, k):  # x (n, k) in [-1, 1] -> (n, D) through a random map, plus noise
        return x @ (torch.randn(k, D, generator=g) * 2 * std) + torch.randn(x.shape[0], D, generator=g) * 0.2 * std
    with torch.no_grad():
        if fsq_levels:
            codes = fsq_indices_to_codes(torch.arange(layout.num_codes), fsq_levels)  # (n, len(levels))
            k = codes.shape[1]
            emb[layout.dynamics_offset:layout.dynamics_offset + layout.num_codes] = lin(codes, k)
            emb[layout.context_offset:layout.context_offset + layout.num_codes] = lin(codes, k)
            head[:layout.num_codes] = lin(codes, k)
        vals = (torch.arange(layout.num_action_bins, dtype=torch.float32) + 0.5) / layout.num_action_bins * 2 - 1
        emb[layout.action_offset:layout.action_offset + layout.num_action_bins] = lin(
            torch.stack([vals, torch.ones_like(vals)], 1), 2)


def _finish_world_dir(cfg: WMTrainConfig, seg: dict, path: Path) -> None:
    """Action ranges, the tokenizer and the manifest beside the HF weights: a LearnedWorld directory."""
    if not seg.get("action_ranges"):
        return
    disc = ActionDiscretizer(**seg["action_ranges"])
    if not cfg.tokenizer:  # segments alone: the weights and ranges, no tokenizer to record
        disc.save(path / "action_ranges.json")
        print(f"pretrain-wm: no tokenizer= given, so {path} has no tokenizer copy or manifest; pass tokenizer=DIR "
              "when loading it")
        return
    from ..models.tokenizer import VisualTokenizer
    from ..models.world import save_world_dir, tokenizer_hash
    tok = VisualTokenizer.load(cfg.tokenizer)
    made_by = seg.get("tokenizer_sha256")
    if made_by and made_by != tokenizer_hash(tok):
        raise ValueError(f"the segments were tokenized by another tokenizer (hash {made_by}) than tokenizer="
                         f"{cfg.tokenizer} ({tokenizer_hash(tok)}); pass the tokenizer that made them")
    save_world_dir(path, tok, disc, cfg.action_dropout)


def main(argv: list[str]) -> int:
    cfg = parse_command("pretrain-wm", WMTrainConfig, argv)
    if cfg is None:
        return 0
    train(cfg)
    return 0


def train(cfg: WMTrainConfig) -> dict:
    """Train (or resume) and write out_dir/world_model. -> {"step", "loss", "world_model"}."""
    cfg.validate()
    with du.session(resolve_device(cfg.device).type, cfg.out_dir) as d:
        return _train(cfg, d)


def _train(cfg: WMTrainConfig, d: du.Dist) -> dict:
    from tqdm import tqdm
    seed_everything(cfg.seed)
    dev = d.device
    if cfg.batch_size % d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {d.world} ranks")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        seg = load_segments(cfg.segments) if cfg.segments else _segments_from_demos(cfg, out, dev)
    du.barrier(d)  # rank 0 tokenized the demos (once); the others read its segments file
    if not d.is_main:
        seg = load_segments(cfg.segments or out / "segments.pt")
    ids, mask = seg["ids"], seg["loss_mask"]
    if cfg.init:
        wm = WorldModel.from_pretrained(cfg.init)
    else:
        lay = seg.get("layout") or {}
        sizes = {}
        if lay:  # the vocabulary follows the tokenizer that made the segments (paper: 4375 codes, 9008 ids)
            tl = TokenLayout(**lay)
            sizes = {"vocab_size": tl.vocab_size, "num_codes": tl.num_codes}
        if cfg.action_cond:
            sizes["action_dim"] = tl.action_dim if lay else TokenLayout().action_dim
        wm = init_weights(WorldModel(WorldModelConfig.preset(cfg.preset, max_position=max(2048, ids.shape[1]),
                                                             action_cond=cfg.action_cond,
                                                             action_cond_sum=cfg.action_cond_sum, **sizes)), seed=cfg.seed)
        if cfg.structured_init and lay:
            structured_token_init(wm, tl, seg.get("fsq_levels"), cfg.seed)
    wm.check_ids(ids, "segments ids")
    if ids.shape[1] > wm.config.max_position:
        raise ValueError(f"segments have {ids.shape[1]} tokens, the model {wm.config.max_position} positions")
    wm.to(dev).train()
    # DDP averages gradients over ranks; FSDP2: every part the loss calls is its own unit (masked_nll calls
    # hidden() and output directly)
    loss_fn, sharded = du.data_parallel(_Loss(wm), d, cfg.distributed, [*wm.layers, wm.tok_embeddings, wm.norm, wm.output,
                                                                    *([wm.action_proj] if wm.action_proj is not None else [])])
    lay = TokenLayout(**seg["layout"]) if seg.get("layout") else TokenLayout()
    frame_step = lay.dynamics_tokens + lay.action_dim
    opt = torch.optim.AdamW(wm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def total_weight(local):  # mean over ranks of the share's weight sums: with DDP's gradient mean, the step
        return du.scalar_mean(d, local)  # equals one process's weighted mean over the whole batch
    ckpt_path, step = out / "ckpt.pt", 0
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, "world-model checkpoint", map_location=dev)
        check_resume_config(ck.get("config"), cfg, out)
        du.load_model_state(wm, opt, sharded, ck["model"], ck["optimizer"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"])
        if "data_rng" in ck:  # batch draws continue where they stopped: resume == uninterrupted, bit for bit
            gen.set_state(ck["data_rng"])
        else:  # a checkpoint from before data_rng was saved
            gen.manual_seed(cfg.seed + step)
    if d.is_main:
        save_config(cfg, out / "config.yaml")  # after the resume check: it records the settings in use
    log = RunLogger(out, resume_step=step) if d.is_main else None
    share = slice(d.rank * cfg.batch_size // d.world, (d.rank + 1) * cfg.batch_size // d.world)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16" and dev.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain-wm", dynamic_ncols=True,
               disable=not cfg.progress or not d.is_main)
    loss = torch.tensor(float("nan"))
    while step < cfg.steps:
        idx = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen)[share]  # this rank's share
        batch = ids[idx]
        lr = cfg.lr if cfg.schedule == "constant" else warmup_cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)
        for pg in opt.param_groups:
            pg["lr"] = lr
        if cfg.action_dropout > 0:  # drawn for the whole batch, so every rank draws the same
            drop = torch.rand(cfg.batch_size, generator=gen)[share] < cfg.action_dropout
            batch = drop_actions(batch, lay, drop)
        with autocast:
            loss, full = du.agreed_loss(d, "pretrain-wm", step + 1, lr, lambda: loss_fn(
                batch.to(dev), mask[idx].to(dev), cfg.change_weight, frame_step, total_weight if d.enabled else None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = du.clip_grad_norm(list(wm.parameters()), cfg.grad_clip)
        check_finite_step("pretrain-wm", step + 1, full, gnorm, lr)  # the same on every rank: all stop together
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            if log is not None:  # the main rank; full = the whole batch's weighted mean
                log.log(step, {"loss": float(full), "grad_norm": float(gnorm), "lr": lr})
            bar.set_postfix(loss=f"{float(full):.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            sd, osd = du.model_state(wm, opt, sharded)  # all ranks (a collective under FSDP2)
            if d.is_main:
                atomic_save({"model": sd, "optimizer": osd, "step": step, "rng": torch.get_rng_state(),
                             "data_rng": gen.get_state(), "config": to_dict(cfg)}, ckpt_path)
    bar.close()
    if sharded:  # the full weights in a plain model for the HF directory (a collective; rank 0 receives them)
        sd = du.model_state(wm, opt, True)[0]
        if d.is_main:
            wm = WorldModel(wm.config)
            wm.load_state_dict(sd)
    if d.is_main:
        assert log is not None  # made on the main rank
        log.close()
        wm.eval().save_pretrained(out / "world_model")
        _finish_world_dir(cfg, seg, out / "world_model")
        print(f"pretrain-wm: {step} steps, world model written to {out / 'world_model'}")
    du.barrier(d)
    return {"step": step, "loss": float(loss.detach()), "world_model": str(out / "world_model")}
