"""`vla-rft export`: the deployed policy (export/onnx_export.py) to ONNX, or to a TensorRT engine on a GPU,
checked against PyTorch on random inputs before anything is called done."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, UserError, parse_command


@dataclass
class ExportConfig:
    policy: str = ""                     # SFT or RFT checkpoint (ckpt.pt)
    out: str = "runs/export/policy.onnx"  # the ONNX file; format=tensorrt writes .engine and .json beside it
    format: str = "onnx"                 # onnx | tensorrt
    image_size: int = 64                 # the square camera frames the policy takes
    num_steps: int = 0                   # ODE steps K (0: the policy's own, paper 10)
    fp16: bool = True                    # tensorrt: an fp16 engine (false: fp32)
    max_batch: int = 16                  # tensorrt: the largest batch of the engine's profile
    check: bool = True                   # compare with PyTorch on random inputs (batch 1 and 4)

    def validate(self) -> None:
        if not self.policy:
            raise ConfigError("export needs policy=<ckpt.pt> (vla-rft sft or rft writes it)")
        if self.format not in ("onnx", "tensorrt"):
            raise ConfigError(f"format must be onnx or tensorrt, got {self.format!r}")
        if self.image_size < 8 or self.num_steps < 0 or self.max_batch < 1:
            raise ConfigError("image_size must be >= 8, num_steps >= 0, max_batch >= 1")


def main(argv: list[str]) -> int:
    cfg = parse_command("export", ExportConfig, argv)
    if cfg is None:
        return 0
    cfg.validate()
    import numpy as np
    import torch

    from ..train.sft import load_policy
    from .onnx_export import INPUTS, DeployedPolicy, export_onnx, onnx_session, run_onnx
    if cfg.format == "tensorrt":
        from .tensorrt_build import tensorrt_available
        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"format=tensorrt: {why}; format=onnx works everywhere")
    pol = load_policy(cfg.policy)
    path = export_onnx(pol, cfg.out, image_size=cfg.image_size, num_steps=cfg.num_steps or None)
    print(f"export: {path} (inputs {', '.join(INPUTS)}; dynamic batch; onnx.checker passed)")
    model = DeployedPolicy(pol, cfg.num_steps or None)
    cases = [model.example_inputs(batch=b, image_size=cfg.image_size) for b in (1, 4)] if cfg.check else []
    for ex in cases:
        with torch.no_grad():
            ref = model(*ex).numpy()
        err = float(np.abs(run_onnx(onnx_session(path), *ex) - ref).max())
        print(f"export: onnxruntime vs PyTorch, batch {ex[0].shape[0]}: max |diff| {err:.2e}")
        if err > 1e-4:
            raise RuntimeError(f"the ONNX model differs from PyTorch by {err:.2e} (> 1e-4); do not deploy it")
    if cfg.format == "tensorrt":
        from .tensorrt_build import build_tensorrt, run_tensorrt
        eng = build_tensorrt(path, Path(cfg.out).with_suffix(".engine"), cfg.fp16, cfg.max_batch)
        print(f"export: {eng} and {eng.with_suffix('.json')} ({'fp16' if cfg.fp16 else 'fp32'})")
        tol = 2e-2 if cfg.fp16 else 1e-3
        for ex in cases:
            with torch.no_grad():
                ref = model(*ex).numpy()
            out = run_tensorrt(eng, dict(zip(INPUTS, (t.numpy() for t in ex))))["actions"]
            err = float(np.abs(out - ref).max())
            print(f"export: TensorRT vs PyTorch, batch {ex[0].shape[0]}: max |diff| {err:.2e}")
            if err > tol:
                raise RuntimeError(f"the TensorRT engine differs from PyTorch by {err:.2e} (> {tol}); do not deploy it")
    return 0
