"""The PyTorch fallback of runtime.PolicyRuntime, for machines with torch but no TensorRT (or no export yet).

backend "torch": DeployedPolicy eagerly. backend "torch_compiled": the same module under torch.compile; on
CUDA in mode "reduce-overhead", i.e. inductor's kernels replayed as CUDA graphs (at batch 1 the K = 10 ODE
steps are mostly kernel-launch overhead, which a graph replay removes). Compiled code is specialised to
shapes, so batches are padded to a power of two and instruction ids to 32 (or 64) words: a handful of
graphs, each compiled once (warmup), instead of one per distinct request size. Rows are independent in the
policy (per-sample norms), so the padding rows never change the real rows' actions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .onnx_export import DeployedPolicy, policy_meta
from .runtime import PolicyMeta, PolicyRuntime, file_id

_WORD_BUCKETS = (32, 64)


def _bucket(n: int, cap: int) -> int:
    return min(1 << (n - 1).bit_length(), cap)


class TorchPolicyRuntime(PolicyRuntime):
    def __init__(self, policy, image_size: int = 64, num_steps: int = 0, compiled: bool = False,
                 device: str = "auto", max_batch: int = 64, model_id: str = ""):
        from ..utils import resolve_device
        if isinstance(policy, (str, Path)):
            from ..train.sft import load_policy
            model_id = model_id or file_id(policy if Path(policy).is_file() else _weights_in(Path(policy)))
            policy = load_policy(policy)
        self.device = resolve_device(device)
        self.model = DeployedPolicy(policy.to(self.device), num_steps or None).eval()
        self.compiled = compiled
        backend = "torch_compiled" if compiled else "torch"
        self.meta = PolicyMeta.from_dict(policy_meta(policy, image_size, num_steps or None), max_batch=max_batch,
                                         model_id=model_id or "in-memory", backend=backend)
        self.fn: Callable = self.model
        if compiled:
            cuda = self.device.type == "cuda"
            # every (batch bucket, word bucket) is one specialisation: allow them all before dynamo gives up
            n = (max_batch.bit_length() + 1) * len(_WORD_BUCKETS)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)
            self.fn = torch.compile(self.model, mode="reduce-overhead" if cuda else None, dynamic=False)

    def _pad(self, feed: dict) -> dict:
        B, L = feed["instruction"].shape
        b = _bucket(B, self.meta.max_batch)
        w = next(x for x in _WORD_BUCKETS if x >= L)
        out = {}
        for k, v in feed.items():
            pad = [(0, b - B)] + [(0, 0)] * (v.ndim - 1)
            if k == "instruction":
                pad[1] = (0, w - L)
            out[k] = np.pad(v, pad, constant_values=-1 if k == "instruction" else 0)
        return out

    def _run(self, feed: dict) -> np.ndarray:
        B = feed["image"].shape[0]
        if self.compiled:
            feed = self._pad(feed)
        with torch.no_grad():
            x = [torch.from_numpy(np.ascontiguousarray(feed[k])).to(self.device, non_blocking=True)
                 for k in ("image", "instruction", "proprio", "noise")]
            if self.compiled and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's output buffer is ours to reuse
            out = self.fn(*x)
            return out[:B].float().cpu().numpy()

    def warmup(self, max_batch: int = 1) -> None:
        """Compiled: one compile per batch bucket up to max_batch (at the 32-word bucket), before any request."""
        if not self.compiled:
            return super().warmup(max_batch)
        b = 1
        while True:
            self(*self.example(b))
            if b >= min(max_batch, self.meta.max_batch):
                break
            b = _bucket(b + 1, self.meta.max_batch)


def _weights_in(run_dir: Path) -> Path:
    from ..train.sft import POLICY_WEIGHTS
    return run_dir / POLICY_WEIGHTS if (run_dir / POLICY_WEIGHTS).is_file() else run_dir / "ckpt.pt"
