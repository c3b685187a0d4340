"""Stage I: supervised flow-matching pretraining of the VLA policy (Eq. 4).

    vla-rft sft out_dir=runs/sft task=reach num_episodes=40 steps=1500
    vla-rft sft --config sft.yaml policy.d_model=256 resume=true

Data: (image o_t, instruction l, proprio s_t, action chunk a_{t:t+C}) from the built-in table-top demos
(`data=builtin`: vla_rft_engine.data.demos.collect_demos, cached to out_dir/demos.pt), a demos file
(`data=/path/demos.pt`, load_demos format) or `data=synthetic` (tests). Chunks running past the
episode end repeat the last action. Split by episode (val_fraction).
Every step draws its batch, tau and noise from a generator seeded by (seed, step), so a resumed run
repeats an uninterrupted one exactly. The Sigma Net is not trained here (Stage II only).
Writes out_dir/{policy.safetensors, ckpt.pt, metrics.jsonl, tb/, config.yaml}: policy.safetensors is the deployable
policy (weights with the action/proprio normalisation statistics, its config in the header; no pickle),
ckpt.pt the training state for resuming (optimizer, scheduler; read as plain data). load_policy reads either.

Multi-process: `torchrun --nproc_per_node=K -m vla_rft_engine.cli sft [distributed=fsdp2] ...`. Every rank draws
the same global batch and trains on its share (DDP averages the gradients; FSDP2 shards the trained parts, the
flow head and the encoder unless it is frozen, with their Adam state); the periodic evaluation runs on every
rank over a share of the val samples. Checkpoints hold the full state (written by rank 0, read by all), so a
run resumes under any rank count or wrap.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed as du
from ..config import ConfigError, check_resume_config, from_dict, parse_command, save_config, to_dict
from ..models.policy import VLAPolicy
from ..models.policy_config import FLOW_TAU, PolicyConfig
from .sft_config import SFTConfig
from ..utils import (load_weights, save_weights, RunLogger, atomic_save, check_finite_step, load_checkpoint,
                     resolve_device, seed_everything)


def synthetic_demos(num_episodes: int, steps: int = 12, image_size: int = 16, seed: int = 0) -> dict:
    """Demos-format toy data: the action is a fixed function of the proprio and the image colour."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 1, (num_episodes, 1, 1, 1, 3))
    frames = (np.broadcast_to(colour, (num_episodes, steps + 1, image_size, image_size, 3)) * 255).astype(np.uint8)
    proprio = np.cumsum(rng.normal(0, 0.1, (num_episodes, steps + 1, 8)), 1).astype(np.float32)
    w = np.random.default_rng(123).normal(0, 1, (8 + 3, 7))
    feat = np.concatenate([proprio[:, :-1], np.broadcast_to(colour[:, :, 0, 0], (num_episodes, steps, 3))], -1)
    actions = np.tanh(feat @ w).astype(np.float32)
    words = ["red", "green", "blue"]
    instr = [f"move toward the {words[int(np.argmax(c))]} side" for c in colour[:, 0, 0, 0]]
    return {"frames": frames, "actions": actions, "proprio": proprio, "instructions": instr,
            "success": np.ones(num_episodes, bool), "lengths": np.full(num_episodes, steps, np.int64)}


def get_demos(cfg: SFTConfig) -> dict:
    if cfg.data == "synthetic":
        return synthetic_demos(cfg.num_episodes, image_size=cfg.image_size, seed=cfg.data_seed)
    from ..data.demos import collect_demos, load_demos, save_demos
    if cfg.data != "builtin":
        return load_demos(cfg.data)
    cache = Path(cfg.out_dir) / "demos.pt"
    if cache.is_file():
        d = load_demos(cache)
        if (len(d["actions"]) == cfg.num_episodes and d["frames"].shape[2] == cfg.image_size
                and d.get("task") == cfg.task and float(d.get("expert_noise", 0.0)) == cfg.expert_noise):
            return d
    d = collect_demos(cfg.task, cfg.num_episodes, seed=cfg.data_seed, image_size=cfg.image_size,
                      expert_noise=cfg.expert_noise)
    save_demos(d, cache)
    return d


class ChunkData:
    """(episode, t) samples of a demos dict; chunk a_{t:t+C} padded with the episode's last action."""

    def __init__(self, demos: dict, episodes: np.ndarray, chunk_len: int):
        for k in ("frames", "actions", "proprio", "instructions"):
            if k not in demos:
                raise ValueError(f"demos lack '{k}' (expected the collect_demos/load_demos format)")
        self.frames = torch.as_tensor(np.asarray(demos["frames"])[episodes])
        acts = torch.as_tensor(np.asarray(demos["actions"], dtype=np.float32)[episodes])
        self.proprio = torch.as_tensor(np.asarray(demos["proprio"], dtype=np.float32)[episodes])
        self.instructions = [demos["instructions"][i] for i in episodes]
        E, T, A = acts.shape
        pad = acts[:, -1:].expand(E, chunk_len - 1, A)
        self.actions = torch.cat([acts, pad], 1).unfold(1, chunk_len, 1).permute(0, 1, 3, 2)  # (E, T, C, A)
        lengths = np.asarray(demos.get("lengths", np.full(len(demos["actions"]), T)))[episodes]
        # skip most of the post-success no-op tail: it would dominate the data
        self.index = torch.tensor([(e, t) for e in range(E) for t in range(min(T, int(lengths[e]) + chunk_len))])
        self.raw_actions = acts

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, idx: torch.Tensor):
        e, t = self.index[idx].unbind(1)
        return (self.frames[e, t], [self.instructions[i] for i in e.tolist()], self.proprio[e, t],
                self.actions[e, t])


def split_episodes(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = max(1, int(math.ceil(n * val_fraction)))
    if n - n_val < 1:
        raise ConfigError(f"{n} episodes are too few to split off a validation set")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy: VLAPolicy, data: ChunkData, cfg: SFTConfig, device, d: du.Dist | None = None) -> dict:
    """Val flow loss (fixed tau/noise) and L1 of the ODE policy's chunk vs the expert's, per action dim.
    Under torchrun every rank evaluates a share of the samples (the same number of forwards on each, a share
    that runs short repeats a sample at weight 0: under FSDP2 every forward is a collective) and the sums are
    reduced, so the result is one process's, on every rank."""
    d = d or du.Dist()
    policy.eval()
    g = torch.Generator().manual_seed(cfg.seed + 99991)
    n = min(len(data), cfg.eval_max)
    idx = torch.randperm(len(data), generator=g)[:n]
    C, A = policy.chunk_shape
    tau, noise, noise_ode = _beta(cfg, n, g), torch.randn(n, C, A, generator=g), torch.randn(n, C, A, generator=g)
    rows = torch.arange(n).tensor_split(d.world)[d.rank]
    per = math.ceil(n / d.world)
    weight = torch.cat([torch.ones(len(rows)), torch.zeros(per - len(rows))]).to(device, torch.float64)
    rows = torch.cat([rows, rows.new_zeros(per - len(rows))])
    sums = torch.zeros(1 + A, dtype=torch.float64, device=device)  # flow loss, L1 per action dim
    mb = max(1, cfg.batch_size // d.world)
    for i in range(0, per, mb):
        r, w = rows[i:i + mb], weight[i:i + mb]
        img, instr, prop, act = data.batch(idx[r])
        act = act.to(device)
        z = policy.encode(img.to(device), instr, prop.to(device))
        s = policy.normalize_proprio(prop.to(device))
        loss = policy.flow_loss(z, s, policy.normalize_actions(act), tau=tau[r].to(device), noise=noise[r].to(device),
                                reduction="none")
        pred = policy.unnormalize_actions(policy.sample_ode(z, s, noise=noise_ode[r].to(device)))
        sums[0] += (loss.double() * w).sum()
        sums[1:] += ((pred - act).abs().mean(1).double() * w[:, None]).sum(0)  # (A,)
    policy.train()
    du.reshard(policy)  # FSDP2: back to the shards the optimizer holds
    sums = du.all_sum(d, sums)
    l1 = (sums[1:] / n).tolist()
    out = {"val/flow_loss": float(sums[0]) / n, "val/l1": sum(l1) / A}
    out.update({f"val/l1_dim{k}": v for k, v in enumerate(l1)})
    return out


def _beta(cfg: SFTConfig, n: int, g: torch.Generator) -> torch.Tensor:
    from ..models.policy import sample_beta
    return sample_beta(cfg.tau_alpha, cfg.tau_beta, n, g)


# ---- checkpoints --------------------------------------------------------------------------------
POLICY_FORMAT, POLICY_WEIGHTS = "vla-rft-policy/1", "policy.safetensors"


def save_policy_weights(policy: VLAPolicy, path: str | Path, step: int, state: dict | None = None) -> Path:
    """The deployable policy alone: weights (normalisation stats included) + config in a safetensors header.
    state: the full state dict when the module's own is sharded (RFT under FSDP2)."""
    return save_weights(path, state if state is not None else policy.state_dict(),
                        {"format": POLICY_FORMAT, "policy_config": to_dict(policy.cfg),
                         "flow_tau": list(policy.flow_tau), "step": step, "image_size": policy.image_size})


def load_policy(path: str | Path, device="cpu") -> VLAPolicy:
    """A trained policy (with its normalisation stats): policy.safetensors, a run dir holding it, or a training
    checkpoint ckpt.pt (SFT or RFT, read as plain data)."""
    path = Path(path)
    if path.is_dir():
        path = path / POLICY_WEIGHTS if (path / POLICY_WEIGHTS).is_file() else path / "ckpt.pt"
    if path.suffix == ".safetensors":
        sd, ck = load_weights(path, "policy weights")
        if ck.get("format") != POLICY_FORMAT:
            raise ValueError(f"{path} is not a vla-rft policy (format={ck.get('format')!r})")
    else:
        ck = load_checkpoint(path, "SFT policy checkpoint")
        sd = ck["model"]
    pc = dict(ck["policy_config"])
    pc.setdefault("enc_version", 1)  # checkpoints from before enc_version existed hold the version-1 encoder
    pc.pop("logprob_reduce", None)  # older checkpoints: now Stage II's setting (grpo.logprob_reduce)
    policy = VLAPolicy(from_dict(PolicyConfig, pc))
    policy.load_state_dict(sd)
    cfg = ck.get("config") or {}
    policy.flow_tau = tuple(ck.get("flow_tau") or (cfg.get("tau_alpha", FLOW_TAU[0]), cfg.get("tau_beta", FLOW_TAU[1])))
    policy.image_size = int(ck["image_size"]) if ck.get("image_size") else None  # None: written before it was kept
    return policy.to(device).eval()


class _FlowLoss(torch.nn.Module):
    """One step's flow-matching loss as a module's forward, so DDP (multi-process) can wrap it."""

    def __init__(self, policy: VLAPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, img, instr, prop, act, tau, noise):
        p = self.policy
        z = p.encode(img, instr, prop)
        return p.flow_loss(z, p.normalize_proprio(prop), p.normalize_actions(act), tau=tau, noise=noise)


def train(cfg: SFTConfig) -> dict:
    """Train (or resume). Under `torchrun --nproc_per_node=K` (DDP, or distributed=fsdp2; gloo on CPUs): every
    rank draws the same global batch and trains on its 1/K share, so K ranks take the same steps as one process."""
    with du.session(resolve_device(cfg.device).type, cfg.out_dir) as d:
        return _train(cfg, d)


def _train(cfg: SFTConfig, d: du.Dist) -> dict:
    if cfg.batch_size % d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {d.world} ranks")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = d.device
    seed_everything(cfg.seed)
    demos = get_demos(cfg) if d.is_main else None
    du.barrier(d)  # rank 0 collected (and cached) the built-in demos once; the others read its cache
    demos = demos if demos is not None else get_demos(cfg)
    n_ep = len(demos["actions"])
    if demos["actions"].shape[-1] != cfg.policy.action_dim or demos["proprio"].shape[-1] != cfg.policy.proprio_dim:
        raise ConfigError(f"demos have action dim {demos['actions'].shape[-1]} / proprio dim "
                          f"{demos['proprio'].shape[-1]}; set policy.action_dim / policy.proprio_dim to match")
    tr_ep, va_ep = split_episodes(n_ep, cfg.val_fraction, cfg.data_seed)
    train_data = ChunkData(demos, tr_ep, cfg.policy.chunk_len)
    val_data = ChunkData(demos, va_ep, cfg.policy.chunk_len)

    policy = VLAPolicy(cfg.policy).to(device)
    policy.set_norm_stats(train_data.raw_actions, train_data.proprio)
    policy.image_size = int(demos["frames"].shape[2])
    policy.sigma_net.requires_grad_(False)  # Stage II's; SFT trains the flow head and the encoder's trainable part
    trained = [policy.flow_head] + ([policy.encoder] if any(p.requires_grad for p in policy.encoder.parameters()) else [])
    loss_fn, sharded = du.data_parallel(_FlowLoss(policy), d, cfg.distributed, trained)
    share = slice(d.rank * cfg.batch_size // d.world, (d.rank + 1) * cfg.batch_size // d.world)
    params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("sigma_net.")]
    readout: list[torch.nn.Parameter] = getattr(policy.encoder, "readout_parameters", list)()
    fast = {id(p) for p in readout}
    groups: list[dict] = [{"params": [p for p in params if id(p) not in fast]}]
    if readout:
        groups.append({"params": [p for p in readout if p.requires_grad], "lr": cfg.lr * cfg.readout_lr_mult})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warmup, cosine to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    ckpt_path, start = out / "ckpt.pt", 0
    if cfg.resume and ckpt_path.is_file():  # every rank reads it
        ck = load_checkpoint(ckpt_path, "SFT checkpoint", map_location=device)
        check_resume_config(ck.get("config"), cfg, out)
        du.load_model_state(policy, opt, sharded, ck["model"], ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["step"])
    if d.is_main:
        save_config(cfg, out / "config.yaml")
    logger = RunLogger(out, resume_step=start) if d.is_main else None
    policy.flow_tau = (cfg.tau_alpha, cfg.tau_beta)

    def save(step, metrics):  # every rank (a collective under FSDP2); the main rank writes, atomically
        sd, osd = du.model_state(policy, opt, sharded)
        if d.is_main:
            atomic_save({"model": sd, "optimizer": osd, "scheduler": sched.state_dict(), "step": step,
                         "config": to_dict(cfg), "policy_config": to_dict(cfg.policy), "norm_stats": policy.norm_stats(),
                         "flow_tau": (cfg.tau_alpha, cfg.tau_beta), "metrics": metrics, "image_size": policy.image_size},
                        ckpt_path)
            save_policy_weights(policy, out / POLICY_WEIGHTS, step, state=sd)

    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    metrics: dict = {}
    t0 = time.time()
    bar = None
    if cfg.progress and d.is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="sft", dynamic_ncols=True)
    policy.train()
    for step in range(start, end):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        img, instr, prop, act = train_data.batch(torch.randint(len(train_data), (cfg.batch_size,), generator=g))
        tau = _beta(cfg, cfg.batch_size, g)
        noise = torch.randn(act.shape, generator=g)  # the whole batch's draws, then this rank's share
        loss, full = du.agreed_loss(d, "sft", step + 1, cfg.lr, lambda: loss_fn(
            img[share].to(device), instr[share], prop[share].to(device), act[share].to(device), tau[share].to(device),
            noise[share].to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = du.clip_grad_norm(params, cfg.grad_clip)
        check_finite_step("sft", step + 1, full, gnorm, cfg.lr)  # the same values on every rank: all stop together
        opt.step()
        sched.step()
        done = step + 1
        if logger is not None and (done % cfg.log_every == 0 or done == end):  # the main rank
            logger.log(done, {"train/flow_loss": float(full), "train/grad_norm": gnorm.item(),
                              "train/lr": float(sched.get_last_lr()[0])})
        if done % cfg.eval_every == 0 or done == cfg.steps:  # every rank evaluates a share
            metrics = evaluate(policy, val_data, cfg, device, d)
            if logger is not None:
                logger.log(done, metrics)
        if done % cfg.ckpt_every == 0 or done == end:
            save(done, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(full):.4f}", **({"val": f"{metrics['val/flow_loss']:.4f}"} if metrics else {}))
    if bar is not None:
        bar.close()
    if logger is not None:  # the main rank
        logger.close()
    du.barrier(d)
    return {"step": end, "wall_s": time.time() - t0, "train_samples": len(train_data), "val_samples": len(val_data),
            "episodes": n_ep, **metrics}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command("sft", SFTConfig, argv)
    if cfg is None:
        return 0
    res = train(cfg)
    print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()})
    return 0


__all__ = ["SFTConfig", "train", "main", "evaluate", "load_policy", "synthetic_demos", "ChunkData"]
