"""Shared bench plumbing: timing by median of repeats, device description, one JSON record out."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_fn(fn, repeats: int = 10, warmup: int = 2, device: torch.device | None = None) -> dict:
    """Median / min / all wall times (seconds) of fn() over `repeats` runs after `warmup`."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def emit(record: dict, out: str | None = None) -> None:
    """Print the record as one JSON line; also write it to `out` when given."""
    line = json.dumps(record)
    print(line)
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(record, indent=2) + "\n")


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()
