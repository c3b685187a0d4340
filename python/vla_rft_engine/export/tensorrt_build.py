"""TensorRT engine from the exported ONNX policy (GPU only): fp16 or fp32, one optimisation profile over the
batch (and instruction length), and a JSON of the engine's I/O spec beside it."""
from __future__ import annotations

from typing import Any

import json
from pathlib import Path


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install '.[tensorrt]' on a CUDA machine)"
    import torch
    if not torch.cuda.is_available():
        return False, "TensorRT builds and runs engines on an NVIDIA GPU; no CUDA device is visible here"
    return True, "ok"


def build_tensorrt(onnx_path: str | Path, engine_path: str | Path, fp16: bool = True, max_batch: int = 16,
                   max_words: int = 32) -> Path:
    ok, why = tensorrt_available()
    if not ok:
        from ..config import UserError
        raise UserError(f"format=tensorrt: {why}; format=onnx works everywhere")
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    spec: dict[str, Any] = {"inputs": [], "outputs": [], "precision": "fp16" if fp16 else "fp32"}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        lo, opt, hi = list(shape), list(shape), list(shape)
        for j, d in enumerate(shape):
            if d == -1:  # dim 0 is the batch; the instruction's dim 1 its word count
                lo[j], opt[j], hi[j] = 1, (1 if j == 0 else 8), (max_batch if j == 0 else max_words)
        profile.set_shape(t.name, lo, opt, hi)
        spec["inputs"].append({"name": t.name, "dtype": str(t.dtype), "min": lo, "opt": opt, "max": hi})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        spec["outputs"].append({"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape)})
    config.add_optimization_profile(profile)
    # the ONNX file's runtime metadata (onnx_export.policy_meta), with this engine's limits: export/runtime.py
    # reads the engine with this JSON and no torch
    import onnx
    from .onnx_export import META_KEY
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    spec["meta"] = {**json.loads(props.get(META_KEY, "{}")), "max_batch": max_batch, "max_words": max_words}
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(blob))
    engine_path.with_suffix(".json").write_text(json.dumps(spec, indent=2))
    return engine_path


def run_tensorrt(engine_path: str | Path, inputs: dict):
    """Run a built engine once on {name: array} (torch CUDA tensors as the device buffers) -> {output: numpy}."""
    import numpy as np
    import tensorrt as trt
    import torch
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    ctx = engine.create_execution_context()
    keep, outs = [], {}
    for name, v in inputs.items():
        t = torch.as_tensor(np.asarray(v)).cuda().contiguous()
        keep.append(t)
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dt = {trt.float32: torch.float32, trt.float16: torch.float16}[engine.get_tensor_dtype(name)]
            outs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dt, device="cuda")
            ctx.set_tensor_address(name, outs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return {k: v.float().cpu().numpy() for k, v in outs.items()}
