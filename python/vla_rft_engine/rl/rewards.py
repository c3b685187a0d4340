"""Verified rewards (Eq. 11) and the three reward designs of Table 4.

Per frame t:   d_t = lambda_1 * L1(o_hat_t, o_t) + lambda_lp * LPIPS(o_hat_t, o_t)   (MSE instead of L1: option)
Reward:        R   = - aggregate_t(d_t)
  sum       Eq. 11 (default)
  mean      d averaged over frames (the release's LIBERO script uses this)
  last      the last frame only
  discount  weights gamma^(T-1-t) normalised to sum 1 (gamma 0.95 as in the release's LIBERO script)

Designs (Table 4):
  r1  action deviation: -aggregate_t(mean_a |a_policy - a_dataset|); no world model
  r2  image consistency: WM frames from policy actions vs the dataset's frames
  r3  model-based image consistency (default, best in Table 4): WM frames from policy actions vs WM frames
      from the dataset actions, same WM and start state -- both sides carry the same generation bias.

Frames are float (..., T, 3, H, W) in [0, 1]; the reference may broadcast over leading dims (one reference
rollout shared by the N policy rollouts of a start state: policy (S, N, T, ...) vs reference (S, 1, T, ...)).
Rewards are measurements, not differentiated: computed under no_grad.
"""
from __future__ import annotations

import warnings

import torch

from .lpips import LPIPS, get_lpips
from .rft_config import AGGREGATIONS, PIXEL_LOSSES, RewardConfig



def frame_weights(T: int, aggregation: str = "sum", gamma: float = 0.95, device=None) -> torch.Tensor:
    """(T,) weights w with aggregate(d) = sum_t w_t d_t."""
    if T < 1:
        raise ValueError(f"need at least one frame, got T={T}")
    if aggregation == "sum":
        return torch.ones(T, device=device)
    if aggregation == "mean":
        return torch.full((T,), 1.0 / T, device=device)
    if aggregation == "last":
        w = torch.zeros(T, device=device)
        w[-1] = 1.0
        return w
    if aggregation == "discount":
        w = gamma ** torch.arange(T - 1, -1, -1, device=device, dtype=torch.float64)
        return (w / w.sum()).float()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def aggregate(per_frame: torch.Tensor, aggregation: str = "sum", gamma: float = 0.95) -> torch.Tensor:
    """(..., T) -> (...,)"""
    return per_frame @ frame_weights(per_frame.shape[-1], aggregation, gamma, per_frame.device)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf values")


def _check_frames(pred: torch.Tensor, ref: torch.Tensor, pred_name: str, ref_name: str) -> None:
    for t, n in ((pred, pred_name), (ref, ref_name)):
        if not t.is_floating_point() or t.dim() < 5 or t.shape[-3] != 3:
            raise ValueError(f"{n} must be float frames (..., T, 3, H, W), got {t.dtype} {tuple(t.shape)}")
        _check_finite(t, n)
        mn, mx = torch.aminmax(t.detach())
        if float(mn) < -1e-4 or float(mx) > 1 + 1e-4:
            raise ValueError(f"{n} must lie in [0, 1] (got min {float(mn):.4g}, max {float(mx):.4g}); "
                             "convert uint8 frames with x.float() / 255")
    if pred.shape[-4:] != ref.shape[-4:]:
        raise ValueError(f"{pred_name} {tuple(pred.shape)} and {ref_name} {tuple(ref.shape)} differ in (T, 3, H, W)")
    try:
        lead = torch.broadcast_shapes(pred.shape[:-4], ref.shape[:-4])
    except RuntimeError:
        lead = None
    if lead != pred.shape[:-4]:
        raise ValueError(f"{ref_name} {tuple(ref.shape)} must broadcast to {pred_name} {tuple(pred.shape)}")


def pixel_distance(pred: torch.Tensor, ref: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (mse) error per frame: (..., T, 3, H, W) -> (..., T)."""
    diff = pred.float() - ref.float()
    if kind == "l1":
        return diff.abs().flatten(-3).mean(-1)
    if kind == "mse":
        return diff.pow(2).flatten(-3).mean(-1)
    raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {kind!r}")


def action_deviation(policy_actions: torch.Tensor, dataset_actions: torch.Tensor) -> torch.Tensor:
    """R1's per-step distance: mean over action dims of |a - a_ref|, (..., T, A) -> (..., T)."""
    for t, n in ((policy_actions, "policy_actions"), (dataset_actions, "dataset_actions")):
        if t.dim() < 2:
            raise ValueError(f"{n} must be (..., T, A), got {tuple(t.shape)}")
        _check_finite(t, n)
    if policy_actions.shape[-2:] != dataset_actions.shape[-2:]:
        raise ValueError(f"policy_actions {tuple(policy_actions.shape)} and dataset_actions "
                         f"{tuple(dataset_actions.shape)} differ in (T, A)")
    return (policy_actions.float() - dataset_actions.float()).abs().mean(-1)


_FALLBACK_WARNED: list = []


def _resolve_lpips(cfg: RewardConfig, device: torch.device) -> LPIPS | None:
    try:
        return get_lpips(cfg.lpips_net, device, cfg.lpips_backbone_path, cfg.lpips_heads_path)
    except FileNotFoundError as e:
        if cfg.allow_l1_only_fallback:
            if not _FALLBACK_WARNED:  # once per process, short; `vla-rft info` lists the files and where they go
                _FALLBACK_WARNED.append(True)
                warnings.warn("LPIPS weights are not on disk (`vla-rft info` says which files and where), so the "
                              "verified reward is L1 only (allow_l1_only_fallback)", stacklevel=3)
            return None
        raise FileNotFoundError(f"{e}. The verified reward needs LPIPS (lambda_lp={cfg.lambda_lp}); set "
                                "allow_l1_only_fallback=True to reward with the pixel term only, or "
                                "lambda_lp=0.") from None


def frame_distance(pred: torch.Tensor, ref: torch.Tensor, cfg: RewardConfig | None = None,
                   lpips_model: LPIPS | None = None, return_terms: bool = False):
    """Eq. 11's per-frame term d_t: (..., T, 3, H, W) x broadcastable ref -> (..., T)."""
    cfg = cfg or RewardConfig()
    pix = pixel_distance(pred, ref, cfg.pixel_loss)
    d = cfg.lambda_1 * pix
    lp = None
    if cfg.lambda_lp > 0:
        model = lpips_model if lpips_model is not None else _resolve_lpips(cfg, pred.device)
        if model is not None:
            # frames were range-checked in [0, 1] by the caller
            lp = model(pred, ref, zero_one=True, check_range=False)
            d = d + cfg.lambda_lp * lp
    return (d, {"pixel": pix, "lpips": lp}) if return_terms else d


@torch.no_grad()
def verified_reward(cfg: RewardConfig | None = None, *, policy_frames: torch.Tensor | None = None,
                    dataset_frames: torch.Tensor | None = None, wm_reference_frames: torch.Tensor | None = None,
                    policy_actions: torch.Tensor | None = None, dataset_actions: torch.Tensor | None = None,
                    lpips_model: LPIPS | None = None, return_terms: bool = False):
    """R per rollout, shape = policy input's leading dims (e.g. (S, N) for GRPO groups).

    r1: policy_actions (..., T, A), dataset_actions broadcastable.
    r2: policy_frames (WM from policy actions) vs dataset_frames (the dataset's real frames).
    r3: policy_frames vs wm_reference_frames (WM rollout of the dataset actions from the same start).
    return_terms=True also returns the per-frame terms {"distance", "pixel", "lpips"} (each (..., T)).
    """
    cfg = cfg or RewardConfig()
    cfg.validate()
    terms: dict = {}
    if cfg.design == "r1":
        if policy_actions is None or dataset_actions is None:
            raise ValueError("design r1 (action deviation) needs policy_actions and dataset_actions")
        d = action_deviation(policy_actions, dataset_actions)
        terms["action_l1"] = d
    else:
        ref_name = "dataset_frames" if cfg.design == "r2" else "wm_reference_frames"
        ref, other = (dataset_frames, wm_reference_frames) if cfg.design == "r2" else (wm_reference_frames,
                                                                                        dataset_frames)
        if policy_frames is None or ref is None:
            raise ValueError(f"design {cfg.design} needs policy_frames and {ref_name}")
        if other is not None:
            raise ValueError(f"design {cfg.design} compares against {ref_name}; got the other design's frames "
                             "too (r2 = dataset frames, r3 = WM rollout of the dataset actions)")
        _check_frames(policy_frames, ref, "policy_frames", ref_name)
        d, terms = frame_distance(policy_frames, ref, cfg, lpips_model, return_terms=True)
    terms["distance"] = d
    R = -aggregate(d, cfg.aggregation, cfg.gamma)
    _check_finite(R, "verified reward")
    return (R, terms) if return_terms else R
