"""Process-group plumbing for `torchrun --nproc_per_node=K -m vla_rft_engine.cli {rft,pretrain-wm,sft} ...`.

NCCL on GPUs (one GPU per rank, LOCAL_RANK), gloo on CPU processes. Without torchrun (no WORLD_SIZE in
the environment) everything here degrades to a single process: no process group, identity reductions.
Updates run through DDP (gradient mean over ranks) or FSDP2 (`fully_shard`, gradients reduce-scattered
with the same mean); checkpoints always hold full (unsharded) state dicts written by rank 0.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import WRAPS


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the torchrun group when launched by torchrun; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device} asked for, but no CUDA device is visible; use device=cpu")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank, world, local, dev, owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str, out_dir, d: Dist | None = None):
    """A training command's process plumbing: join the group (or use `d`), lock `out_dir` on rank 0 (one writer
    per run directory), leave the group at the end."""
    from .utils import RunDirLock
    d = d or init(device)
    try:
        with RunDirLock(out_dir) if d.is_main else contextlib.nullcontext():
            yield d
    finally:
        shutdown(d)


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, global start-state index, ...): independent streams, the
    same on every rank and every world size."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(*parts))


def all_mean(d: Dist, values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of scalar metrics (every rank passes the same keys in the same order)."""
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(d))
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(keys, t.tolist())}


def all_max(d: Dist, values: dict[str, float]) -> dict[str, float]:
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def all_gather_rows(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0, in rank order (= global start-state order)."""
    if not d.enabled:
        return x
    parts = [torch.empty_like(x, device=_comm_device(d)) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous().to(_comm_device(d)))
    return torch.cat(parts).to(x.device)


def all_sum(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a new tensor on x's device)."""
    if not d.enabled:
        return x
    y = x.detach().clone().to(_comm_device(d))
    dist.all_reduce(y)
    return y.to(x.device)


def scalar_mean(d: Dist, x: torch.Tensor) -> torch.Tensor:
    if not d.enabled:
        return x
    y = x.detach().clone().to(_comm_device(d))
    dist.all_reduce(y)
    return (y / d.world).to(x.device)


def _comm_device(d: Dist) -> torch.device:
    return d.device if d.device.type == "cuda" else torch.device("cpu")


def wrap(module: nn.Module, d: Dist, kind: str = "ddp") -> nn.Module:
    """The trainable modules for the update: DDP or FSDP2. Single process: the module itself."""
    if kind not in WRAPS:
        raise ValueError(f"distributed wrap must be one of {WRAPS}, got {kind!r}")
    if not d.enabled:
        return module
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # older torch
        raise RuntimeError("distributed=fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from e
    for child in module.children():  # each head its own FSDP root: sampling calls the heads directly
        fully_shard(child)
    return module


def shard(units: list[nn.Module]) -> None:
    """FSDP2 over a model whose parts are called directly (not through one root forward): each unit its own
    FSDP group, so every call unshards exactly the parameters it uses."""
    from torch.distributed.fsdp import fully_shard
    for u in units:
        fully_shard(u)


def reshard(module: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit in `module` (nothing to do without FSDP2). A root unit keeps
    them after its forward for the backward that usually follows; after a no-grad forward (an evaluation) they
    would stay, and the state-dict and optimizer code could not match them to the sharded parameters."""
    if not dist.is_initialized():
        return
    from torch.distributed.fsdp import FSDPModule
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def data_parallel(loss_module: nn.Module, d: Dist, kind: str, units: list[nn.Module]) -> tuple[nn.Module, bool]:
    """(the module a training step calls, whether the weights are sharded). kind ddp: DDP over `loss_module`;
    fsdp2: each of `units` (the trained parts the loss calls directly) its own FSDP2 unit, the rest replicated.
    Single process: the module itself. Build the optimizer after this: FSDP2 replaces the units' parameters."""
    if d.enabled and kind == "fsdp2":
        shard(units)
        return loss_module, True
    return wrap(loss_module, d, "ddp"), False


def agreed_loss(d: Dist, what: str, step: int, lr: float, forward) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a training step's forward -> (this rank's loss, its mean over ranks: the whole batch's loss when the
    shares are equal). Pass the mean with the gradient norm (the same on every rank) to utils.check_finite_step:
    a NaN/Inf on any rank is then NaN on all of them, and every rank stops at the same step, before the
    optimizer applies it. Under torchrun the in-forward finite checks (NonFiniteError) are deferred: one rank
    raising half-way through a forward would leave the others waiting in a collective (an FSDP2 all-gather,
    DDP's gradient all-reduce); the NaN flows on into the loss and the agreement instead. Single process: the
    checks raise as before (utils.diverged_if_non_finite)."""
    from .models.encoders import deferred_finite_checks
    from .utils import diverged_if_non_finite
    with deferred_finite_checks() if d.enabled else diverged_if_non_finite(what, step, lr):
        loss = forward()
    return loss, scalar_mean(d, loss.detach())


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; the norm as a plain tensor (FSDP2: the DTensor's value, reduced over shards),
    the same on every rank."""
    g = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(g, "full_tensor", None)
    return full() if full is not None else g


def model_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool):
    """(model state dict, optimizer state dict), full and on the CPU; sharded: a collective (all ranks call; the
    main rank receives them). The optimizer state is torch's own layout (parameters numbered in param-group
    order) in both cases, so a checkpoint resumes under any rank count or wrap."""
    if not sharded:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd = get_optimizer_state_dict(model, opt, options=o)
    return get_model_state_dict(model, options=o), _numbered(osd, _param_names(model, opt))


def load_model_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool, sd: dict, osd: dict) -> None:
    """model_state's dicts back (every rank passes the full ones)."""
    if not sharded:
        model.load_state_dict(sd)
        opt.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd, options=o)
    set_optimizer_state_dict(model, opt, _named(osd, _param_names(model, opt)), options=o)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _numbered(osd: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint) in torch's numbered layout."""
    if not osd:  # not the main rank
        return osd
    idx = {n: i for i, n in enumerate(names)}
    return {"state": {idx[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [idx[n] for n in g["params"]]} for g in osd["param_groups"]]}


def _named(osd: dict, names: list[str]) -> dict:
    if all(isinstance(k, str) for k in osd["state"]) and all(isinstance(n, str) for g in osd["param_groups"]
                                                             for n in g["params"]):
        return osd  # already name-keyed (checkpoints written before model_state numbered them)
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}


def unwrap(module: nn.Module) -> nn.Module:
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def full_state(policy: nn.Module, opt: torch.optim.Optimizer, trainable: nn.Module, kind: str, d: Dist):
    """(policy state dict, optimizer state dict), unsharded, on the CPU. FSDP2: a collective (all ranks call)."""
    if d.enabled and kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        heads = get_model_state_dict(trainable, options=o)
        osd = get_optimizer_state_dict(trainable, opt, options=o)
        sd = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()
              if not (k.startswith("flow_head.") or k.startswith("sigma_net."))}
        sd.update(heads)
        return sd, osd
    return ({k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}, opt.state_dict())


def load_full_state(policy: nn.Module, opt: torch.optim.Optimizer, trainable: nn.Module, kind: str, d: Dist,
                    model_sd: dict, opt_sd: dict) -> None:
    if d.enabled and kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True)
        heads = {k: v for k, v in model_sd.items() if k.startswith(("flow_head.", "sigma_net."))}
        policy.load_state_dict({k: v for k, v in model_sd.items() if k not in heads}, strict=False)
        set_model_state_dict(trainable, heads, options=o)
        set_optimizer_state_dict(trainable, opt, opt_sd, options=o)
        return
    policy.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
