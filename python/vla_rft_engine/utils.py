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
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated / not a torch file
        raise RuntimeError(f"{what} at {path} is corrupt or not a torch checkpoint ({type(e).__name__}: {e}); "
                           "delete it and re-run the stage that writes it") from e


def _json_number(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # NaN/inf are not JSON: written as null


def check_finite_step(what: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
    """Stop a trainer at its first non-finite loss or gradient norm, before the optimizer applies it (so every
    saved checkpoint is finite). One host sync per step."""
    if not bool(torch.isfinite(grad_norm)) or not bool(torch.isfinite(loss)):
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
    """Scalars to TensorBoard (when installed) and to metrics.jsonl, one JSON object per step."""

    def __init__(self, out_dir: str | Path, resume: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a" if resume else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tb"))
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


