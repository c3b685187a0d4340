"""Image metrics on float frames in [0, 1], shaped (..., 3, H, W): MSE, PSNR, SSIM, and LPIPS (the engine's,
rl.lpips) when its weights are on disk. Each returns one value per frame (leading dims kept)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 3:
        raise ValueError(f"frames must be (..., C, H, W), got {tuple(a.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_pair(a, b)
    return (a.float() - b.float()).pow(2).flatten(-3).mean(-1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    m = mse(a, b).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / m)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Wang et al. 2004 SSIM: Gaussian window (11, 1.5), K1 0.01, K2 0.03, per channel, mean over the valid
    region (no padding) and channels."""
    _check_pair(a, b)
    lead, (C, H, W) = a.shape[:-3], a.shape[-3:]
    if H < win or W < win:
        raise ValueError(f"SSIM needs frames of at least {win}x{win}, got {H}x{W}")
    x = a.reshape(-1, C, H, W).double()
    y = b.reshape(-1, C, H, W).double()
    g = _gaussian_window(win, sigma, a.device)
    kh = g.view(1, 1, win, 1).expand(C, 1, win, 1)
    kw = g.view(1, 1, 1, win).expand(C, 1, 1, win)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh, groups=C), kw, groups=C)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float().reshape(lead)


def load_lpips(net: str = "alex", required: bool = False, device="cpu"):
    """The engine's LPIPS (rl.lpips) with pretrained weights if they are on disk (nothing is downloaded), else None.

    required=True turns 'missing' into the FileNotFoundError that names the files and where to put them."""
    from .rl.lpips import get_lpips
    try:
        return get_lpips(net, device)
    except FileNotFoundError:
        if required:
            raise
        return None


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last dim (ties share their mean rank), as scipy.stats.rankdata."""
    x = x.double()
    lt = (x[..., None, :] < x[..., :, None]).sum(-1).double()
    eq = (x[..., None, :] == x[..., :, None]).sum(-1).double()
    return lt + (eq + 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim, one value per leading index; NaN where x or y is constant."""
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.pow(2).sum(-1) * ry.pow(2).sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def moving_mask(real: torch.Tensor, start: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Pixels where real frames (..., T, 3, H, W) differ from their start frame (..., 3, H, W) by more than
    `threshold` in some channel: what moved (the gripper, pushed objects). -> (..., T, 1, H, W) bool."""
    return (real.float() - start.float()[..., None, :, :, :]).abs().amax(-3, keepdim=True) > threshold


def masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |a - b| over the masked pixels (all channels) of all frames; NaN when the mask is empty."""
    _check_pair(a, b)
    m = mask.expand_as(a).float()
    return ((a.float() - b.float()).abs() * m).sum() / m.sum()
