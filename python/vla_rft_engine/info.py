"""`vla-rft info`: versions, devices, and which optional backends are usable here (and why not)."""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys


def _module(name: str) -> tuple[bool, str]:
    try:
        m = importlib.import_module(name)
        return True, getattr(m, "__version__", "installed")
    except Exception as e:  # ImportError, or a package that fails on import without a GPU
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not importable'}"


def backends() -> dict[str, tuple[bool, str]]:
    import torch
    cuda = torch.cuda.is_available()
    out: dict[str, tuple[bool, str]] = {}
    from .ops.vq_decode import extension_available
    out["vq_decode C++ (CPU)"] = extension_available()
    from .kernels.decode_attention_cpu import extension_available as attn_built
    out["decode attention C++ (CPU)"] = (attn_built(), "built" if attn_built() else "not built: batched matmuls run instead")
    from .kernels.sampling import nucleus_check_built
    out["top-p check C++ (CPU)"] = (nucleus_check_built(), "built" if nucleus_check_built() else "not built: torch ops run instead")
    ok, why = _module("vla_rft_engine._vq_cuda")
    out["vq_decode CUDA"] = (ok and cuda, "built, CUDA device present" if ok and cuda else
                             ("built, but no CUDA device" if ok else f"not built ({why})"))
    ok, why = _module("triton")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    out["triton"] = (ok and (cuda or interp), f"{why}; " + ("GPU" if cuda else "CPU interpreter (TRITON_INTERPRET=1)" if interp
                                                           else "no GPU: set TRITON_INTERPRET=1 to run kernels on the CPU (slow)"))
    # only what some code path uses: attn_backend=flash, vla-rft export (onnx / tensorrt), the LPIPS heads,
    # the HF VLM encoder and the transformers rollout baselines
    for name, mod, extra in [("flash-attn", "flash_attn", "pip install '.[flash]' on a CUDA machine"),
                             ("tensorrt", "tensorrt", "pip install '.[tensorrt]' on a CUDA machine"),
                             ("onnx", "onnx", "pip install '.[onnx]'"),
                             ("onnxruntime", "onnxruntime", "pip install '.[onnx]'"),
                             ("onnxscript", "onnxscript", "pip install '.[onnx]' (torch's ONNX exporter)"),
                             ("lpips", "lpips", "pip install '.[lpips]'"),
                             ("transformers", "transformers", "pip install '.[hf]'")]:
        ok, why = _module(mod)
        out[name] = (ok, why if ok else f"{why} -> {extra}")
    from .envs.libero_env import libero_status  # LIBERO tasks (libero_*/...): the package, and a GL that renders
    out["LIBERO (render)"] = libero_status()
    ok, why = _module("h5py")
    out["h5py"] = (ok, why if ok else f"{why} -> pip install '.[libero]' (LIBERO HDF5 demos)")
    from .rl.lpips import resolve_weight_paths
    for net in ("alex", "vgg"):  # the package alone is not LPIPS: the reward needs both weight files on disk
        try:
            bb, hp = resolve_weight_paths(net)
            out[f"LPIPS weights ({net})"] = (True, f"{bb} + {hp}")
        except FileNotFoundError as e:
            out[f"LPIPS weights ({net})"] = (False, str(e).split(": ", 1)[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    import vla_rft_engine
    print(f"vla-rft-engine {vla_rft_engine.__version__}")
    print(f"python {sys.version.split()[0]} on {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        print("CUDA: no device visible (CPU only)")
    print(f"nvcc: {shutil.which('nvcc') or 'not found'}")
    print("\noptional backends:")
    for name, (ok, why) in backends().items():
        print(f"  [{'x' if ok else ' '}] {name:<22} {why}")
    return 0
