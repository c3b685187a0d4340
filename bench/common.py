"""Shared bench plumbing: timing by median of repeats, device description, one JSON record out."""
from __future__ import annotations

import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


_PROFILE = {"on": False}  # set by parse_args(--profile): time_fn's timed repeats become profiler ranges


def time_fn(fn, repeats: int = 10, warmup: int = 2, device: torch.device | None = None, before=None) -> dict:
    """Median / min / all wall times (seconds) of fn() over `repeats` runs after `warmup` (outside any
    --profile range). `before()`, when given, runs ahead of each timed call, untimed (e.g. evicting caches)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    with profiled(_PROFILE["on"], torch.device(device) if device is not None else torch.device("cpu")):
        for _ in range(repeats):
            if before is not None:
                before()
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


@contextmanager
def profiled(enabled: bool, device: torch.device):
    """--profile: cudaProfilerStart/Stop around the measured region (warm-up stays outside), so
    `nsys profile --capture-range=cudaProfilerApi` records only it. No-op on the CPU or when disabled."""
    on = enabled and device.type == "cuda"
    if on:
        torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaProfilerStart()
    try:
        yield
    finally:
        if on:
            torch.cuda.synchronize(device)
            torch.cuda.cudart().cudaProfilerStop()


def add_profile_flag(ap) -> None:
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: cudaProfilerStart/Stop around each timed region, warm-up outside (README: Profiling)")


def parse_args(ap, argv):
    """ap.parse_args with --profile added and applied to time_fn."""
    add_profile_flag(ap)
    a = ap.parse_args(argv)
    _PROFILE["on"] = a.profile
    return a
