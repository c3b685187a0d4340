"""The policy's settings (models/policy.py), importable without torch so the CLI checks them fast."""
from __future__ import annotations

from dataclasses import dataclass

FLOW_TAU = (1.0, 1.5)  # default Beta(alpha, beta) of the flow-MSE tau (Eq. 4); see VLAPolicy.flow_loss


@dataclass
class PolicyConfig:
    action_dim: int = 7           # LIBERO: 6-D end-effector delta + gripper
    chunk_len: int = 8
    proprio_dim: int = 8
    encoder: str = "small"        # "small" | "hf" (HF LLaVA-style VLM directory in hf_path)
    hf_path: str = ""
    hf_layer: int = -1
    lora_rank: int = 0            # > 0: LoRA adapters on the HF text attention during SFT
    z_dim: int = 128              # small encoder only (HF: the model's hidden size)
    enc_channels: int = 32
    enc_version: int = 2          # small encoder: 2 = keypoint/text-query readout in world coords; 1 = original
    enc_keypoints: int = 16       # small encoder v2: image keypoints (spatial-softmax heat maps)
    enc_text_queries: int = 4     # small encoder v2: instruction-conditioned attention read-outs
    enc_dropout: float = 0.0      # small encoder v2: dropout before z's output projection
    enc_kp_temp: float = 64.0     # small encoder v2: initial spatial-softmax temperature (learned)
    d_model: int = 128
    depth: int = 3
    heads: int = 4
    sigma_d_model: int = 64
    sigma_depth: int = 2
    # the Sigma Net as built: vla-rft rft sets these (its sigma_min / sigma_max / sigma_init) and checkpoints carry them
    sigma_min: float = 0.01       # normalised action units
    sigma_max: float = 0.5
    sigma_init: float = 0.02
    num_steps: int = 10           # K (Eq. 5): delta = 1/K
    backend: str = "auto"         # SDE kernels: "triton" | "torch" | "auto"

    def validate(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"policy sigma bounds: need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")
        if not self.sigma_min < self.sigma_init < self.sigma_max:
            raise ValueError(f"policy sigma_init={self.sigma_init} must lie inside (sigma_min, sigma_max) = "
                             f"({self.sigma_min}, {self.sigma_max})")
        if self.enc_version not in (1, 2):
            raise ValueError(f"policy enc_version must be 1 or 2, got {self.enc_version}")
        if self.encoder not in ("small", "hf"):
            raise ValueError(f"policy encoder must be 'small' or 'hf', got {self.encoder!r}")
        if self.encoder == "hf" and not self.hf_path:
            raise ValueError("policy.encoder=hf needs policy.hf_path (a save_pretrained directory)")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"policy backend must be triton/torch/auto, got {self.backend!r}")
        for k in ("action_dim", "chunk_len", "proprio_dim", "num_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"policy {k} must be >= 1, got {getattr(self, k)}")
