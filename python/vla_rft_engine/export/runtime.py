"""The deployed policy without torch: what a robot computer runs (numpy + onnxruntime, or TensorRT + CuPy).

    rt = load_runtime("runs/export/policy.onnx")               # or policy.engine (+ policy.json beside it)
    ids = rt.encode_instructions(["pick up the red block"])    # text -> int64 (B, L), the policy's word buckets
    actions = rt(image, ids, proprio, noise)                   # uint8 (B,H,W,3), (B,L), (B,P), (B,T,A) -> (B,T,A)

Inputs and output are those of onnx_export.DeployedPolicy; the frame size, chunk shape and instruction
encoding come from the file itself (the ONNX metadata, or the engine's JSON). Nothing here imports torch:
torch is ~2 GB and seconds to load, and a robot that only runs the policy needs neither. The torch backends
(eager, torch.compile) are in torch_runtime.py; load_runtime imports them only when asked.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("onnxruntime", "tensorrt", "torch", "torch_compiled")
TRT_NEEDS = "needs a CUDA device with TensorRT and CuPy"
_WORD = re.compile(r"[a-z0-9]+")


def hash_tokens_np(instructions: list[str], num_buckets: int) -> np.ndarray:
    """models.encoders.hash_tokens without torch: words -> crc32 buckets, padded with -1, int64 (B, L)."""
    toks = [[zlib.crc32(w.encode()) % num_buckets for w in _WORD.findall(s.lower())] or [0] for s in instructions]
    L = max(len(t) for t in toks)
    return np.array([t + [-1] * (L - len(t)) for t in toks], dtype=np.int64)


@dataclass
class PolicyMeta:
    """What a caller must know to feed the policy (onnx_export.policy_meta, plus the runtime's own limits)."""
    image_size: tuple = (64, 64)
    chunk_len: int = 8
    action_dim: int = 7
    proprio_dim: int = 8
    num_steps: int = 10
    instruction_encoding: str = "hash_words"  # hash_words (text works) | token_ids (the client tokenises)
    vocab_buckets: int = 1024
    max_words: int = 64
    max_batch: int = 64
    model_id: str = ""
    backend: str = ""

    @classmethod
    def from_dict(cls, d: dict, **over) -> "PolicyMeta":
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in {**d, **over}.items() if k in names}
        kw["image_size"] = tuple(int(x) for x in kw.get("image_size", cls.image_size))
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


def file_id(path: str | Path) -> str:
    """name@sha256[:12] of the file's bytes: which weights answered, stable across copies and renames of dirs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{Path(path).name}@{h.hexdigest()[:12]}"


_NVTX: list = []  # [the nvtx module or None], looked up once


def nvtx_range(name: str):
    """An NVTX range when the `nvtx` package is installed (Nsight shows it), else nothing."""
    if not _NVTX:
        _NVTX.append(importlib.import_module("nvtx") if importlib.util.find_spec("nvtx") else None)
    return contextlib.nullcontext() if _NVTX[0] is None else _NVTX[0].annotate(name)


class PolicyRuntime:
    """Shared input handling; a backend implements _run(feed: {input name: array}) -> actions (b, T, A)."""
    meta: PolicyMeta

    def encode_instructions(self, texts: list[str]) -> np.ndarray:
        if self.meta.instruction_encoding != "hash_words":
            raise ValueError("this policy takes token ids (instruction_encoding=token_ids); tokenise the text with "
                             "the model's own tokenizer")
        return hash_tokens_np(list(texts), self.meta.vocab_buckets)

    def __call__(self, image, instruction, proprio, noise=None, seed: int | None = None) -> np.ndarray:
        m = self.meta
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 4 or tuple(image.shape[1:]) != (*m.image_size, 3):
            raise ValueError(f"image must be uint8 (B, {m.image_size[0]}, {m.image_size[1]}, 3); "
                             f"got {image.dtype} {tuple(image.shape)}")
        B = image.shape[0]
        if isinstance(instruction, str) or (isinstance(instruction, (list, tuple)) and instruction
                                            and isinstance(instruction[0], str)):
            instruction = self.encode_instructions([instruction] * B if isinstance(instruction, str) else list(instruction))
        ids = np.ascontiguousarray(instruction, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != B or not 1 <= ids.shape[1] <= m.max_words:
            raise ValueError(f"instruction ids must be int64 ({B}, L) with 1 <= L <= {m.max_words}; got {ids.shape}")
        proprio = np.ascontiguousarray(proprio, dtype=np.float32)
        if proprio.shape != (B, m.proprio_dim):
            raise ValueError(f"proprio must be ({B}, {m.proprio_dim}); got {proprio.shape}")
        chunk = (B, m.chunk_len, m.action_dim)
        if noise is None:  # the ODE's start a_0 ~ N(0, I); a seed makes the answer reproducible
            noise = np.random.default_rng(seed).standard_normal(chunk, dtype=np.float32)
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        if noise.shape != chunk:
            raise ValueError(f"noise must be {chunk}; got {noise.shape}")
        outs = []
        for i in range(0, B, m.max_batch):  # larger batches than the engine's profile run in slices
            sl = slice(i, i + m.max_batch)
            with nvtx_range(f"policy.{m.backend}.b{min(B - i, m.max_batch)}"):
                outs.append(self._run({"image": image[sl], "instruction": ids[sl], "proprio": proprio[sl],
                                       "noise": noise[sl]}))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _run(self, feed: dict) -> np.ndarray:
        raise NotImplementedError

    def example(self, batch: int = 1, instruction: str = "pick up the red block", seed: int = 0) -> tuple:
        """Random inputs of the right shapes (warm-up, benches)."""
        m, rng = self.meta, np.random.default_rng(seed)
        image = rng.integers(0, 256, (batch, *m.image_size, 3), dtype=np.uint8)
        ids = (self.encode_instructions([instruction] * batch) if m.instruction_encoding == "hash_words"
               else np.zeros((batch, 4), np.int64))
        proprio = rng.standard_normal((batch, m.proprio_dim), dtype=np.float32)
        noise = rng.standard_normal((batch, m.chunk_len, m.action_dim), dtype=np.float32)
        return image, ids, proprio, noise

    def warmup(self, max_batch: int = 1) -> None:
        """Run once per batch size the caller will use first (lazy allocations, autotuning, compiles)."""
        for b in sorted({1, min(max_batch, self.meta.max_batch)}):
            self(*self.example(b))

    def close(self) -> None:
        pass


class OnnxRuntimePolicy(PolicyRuntime):
    """The ONNX file on onnxruntime: CPU by default, CUDA when asked (providers) and installed."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        raw = self.session.get_modelmeta().custom_metadata_map.get("vla_rft")
        if raw is None:
            raise ValueError(f"{path} carries no vla-rft metadata (exported before it existed?); re-export it with "
                             "`vla-rft export`")
        self.meta = PolicyMeta.from_dict(json.loads(raw), model_id=file_id(path), backend="onnxruntime",
                                         max_batch=1024)

    def _run(self, feed: dict) -> np.ndarray:
        return self.session.run(["actions"], feed)[0]


class TensorRTPolicy(PolicyRuntime):
    """A TensorRT engine (export/tensorrt_build.py) driven with CuPy device buffers, one flat buffer per I/O
    tensor at the profile's largest shape: no allocation per call, only the two copies and the launch."""

    def __init__(self, path: str | Path):
        ok, why = backend_available("tensorrt")
        if not ok:
            raise RuntimeError(f"backend=tensorrt: {why}")
        import cupy as cp
        import tensorrt as trt
        path = Path(path)
        spec_path = path.with_suffix(".json")
        if not spec_path.is_file():
            raise FileNotFoundError(f"the engine's I/O spec {spec_path} is missing (vla-rft export format=tensorrt "
                                    "writes it beside the engine)")
        spec = json.loads(spec_path.read_text())
        if "meta" not in spec:
            raise ValueError(f"{spec_path} carries no policy metadata (built before it existed?); rebuild the engine "
                             "with `vla-rft export format=tensorrt`")
        self.meta = PolicyMeta.from_dict(spec["meta"], model_id=file_id(path), backend="tensorrt")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path} (built by another TensorRT version or GPU?)")
        self.ctx = self.engine.create_execution_context()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._cp, self.bufs, self.outputs = cp, {}, []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dt = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                largest = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
            else:
                largest = tuple(self.meta.max_batch if d < 0 else d for d in self.engine.get_tensor_shape(name))
                self.outputs.append(name)
            self.bufs[name] = (cp.empty(int(np.prod(largest)), dt), dt)

    def _view(self, name: str, shape: tuple):
        flat, _ = self.bufs[name]
        return flat[:int(np.prod(shape))].reshape(shape)

    def _run(self, feed: dict) -> np.ndarray:
        with nvtx_range("trt.h2d"):
            for name, host in feed.items():
                host = np.ascontiguousarray(host, dtype=self.bufs[name][1])
                dev = self._view(name, host.shape)
                dev.set(host, stream=self.stream)
                self.ctx.set_input_shape(name, host.shape)
                self.ctx.set_tensor_address(name, dev.data.ptr)
        outs = {}
        for name in self.outputs:  # shapes follow from the input shapes just set
            outs[name] = self._view(name, tuple(self.ctx.get_tensor_shape(name)))
            self.ctx.set_tensor_address(name, outs[name].data.ptr)
        with nvtx_range("trt.execute"):
            if not self.ctx.execute_async_v3(self.stream.ptr):
                raise RuntimeError("TensorRT execution failed")
        with nvtx_range("trt.d2h"):
            out = self._cp.asnumpy(outs["actions"], stream=self.stream)
            self.stream.synchronize()
        return out.astype(np.float32, copy=False)


def backend_available(backend: str) -> tuple[bool, str]:
    """(usable, why not) without importing torch (the torch backends excepted: they are torch)."""
    def has(mod):
        return importlib.util.find_spec(mod) is not None
    if backend == "onnxruntime":
        return (True, "ok") if has("onnxruntime") else (False, "onnxruntime is not installed (pip install '.[onnx]')")
    if backend == "tensorrt":
        if not (has("tensorrt") and has("cupy")):
            return False, f"{TRT_NEEDS} (pip install '.[tensorrt,gpu]' on a CUDA machine)"
        try:
            import cupy as cp
            n = cp.cuda.runtime.getDeviceCount()
        except Exception as e:  # no driver, no device: CuPy raises its own runtime errors
            return False, f"{TRT_NEEDS}: {' '.join(str(e).split())}"
        return (True, "ok") if n > 0 else (False, f"{TRT_NEEDS}: no CUDA device is visible")
    if backend in ("torch", "torch_compiled"):
        return (True, "ok") if has("torch") else (False, "torch is not installed")
    return False, f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}"


def resolve_backend(model: str | Path, backend: str = "auto") -> str:
    """auto: by the file: .onnx -> onnxruntime, .engine / .plan -> tensorrt, a checkpoint or run dir -> torch."""
    if backend != "auto":
        return backend
    suffix = Path(model).suffix
    return {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt"}.get(suffix, "torch")


def load_runtime(model: str | Path, backend: str = "auto", **torch_kw) -> PolicyRuntime:
    """The policy in `model` on `backend` (see resolve_backend). torch_kw (image_size, num_steps, device,
    max_batch) go to the torch backends, which import torch; the others never do."""
    backend = resolve_backend(model, backend)
    ok, why = backend_available(backend)
    if not ok:
        raise RuntimeError(f"backend={backend}: {why}")
    if not Path(model).exists():
        raise FileNotFoundError(f"model file {model} not found")
    if backend == "onnxruntime":
        return OnnxRuntimePolicy(model, threads=int(torch_kw.get("threads", 0) or 0))
    if backend == "tensorrt":
        return TensorRTPolicy(model)
    if Path(model).suffix in (".onnx", ".engine", ".plan"):
        raise ValueError(f"backend={backend} runs a policy checkpoint (ckpt.pt, policy.safetensors or its run dir), "
                         f"not {Path(model).name}; use backend=auto")
    from .torch_runtime import TorchPolicyRuntime
    torch_kw.pop("threads", None)
    return TorchPolicyRuntime(model, compiled=backend == "torch_compiled", **torch_kw)
