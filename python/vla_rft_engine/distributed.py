"""Process-group plumbing for `torchrun --nproc_per_node=K -m vla_rft_engine.cli {rft,pretrain-wm} ...`.

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


def model_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool):
    """(model state dict, optimizer state dict), full and on the CPU; sharded: a collective (all ranks call)."""
    if not sharded:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)


def load_model_state(model: nn.Module, opt: torch.optim.Optimizer, sharded: bool, sd: dict, osd: dict) -> None:
    if not sharded:
        model.load_state_dict(sd)
        opt.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd, options=o)
    set_optimizer_state_dict(model, opt, osd, options=o)


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
