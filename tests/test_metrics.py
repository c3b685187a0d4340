"""MSE / PSNR / SSIM against independent implementations (scikit-image) and closed forms."""
import math

import pytest
import torch

from vla_rft_engine import metrics


def test_mse_psnr_closed_form():
    a = torch.zeros(2, 3, 16, 16)
    b = torch.full((2, 3, 16, 16), 0.1)
    assert torch.allclose(metrics.mse(a, b), torch.full((2,), 0.01))
    assert torch.allclose(metrics.psnr(a, b), torch.full((2,), 20.0))
    with pytest.raises(ValueError, match="shape"):
        metrics.mse(a, b[:1])


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is the independent SSIM reference")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 40, generator=g)
    b = (a + 0.1 * torch.randn(3, 3, 32, 40, generator=g)).clamp(0, 1)
    ours = metrics.ssim(a, b)
    for i in range(3):
        ref = skm.structural_similarity(a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy(),
                                        channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
        assert math.isclose(ours[i].item(), ref, abs_tol=1e-5)
    assert torch.allclose(metrics.ssim(a, a), torch.ones(3))


def test_lpips_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert metrics.load_lpips("alex") is None
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        metrics.load_lpips("alex", required=True)
    with pytest.raises(ValueError, match="alex"):
        metrics.load_lpips("resnet")
