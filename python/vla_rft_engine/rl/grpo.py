"""GRPO for the SDE policy: group advantage (Eq. 12), rollout ratio (Eq. 9) and the objective (Eq. 13).

    Adv_n = R_n - mean_group(R)                                   (paper; release also divides by std + 1e-6)
    r     = exp(lbar_new - lbar_old)                              (lbar: Eq. 8 rollout log-prob)
    L     = -E[clip(r, 1-eps, 1+eps) Adv] + lambda_mse L_MSE - alpha H(pi)           (paper, default)
    L_ppo = -E[min(r Adv, clip(r, 1-eps, 1+eps) Adv)] + ...                       (release, policy_loss="ppo")

The release gates the flow-MSE weight by the measured KL between old and new policy,
lambda_mse = coef * clamp((kl - kl_low) / (kl_high - kl_low), 0, 1) with kl_low 0, kl_high 0.2, so the
anchor to the dataset actions switches on as the policy drifts (mse_kl_gate=True). The KL estimate of
KL(pi_old || pi_new) from rollouts sampled by pi_old (Schulman 2020), log r = l_new - l_old:
    k3 = E[(r - 1) - log r]   (default: unbiased, >= 0 per sample)
    k1 = E[-log r] = E[l_old - l_new]   (the release's, per action element: mse_kl_estimator="k1")

The release's other loss options (all off by default):
  dual-clip PPO (Ye et al. 2020, clip_ratio_c = c > 1, release 3): for Adv < 0 the per-sample loss
      -min(r Adv, clip(r) Adv) is capped at -c Adv, so one huge ratio cannot dominate the batch.
  ratio_level="element": one ratio per action element (chunk step x action dim): l_e = the element's
      Gaussian log-density reduced over the K steps (logprob_reduce; the release sums), the loss averaged
      over the S*N*T*A elements, the entropy per element = sum over the K steps / (K + 1) (the release's
      normalisation). "rollout" (default): one ratio per rollout from Eq. 8's lbar, and H(pi) per rollout =
      the per-step entropy summed over the T*A elements, averaged over the K steps.
  Table 7's alpha = 0.003 and lambda_mse = 0.01 were tuned under the release's normalisation (per element).
  Per rollout the entropy term is T*A*(K+1)/K times larger (62x for LIBERO's 8 x 7 chunks, K = 10) next to
  a policy-gradient term of about the same size. The presets: `--config paper` (configs/paper.yaml) uses
  the per-rollout normalisation, `--config release` (configs/release.yaml) the per-element one, for which
  Table 7's coefficients were tuned.
"""
from __future__ import annotations


import torch

from .rft_config import KL_ESTIMATORS, POLICY_LOSSES, GRPOConfig



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


def policy_kl(logp_new: torch.Tensor, logp_old: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """KL(pi_old || pi_new) estimate: k3 (approx_kl) or k1 = mean(l_old - l_new) (the release's gate)."""
    if estimator == "k3":
        return approx_kl(logp_new, logp_old)
    if estimator == "k1":
        return (logp_old - logp_new).mean()
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_gated_weight(kl, coef: float = 0.01, kl_low: float = 0.0, kl_high: float = 0.2) -> torch.Tensor:
    """The release's MSE weight: coef * clamp((kl - kl_low) / (kl_high - kl_low), 0, 1)."""
    kl = torch.as_tensor(kl, dtype=torch.float32)
    return coef * ((kl - kl_low) / (kl_high - kl_low)).clamp(0.0, 1.0)


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              entropy: torch.Tensor | None = None, mse: torch.Tensor | None = None,
              cfg: GRPOConfig | None = None, kl: float | torch.Tensor | None = None):
    """Eq. 13. logp_new (differentiable), logp_old: one entry per rollout, shaped like advantages (E = mean);
    with cfg.ratio_level="element", one per action element: advantages' shape + (T, A), Adv broadcast over
    the rollout's elements and E = the mean over all elements. entropy: per rollout / per element (or scalar)
    policy entropy H(pi); mse: the auxiliary flow-matching MSE on dataset actions (Eq. 4). kl: measured KL
    for the MSE gate; None -> cfg.mse_kl_estimator's estimate from this batch.
    Returns (loss, metrics dict of floats)."""
    cfg = cfg or GRPOConfig()
    if cfg.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {cfg.policy_loss!r}")
    per_elem = cfg.ratio_level == "element"
    lead = logp_new.shape[:advantages.dim()] if per_elem else logp_new.shape
    if not (logp_new.shape == logp_old.shape and lead == advantages.shape):
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have one shape (one entry per rollout"
                         f"{'; per element: advantages shape + (T, A)' if per_elem else ''})")
    if logp_new.numel() == 0:
        raise ValueError("grpo_loss got an empty batch")
    for t, n in ((logp_new, "logp_new"), (logp_old, "logp_old"), (advantages, "advantages")):
        _finite(t.detach(), n)
    logp_old, adv = logp_old.detach(), advantages.detach()  # constants of the update
    if adv.dim() < logp_new.dim():  # per element: the rollout's Adv on each of its elements
        adv = adv.reshape(*adv.shape, *[1] * (logp_new.dim() - adv.dim())).expand_as(logp_new)

    eps = cfg.clip_eps
    ratio = rollout_ratio(logp_new, logp_old)
    clipped = ratio.clamp(1 - eps, 1 + eps)
    surr = clipped * adv if cfg.policy_loss == "clip" else torch.minimum(ratio * adv, clipped * adv)
    dual = None
    if cfg.clip_ratio_c:  # dual-clip: loss capped at -c Adv where Adv < 0
        dual = (adv < 0) & (surr < cfg.clip_ratio_c * adv)
        surr = torch.where(adv < 0, torch.maximum(surr, cfg.clip_ratio_c * adv), surr)
    pg = -surr.mean()
    loss = pg

    with torch.no_grad():
        kl_est = approx_kl(logp_new.detach(), logp_old)
        kl_k1 = policy_kl(logp_new.detach(), logp_old, "k1")
    kl_batch = kl_est if cfg.mse_kl_estimator == "k3" else kl_k1
    kl_used = kl_batch if kl is None else torch.as_tensor(kl, dtype=torch.float32)

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
            "approx_kl_k1": float(kl_k1),
            # fraction of samples whose loss the dual clip capped (0 when off)
            "dual_clip_frac": float(dual.float().mean()) if dual is not None else 0.0,
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


def lr_lambdas(cfg: GRPOConfig | None = None):
    """LambdaLR's lr_lambda for optimizer_param_groups' two groups: one warm-up for both, or (warmup_sigma
    false, the release) the action head's warm-up and a constant Sigma Net lr."""
    cfg = cfg or GRPOConfig()
    head = lambda i: warmup_factor(i, cfg)
    return head if cfg.warmup_sigma else [head, lambda i: 1.0]


def optimizer_param_groups(head_params, sigma_params, cfg: GRPOConfig | None = None) -> list[dict]:
    """Two AdamW groups: the action head at lr, the Sigma Net at sigma_lr (Table 7), each with its weight decay."""
    cfg = cfg or GRPOConfig()
    return [{"params": list(head_params), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "action_head"},
            {"params": list(sigma_params), "lr": cfg.sigma_lr, "weight_decay": cfg.sigma_weight_decay, "name": "sigma"}]
