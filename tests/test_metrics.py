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


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from vla_rft_engine.metrics import spearman
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 9), generator=g).float()  # ties included
    y = torch.randn(6, 9, generator=g)
    ours = spearman(x, y)
    for i in range(6):
        assert float(ours[i]) == pytest.approx(stats.spearmanr(x[i].numpy(), y[i].numpy()).statistic, abs=1e-9)
    assert torch.isnan(spearman(torch.ones(1, 4), torch.arange(4.0)[None]))[0]  # constant rewards: undefined


def test_moving_mask_and_masked_l1_by_hand():
    from vla_rft_engine.metrics import masked_l1, moving_mask
    start = torch.zeros(1, 3, 4, 4)
    real = torch.zeros(1, 2, 3, 4, 4)
    real[0, 0, 1, 2, 3] = 0.5  # one pixel moved in frame 0, in one channel
    real[0, 1, :, 0, 0] = 0.05  # below the threshold
    m = moving_mask(real, start)
    assert m.shape == (1, 2, 1, 4, 4) and m.sum() == 1 and m[0, 0, 0, 2, 3]
    pred = real.clone()
    pred[0, 0, :, 2, 3] += torch.tensor([0.3, 0.0, 0.3])
    assert float(masked_l1(pred, real, m)) == pytest.approx(0.2)  # (0.3 + 0 + 0.3) / 3 channels
