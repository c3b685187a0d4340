"""fp32 GEMM for the CPU decode step: out = x @ w.T, or out += x @ w.T (the residual add), w packed once.

    packed = pack_linear_cpu(w)                    # w (N, K) -> (ceil(N/32), K, 32) panels; None: torch.mm runs
    y = linear_cpu(x, w, packed)                   # x (M, K) -> (M, N)
    linear_cpu(x, w, packed, out=res, accumulate=True)   # res += x @ w.T in place

The C++ loop (csrc/linear_cpu.cpp, module vla_rft_engine._linear_cpu) reads each 32-column panel once for all M
rows and prefetches the next panel meanwhile; at the CPU RFT shape (34 rows) its weights have always been evicted
by the K/V pass, where MKL runs at about half its in-cache rate (bench/results/cpu_inference_cpu.json, decode_gemms).
The reference is torch.mm / addmm_, which also runs for other dtypes or without the extension. One chain of
multiply-adds per output over K: rounding differs from MKL's blocked sums by a few ulps of the row's magnitude.
"""
from __future__ import annotations

import torch

try:
    from vla_rft_engine import _linear_cpu as _ext  # type: ignore[attr-defined]  # compiled, no stub
except ImportError:  # not built: torch.mm runs (vla-rft info says so)
    _ext = None


def extension_available() -> bool:
    return _ext is not None


def pack_linear_cpu(w: torch.Tensor) -> torch.Tensor | None:
    if _ext is None or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    return _ext.pack(w.detach().contiguous())


def linear_cpu_reference(x, w, out=None, accumulate=False) -> torch.Tensor:
    if out is None:
        return torch.mm(x, w.t())
    return out.addmm_(x, w.t()) if accumulate else torch.mm(x, w.t(), out=out)


def linear_cpu(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
    """x (M, K) fp32; out (M, N) contiguous; w (N, K) the weight `packed` came from (used when packed is None)."""
    if packed is None or x.dtype != torch.float32:
        return linear_cpu_reference(x, w, out, accumulate)
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    _ext.linear(x, packed, w.shape[0], out, accumulate)
    return out
