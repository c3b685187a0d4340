"""Our LPIPS against the `lpips` package (pnet_rand backbone + its shipped v0.1 linear heads), the
torchvision-format loader, missing-weight errors and input-range errors."""
import warnings

import pytest
import torch

from conftest import cuda_only
from vla_rft_engine.rl import lpips as L

lpips_pkg = pytest.importorskip("lpips", reason="the `lpips` package is the reference implementation")


def _reference(net: str):
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation inside lpips
        return lpips_pkg.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def alex_ref():
    return _reference("alex")


@pytest.fixture(scope="module")
def vgg_ref():  # building VGG16 costs seconds: one per module
    return _reference("vgg")


def _pairs(n, hw=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, hw, hw, generator=g) * 2 - 1, torch.rand(n, 3, hw, hw, generator=g) * 2 - 1


def test_alex_matches_lpips_package(alex_ref):
    ours = L.LPIPS("alex").load_weights(alex_ref.state_dict())
    x, y = _pairs(6)
    y[0] = x[0]  # identical pair -> 0
    with torch.no_grad():
        want = alex_ref(x, y).flatten()
        got = ours(x, y)
        # [0, 1] inputs: our zero_one flag vs the package's normalize flag
        got01 = ours((x + 1) / 2, (y + 1) / 2, zero_one=True)
        want01 = alex_ref((x + 1) / 2, (y + 1) / 2, normalize=True).flatten()
    assert got.shape == (6,)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got01, want01, atol=1e-5, rtol=0)
    assert got[0].abs() < 1e-6 and (got[1:] > 0).all()


def test_alex_broadcast_and_chunking(alex_ref):
    ours = L.LPIPS("alex", chunk=5).load_weights(alex_ref.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 2, 3, 64, 64, generator=g) * 2 - 1   # (S, N, T, ...)
    y = torch.rand(2, 1, 2, 3, 64, 64, generator=g) * 2 - 1   # one reference per start state
    with torch.no_grad():
        got = ours(x, y)
        want = alex_ref(x.reshape(-1, 3, 64, 64), y.expand_as(x).reshape(-1, 3, 64, 64)).reshape(2, 3, 2)
        same = ours(x, y.expand_as(x).contiguous())
    assert got.shape == (2, 3, 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(same, want, atol=1e-5, rtol=0)


def test_vgg_matches_lpips_package(vgg_ref):
    ref = vgg_ref
    ours = L.LPIPS("vgg16").load_weights(ref.state_dict())
    x, y = _pairs(2)
    with torch.no_grad():
        assert torch.allclose(ours(x, y), ref(x, y).flatten(), atol=1e-5, rtol=0)


def _tv_model(net):
    import torchvision
    torch.manual_seed(7)
    return torchvision.models.alexnet(weights=None) if net == "alex" else torchvision.models.vgg16(weights=None)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_torchvision_checkpoint_loads(net, tmp_path, monkeypatch, request):
    tv = _tv_model(net)
    ckpt = tmp_path / "hub" / "checkpoints" / L.BACKBONE_FILES[net]
    ckpt.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), ckpt)  # torchvision's own key format, classifier included
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert L.default_backbone_path(net) == ckpt
    ours = L.LPIPS.from_pretrained(net)  # heads: the copy inside the installed lpips package
    # the package's LPIPS built on the same backbone
    ref = request.getfixturevalue(f"{net}_ref")
    with torch.no_grad():
        for name, p in ref.net.named_parameters():  # sliceK.<torchvision index>.weight
            p.copy_(tv.features[int(name.split(".")[1])].state_dict()[name.split(".")[2]])
    x, y = _pairs(2, seed=5)
    with torch.no_grad():
        assert torch.allclose(ours(x, y), ref(x, y).flatten(), atol=1e-5, rtol=0)
    del tv


def test_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*a, **k):
        raise AssertionError("LPIPS must never download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as e:
        L.LPIPS.from_pretrained("alex")
    assert "hub/checkpoints" in str(e.value) and "TORCH_HOME" in str(e.value)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        L.get_lpips("vgg")
    bb = tmp_path / "bb.pth"
    torch.save(_tv_model("alex").features.state_dict(), bb)
    with pytest.raises(FileNotFoundError, match="alex.pth"):
        L.LPIPS.from_pretrained("alex", backbone_path=bb, heads_path=tmp_path / "nope" / "alex.pth")
    with pytest.raises(ValueError, match="alex"):
        L.LPIPS("resnet")


def test_wrong_checkpoint_rejected(tmp_path):
    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="torchvision alex"):
        L.LPIPS("alex").load_backbone(bad)
    with pytest.raises(ValueError, match="linear heads"):
        L.LPIPS("alex").load_heads(bad)


def test_input_range_errors(alex_ref):
    ours = L.LPIPS("alex").load_weights(alex_ref.state_dict())
    x, y = _pairs(2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ours(x * 255, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours(x, y, zero_one=True)  # negative values are not [0, 1] frames
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="outside"):
        ours(xn, y)
    with pytest.raises(ValueError, match="shape"):
        ours(x, y[..., :32])
    with pytest.raises(ValueError, match="broadcast"):
        ours(x, torch.zeros(3, 3, 64, 64))
    with pytest.raises(ValueError, match="GPU path"):
        ours(x, y, amp=True)


@cuda_only()
def test_gpu_bf16_channels_last_close(alex_ref):
    ours = L.LPIPS("alex").load_weights(alex_ref.state_dict()).cuda().to_channels_last()
    x, y = _pairs(8)
    with torch.no_grad():
        fp32 = ours(x.cuda(), y.cuda(), amp=False).cpu()
        bf16 = ours(x.cuda(), y.cuda()).cpu()  # amp defaults on for CUDA
    assert torch.allclose(fp32, alex_ref(x, y).flatten(), atol=1e-4)
    assert torch.allclose(bf16, fp32, rtol=3e-2, atol=1e-3)
