"""The deployed policy as one graph, and its ONNX export.

DeployedPolicy is what a robot runs per control step: the frozen encoder, then the K-step Euler ODE sampler
(Eq. 4's flow, deterministic given its starting noise), then the action scale. Inputs are plain arrays so
any runtime can feed them:
  image        uint8 (B, H, W, 3), the camera frame
  instruction  int64 (B, L), word bucket ids from models.encoders.hash_tokens (-1 = padding)
  proprio      float32 (B, P), raw robot state
  noise        float32 (B, T, A), the ODE's a_0 ~ N(0, I): an input, so the output is deterministic
-> float32 (B, T, A), the action chunk in raw units. Batch is dynamic.

The ONNX file carries what a torch-free runtime needs to feed it (export/runtime.py): metadata key "vla_rft",
a JSON object (policy_meta) with the frame size, the chunk shape and how instructions become ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

INPUTS = ("image", "instruction", "proprio", "noise")
MAX_WORDS = 64  # the instruction's longest id row the exported graph accepts
META_KEY = "vla_rft"


class DeployedPolicy(nn.Module):
    def __init__(self, policy, num_steps: int | None = None):
        super().__init__()
        self.policy = policy.eval()
        self.num_steps = num_steps or policy.cfg.num_steps

    def forward(self, image, instruction, proprio, noise):
        p = self.policy
        s = (proprio.float() - p.proprio_mean) / p.proprio_std
        z = p.encoder(image, instruction, s)
        a, delta = noise.float(), 1.0 / self.num_steps
        for k in range(self.num_steps):  # unrolled: K = 10 small steps, one graph
            tau = torch.full_like(a[:, 0, 0], k * delta)
            a = a + delta * p.velocity(z, s, a, tau).float()
        return p.unnormalize_actions(a)

    def example_inputs(self, batch: int = 2, image_size: int = 64, instruction: str = "pick up the red block"):
        from ..models.encoders import hash_tokens
        cfg = self.policy.cfg
        g = torch.Generator().manual_seed(0)
        image = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=g)
        ids = hash_tokens([instruction] * batch, self.policy.encoder.vocab_buckets)
        proprio = self.policy.proprio_mean + self.policy.proprio_std * torch.randn(batch, cfg.proprio_dim, generator=g)
        noise = torch.randn(batch, cfg.chunk_len, cfg.action_dim, generator=g)
        return image, ids, proprio.float(), noise


def policy_meta(policy, image_size: int, num_steps: int | None = None) -> dict:
    """What a runtime needs besides the graph. Instructions: `hash_words` (SmallEncoder: crc32 word buckets,
    reproducible anywhere from the text) or `token_ids` (an HF encoder: the client tokenises)."""
    cfg, enc = policy.cfg, policy.encoder
    buckets = int(getattr(enc, "vocab_buckets", 0))
    return {"format": "vla-rft-deployed/1", "image_size": [int(image_size)] * 2, "chunk_len": cfg.chunk_len,
            "action_dim": cfg.action_dim, "proprio_dim": cfg.proprio_dim, "num_steps": num_steps or cfg.num_steps,
            "instruction_encoding": "hash_words" if buckets else "token_ids", "vocab_buckets": buckets,
            "max_words": MAX_WORDS}


def export_onnx(policy, path: str | Path, image_size: int = 64, num_steps: int | None = None,
                opset: int = 18) -> Path:
    """Write the deployed policy to `path` (dynamic batch), check it with onnx.checker, return the path."""
    import onnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = DeployedPolicy(policy, num_steps).cpu().eval()
    ex = model.example_inputs(image_size=image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    words = torch.export.Dim("words", min=1, max=MAX_WORDS)
    shapes = {"image": {0: batch}, "instruction": {0: batch, 1: words}, "proprio": {0: batch}, "noise": {0: batch}}
    with torch.no_grad():
        prog = torch.onnx.export(model, ex, dynamo=True, input_names=list(INPUTS), output_names=["actions"],
                                 dynamic_shapes=shapes, opset_version=opset)
    assert prog is not None  # dynamo=True always returns the program
    prog.model.metadata_props[META_KEY] = json.dumps(policy_meta(policy, image_size, num_steps))
    prog.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def onnx_session(path: str | Path, providers: list[str] | None = None):
    """An onnxruntime session for an exported policy (CPU unless providers say otherwise)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def run_onnx(session, image, instruction, proprio, noise):
    """numpy/torch inputs in INPUTS order -> actions (B, T, A) numpy."""
    import numpy as np
    feed = {k: (v.cpu().numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in
            zip(INPUTS, (image, instruction, proprio, noise))}
    return session.run(None, feed)[0]
