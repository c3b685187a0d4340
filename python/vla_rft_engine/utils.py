"""Small shared helpers: atomic checkpoints, run logging (TensorBoard + JSONL), NVTX ranges, seeding."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from vla_rft_engine.engine.nvtx import nvtx_range  # noqa: F401  (re-exported: one home, in the engine)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} asked for, but no CUDA device is visible; use device=cpu or device=auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:
        pass


class RunDirLock:
    """One writer per run directory: an exclusive flock on OUT/.lock (released when the process ends, even
    killed). Entering also removes temp files that killed writers of this directory left behind."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.fd = None

    def __enter__(self):
        import fcntl
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            from .config import UserError
            raise UserError(f"another process (pid {other}) is writing to {self.dir}; wait for it to finish, stop "
                            "it, or use another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        for tmp in self.dir.rglob(".*.tmp[0-9]*"):  # half-written checkpoints of killed runs (we hold the lock)
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
        return False


def _atomic_write(path: str | Path, write) -> None:
    """write(f) to a temp file in the same folder, fsync, then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Path.write_text, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path, what: str = "checkpoint", map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; train it first or point the config at the right file")
    try:  # weights_only: tensors and plain containers only, so a shared checkpoint cannot run code
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that wants to build arbitrary objects
        from .config import BadFileError
        raise BadFileError.of(f"{what} at {path} is corrupt or not a plain-data torch checkpoint (loaded with "
                              "weights_only=True)", e, "delete it and re-run the stage that writes it") from None


def save_weights(path: str | Path, tensors: dict, meta: dict) -> Path:
    """Weights as safetensors (no pickle: loading runs no code) with `meta` as JSON in the header; atomic."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"vla_rft": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_weights(path: str | Path, what: str = "weights") -> tuple[dict, dict]:
    """(tensors, meta) from save_weights' file; a missing or corrupt file is a one-line error naming it."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; train it first or point the config at the right file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("vla_rft", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:
        from .config import BadFileError
        raise BadFileError.of(f"{what} at {path} is corrupt or not a safetensors file", e,
                              "delete it and re-run the stage that writes it") from None


def _json_number(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # NaN/inf are not JSON: written as null


def check_finite_step(what: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
    """Stop a trainer at its first non-finite loss or gradient norm, before the optimizer applies it (so every
    saved checkpoint is finite). One host sync per step."""
    if not bool(torch.isfinite(grad_norm) & torch.isfinite(loss)):  # one host sync
        from .config import Diverged
        raise Diverged(f"{what} diverged at step {step}: loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}; "
                       f"this step was not applied and the last checkpoint is finite. Lower lr (now {lr:g}) and "
                       "resume, or start over in a new out_dir")


@contextlib.contextmanager
def diverged_if_non_finite(what: str, step: int, lr: float):
    """Around a training step's forward: an internal NaN/Inf (the inputs were checked when loaded) means the
    run diverged, reported like check_finite_step."""
    from .config import Diverged, NonFiniteError
    try:
        yield
    except NonFiniteError as e:
        raise Diverged(f"{what} diverged at step {step}: {e}; the last checkpoint is finite. Lower lr (now {lr:g}) "
                       "and resume, or start over in a new out_dir") from e


class RunLogger:
    """Scalars to TensorBoard (when installed) and to metrics.jsonl, one JSON object per step.

    resume_step > 0: a run resumed from its checkpoint at that step; what was logged after it (by the killed
    run) is dropped from both, so every step appears once."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if resume_step > 0 and path.is_file():
            keep = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        self.jsonl = open(path, "a" if resume_step > 0 else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb: SummaryWriter | None = SummaryWriter(str(self.dir / "tb"),
                                                          purge_step=resume_step + 1 if resume_step > 0 else None)
        except Exception:  # tensorboard missing: JSONL only
            self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        rec = {"step": step, "time": time.time(), **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]




def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr down to min_lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """Content hash of a file, or of a folder's files (names and contents, sorted: a folder of LIBERO .hdf5
    demos), first 16 hex digits: what a stage output records about its inputs."""
    import hashlib
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()[:16]
