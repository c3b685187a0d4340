"""GRPO for the SDE policy: group advantage (Eq. 12), rollout ratio (Eq. 9) and the objective (Eq. 13).

    Adv_n = R_n - mean_group(R)                                   (paper; release also divides by std + 1e-6)
    r     = exp(lbar_new - lbar_old)                              (lbar: Eq. 8 rollout log-prob)
    L     = -E[clip(r, 1-eps, 1+eps) Adv] + lambda_mse L_MSE - alpha H(pi)           (paper, default)
    L_ppo = -E[min(r Adv, clip(r, 1-eps, 1+eps) Adv)] + ...                       (release, policy_loss="ppo")

The release gates the flow-MSE weight by the measured KL between old and new policy,
lambda_mse = coef * clamp((kl - kl_low) / (kl_high - kl_low), 0, 1) with kl_low 0, kl_high 0.2, so the
anchor to the dataset actions switches on as the policy drifts (mse_kl_gate=True). The KL is the k3
estimator (Schulman 2020) of KL(pi_old || pi_new) from rollouts sampled by pi_old:
    k3 = E[(r - 1) - log r],  log r = lbar_new - lbar_old   (unbiased, always >= 0 per sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICY_LOSSES = ("clip", "ppo")


@dataclass
class GRPOConfig:
    lr: float = 1e-6                 # Table 7, action head
    sigma_lr: float = 1e-5           # Table 7, Sigma Net
    mse_coef: float = 0.01           # Table 7, lambda_mse
    entropy_coef: float = 0.003      # Table 7, alpha
    steps: int = 400                 # Table 7
    task_instances: int = 16         # Table 7 batch size (start states S per step)
    rollouts: int = 16               # Table 7 rollout times (group size N)
    clip_eps: float = 0.2            # release (paper: symbol only)
    policy_loss: str = "clip"        # "clip": Eq. 13 as written; "ppo": the release's min form
    normalize_adv_std: bool = False  # False: Eq. 12; True: the release's std-normalised GRPO
    adv_eps: float = 1e-6            # release
    mse_kl_gate: bool = False        # True: the release's KL-gated MSE weight
    mse_kl_low: float = 0.0          # release
    mse_kl_high: float = 0.2         # release
    ppo_epochs: int = 1              # release (verl default)
    minibatches: int = 1             # release: ppo_mini_batch_size 16 == train batch 16
    warmup_steps: int = 10           # release: lr_warmup_steps=10 (linear, then constant)
    grad_clip: float = 1.0           # release (verl default)
    logprob_reduce: str = "mean"     # Eq. 8 (the release sums over steps)

    def validate(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"GRPOConfig.policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if self.logprob_reduce not in ("mean", "sum"):
            raise ValueError(f"GRPOConfig.logprob_reduce must be 'mean' or 'sum', got {self.logprob_reduce!r}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"GRPOConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.rollouts < 2:
            raise ValueError(f"GRPO needs N >= 2 rollouts per group, got rollouts={self.rollouts}")
        if self.mse_kl_high <= self.mse_kl_low:
            raise ValueError(f"mse_kl_high ({self.mse_kl_high}) must exceed mse_kl_low ({self.mse_kl_low})")
        for name in ("ppo_epochs", "minibatches", "steps", "task_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")


def _finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf values")


def group_advantage(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 12 over the last dim: rewards (S, N) -> Adv (S, N). normalize_std divides by the group's
    (Bessel-corrected) std + eps, as the release does."""
    if rewards.dim() < 1:
        raise ValueError("rewards must be (S, N): S groups (start states) of N rollouts")
    if rewards.shape[-1] < 2:
        raise ValueError(f"GRPO needs N >= 2 rollouts per group to form a baseline, got N={rewards.shape[-1]} "
                         f"(rewards shape {tuple(rewards.shape)}, expected (S, N))")
    _finite(rewards, "rewards")
    r = rewards.float()
    adv = r - r.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv


def rollout_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """Eq. 9: r = exp(lbar_new - lbar_old)."""
    return torch.exp(logp_new - logp_old)


def approx_kl(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi_new) from pi_old's samples: mean of (r - 1) - log r."""
    log_r = logp_new - logp_old
    return (torch.exp(log_r) - 1 - log_r).mean()


def kl_gated_weight(kl, coef: float = 0.01, kl_low: float = 0.0, kl_high: float = 0.2) -> torch.Tensor:
    """The release's MSE weight: coef * clamp((kl - kl_low) / (kl_high - kl_low), 0, 1)."""
    kl = torch.as_tensor(kl, dtype=torch.float32)
    return coef * ((kl - kl_low) / (kl_high - kl_low)).clamp(0.0, 1.0)


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              entropy: torch.Tensor | None = None, mse: torch.Tensor | None = None,
              cfg: GRPOConfig | None = None, kl: float | torch.Tensor | None = None):
    """Eq. 13. logp_new (differentiable), logp_old, advantages: same shape (one entry per rollout; E = mean).
    entropy: per-rollout (or scalar) policy entropy H(pi); mse: the auxiliary flow-matching MSE on dataset
    actions (Eq. 4). kl: measured KL for the MSE gate; None -> the k3 estimate from this batch.
    Returns (loss, metrics dict of floats)."""
    cfg = cfg or GRPOConfig()
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {cfg.policy_loss!r}")
    if not (logp_new.shape == logp_old.shape == advantages.shape):
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have one shape (one entry per rollout)")
    if logp_new.numel() == 0:
        raise ValueError("grpo_loss got an empty batch")
    for t, n in ((logp_new, "logp_new"), (logp_old, "logp_old"), (advantages, "advantages")):
        _finite(t.detach(), n)
    logp_old, adv = logp_old.detach(), advantages.detach()  # constants of the update

    eps = cfg.clip_eps
    ratio = rollout_ratio(logp_new, logp_old)
    clipped = ratio.clamp(1 - eps, 1 + eps)
    if cfg.policy_loss == "clip":
        pg = -(clipped * adv).mean()
    else:
        pg = -torch.minimum(ratio * adv, clipped * adv).mean()
    loss = pg

    with torch.no_grad():
        kl_est = approx_kl(logp_new.detach(), logp_old)
    kl_used = kl_est if kl is None else torch.as_tensor(kl, dtype=torch.float32)

    mse_val, mse_w = torch.zeros(()), torch.zeros(())
    if mse is not None:
        _finite(mse.detach(), "mse")
        mse_val = mse.mean()
        mse_w = (kl_gated_weight(kl_used, cfg.mse_coef, cfg.mse_kl_low, cfg.mse_kl_high) if cfg.mse_kl_gate
                 else torch.tensor(float(cfg.mse_coef)))
        loss = loss + mse_w.to(mse_val) * mse_val

    ent_val = torch.zeros(())
    if entropy is not None:
        _finite(entropy.detach(), "entropy")
        ent_val = entropy.mean()
        loss = loss - cfg.entropy_coef * ent_val

    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg.detach()),
            "ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
            # fraction of rollouts whose ratio left [1-eps, 1+eps] (their policy gradient is cut)
            "clip_frac": float(((r < 1 - eps) | (r > 1 + eps)).float().mean()),
            "approx_kl_k3": float(kl_est),
            "entropy": float(ent_val.detach()),
            "adv_mean": float(adv.float().mean()),
            "adv_std": float(adv.float().std()) if adv.numel() > 1 else 0.0,
            "mse": float(mse_val.detach()),
            "mse_weight": float(mse_w),
        }
    return loss, metrics


def warmup_factor(step: int, cfg: GRPOConfig | None = None) -> float:
    """LR multiplier: linear warmup over cfg.warmup_steps, then constant (for LambdaLR)."""
    cfg = cfg or GRPOConfig()
    return 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)


def optimizer_param_groups(head_params, sigma_params, cfg: GRPOConfig | None = None) -> list[dict]:
    """Two AdamW groups: the action head at lr, the Sigma Net at sigma_lr (Table 7)."""
    cfg = cfg or GRPOConfig()
    return [{"params": list(head_params), "lr": cfg.lr, "name": "action_head"},
            {"params": list(sigma_params), "lr": cfg.sigma_lr, "name": "sigma"}]
