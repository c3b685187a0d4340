"""Token ids -> latent grid: the fused decode the C++ extension implements, and its PyTorch reference.

Semantics (both paths):
    codes = FSQ digits of ids (mixed radix, normalised)   or   codebook[ids]        (B, gh*gw, d)
    y     = codes @ weight.T + bias                                                   (B, gh*gw, C*p*p)
    out[b, c, i*p+u, j*p+v] = y[b, i*gw+j, c*p*p + u*p + v]                          (B, C, gh*p, gw*p)
Context tokens use p = 1 (a 1x1 conv), dynamics tokens p > 1 (a linear per latent patch).
"""
from __future__ import annotations

import importlib
import warnings

import torch

from ..models.quantizers import fsq_indices_to_codes

# Loaded extension modules by kind ("cpu" -> vla_rft_engine._vq_cpu, "cuda" -> _vq_cuda); None = not built.
_EXTS: dict[str, object | None] = {}
_EXT_ERRS: dict[str, str] = {}
_WARNED: set[str] = set()


def _load_ext(kind: str = "cpu"):
    if kind not in _EXTS:
        try:
            _EXTS[kind] = importlib.import_module(f"vla_rft_engine._vq_{kind}")
        except ImportError as e:  # not built: fall back with a warning
            _EXTS[kind] = None
            _EXT_ERRS[kind] = str(e)
    return _EXTS[kind]


def extension_available(kind: str = "cpu") -> tuple[bool, str]:
    ext = _load_ext(kind)
    return (ext is not None, "built" if ext is not None else f"not built ({_EXT_ERRS.get(kind, 'unavailable')})")


def check_ids(ids: torch.Tensor, num_codes: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be int32/int64, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_codes):
        raise ValueError(f"token ids out of range: got [{int(ids.min())}, {int(ids.max())}], codebook has {num_codes} codes "
                         f"(ids must be in [0, {num_codes}); vocabulary ids must have their offset removed first)")


def _check_shapes(ids, weight, bias, grid, patch, dim):
    B = ids.shape[0]
    gh, gw = grid
    if ids.dim() != 2 or ids.shape[1] != gh * gw:
        raise ValueError(f"ids must be (B, {gh * gw}) for grid {gh}x{gw}, got {tuple(ids.shape)}")
    if weight.dim() != 2 or weight.shape[1] != dim or weight.shape[0] % (patch * patch):
        raise ValueError(f"weight must be (C*{patch}*{patch}, {dim}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    return B, gh, gw, weight.shape[0] // (patch * patch)


def vq_decode_reference(ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        grid: tuple[int, int], patch: int = 1, levels=None,
                        codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch version of the fused decode (see module docstring)."""
    if (levels is None) == (codebook is None):
        raise ValueError("give exactly one of levels (FSQ) or codebook (VQ)")
    # exactly one is given: codebook is None <=> levels is not None
    dim = codebook.shape[1] if codebook is not None else len(levels)
    ncodes = codebook.shape[0] if codebook is not None else int(torch.tensor(list(levels)).prod())
    check_ids(ids, ncodes)
    B, gh, gw, C = _check_shapes(ids, weight, bias, grid, patch, dim)
    codes = codebook[ids.long()] if codebook is not None else fsq_indices_to_codes(ids, levels)
    y = codes.to(weight.dtype) @ weight.t()
    if bias is not None:
        y = y + bias
    p = patch
    return y.view(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * p, gw * p)


def vq_decode(ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              grid: tuple[int, int], patch: int = 1, levels=None,
              codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Fused decode through the C++/CUDA extension; the PyTorch reference where it is not built.

    Dispatch on the weight's device: CUDA -> `_vq_cuda`, CPU -> `_vq_cpu`. Output dtype = weight dtype.
    Not differentiable (the hot path is inference: generated tokens -> frames for the reward).
    """
    kind = "cuda" if weight.is_cuda else "cpu"
    ext = _load_ext(kind)
    if ext is None:
        if kind not in _WARNED:
            warnings.warn(f"vla_rft_engine {kind} extension _vq_{kind} unavailable ({_EXT_ERRS.get(kind)}); using the "
                          "PyTorch reference for vq_decode. Reinstall with `pip install --no-build-isolation -e .` "
                          "(or run .ci/build_ext.sh) to build it.", RuntimeWarning, stacklevel=2)
            _WARNED.add(kind)
        return vq_decode_reference(ids, weight, bias, grid, patch, levels, codebook)
    return ext_vq_decode(ext, ids, weight, bias, grid, patch, levels, codebook)


def ext_vq_decode(ext, ids, weight, bias, grid, patch, levels, codebook):
    """Call an extension module's `decode`; it validates ids (ValueError), shapes (ValueError) and dtypes (TypeError)."""
    gh, gw = (int(g) for g in grid)
    lv = [int(x) for x in levels] if levels is not None else []
    if levels is not None and not lv:
        raise ValueError("levels must not be empty")
    return ext.decode(ids, weight, bias, gh, gw, int(patch), lv, codebook)
