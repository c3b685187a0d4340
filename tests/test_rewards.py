"""Verified rewards (Eq. 11): each design and aggregation against hand-computed references on tiny tensors.
LPIPS: our implementation carrying the `lpips` package's pnet_rand backbone + shipped heads; the hand
reference calls the package itself frame by frame."""
import math
import warnings

import pytest
import torch

from vla_rft_engine.config import load_config
from vla_rft_engine.rl import rewards as RW
from vla_rft_engine.rl.lpips import LPIPS

lpips_pkg = pytest.importorskip("lpips", reason="the `lpips` package is the reference implementation")

S, N, T, HW = 2, 3, 3, 32


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    return LPIPS("alex").load_weights(ref.state_dict()), ref


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(S, 1, T, 3, HW, HW, generator=g)
    pol = (ref + 0.2 * torch.randn(S, N, T, 3, HW, HW, generator=g)).clamp(0, 1)
    data = torch.rand(S, 1, T, 3, HW, HW, generator=g)
    return pol, ref, data


def _hand_distance(pol, ref, pkg, lam1=1.0, lamlp=1.0, kind="l1"):
    """d[s, n, t] one frame at a time."""
    d = torch.zeros(S, N, T, dtype=torch.float64)
    for s in range(S):
        for n in range(N):
            for t in range(T):
                a, b = pol[s, n, t], ref[s, 0, t]
                pix = (a - b).abs().mean() if kind == "l1" else ((a - b) ** 2).mean()
                with torch.no_grad():
                    lp = pkg(a[None] * 2 - 1, b[None] * 2 - 1).item()
                d[s, n, t] = lam1 * pix.item() + lamlp * lp
    return d


def _hand_aggregate(d, mode, gamma=0.95):
    out = torch.zeros(S, N, dtype=torch.float64)
    for s in range(S):
        for n in range(N):
            row = [d[s, n, t].item() for t in range(T)]
            if mode == "sum":
                v = sum(row)
            elif mode == "mean":
                v = sum(row) / T
            elif mode == "last":
                v = row[-1]
            else:
                w = [gamma ** (T - 1 - t) for t in range(T)]  # 0.9025, 0.95, 1
                v = sum(wi * ri for wi, ri in zip(w, row)) / sum(w)
            out[s, n] = -v
    return out


def test_config_defaults_and_overrides():
    cfg = RW.RewardConfig()
    assert (cfg.design, cfg.lambda_1, cfg.lambda_lp, cfg.pixel_loss, cfg.lpips_net, cfg.aggregation, cfg.gamma,
            cfg.allow_l1_only_fallback) == ("r3", 1.0, 1.0, "l1", "alex", "sum", 0.95, False)
    cfg = load_config(RW.RewardConfig, overrides=["design=r2", "aggregation=discount", "lpips_heads_path=/w/a.pth"])
    assert cfg.design == "r2" and cfg.lpips_heads_path == "/w/a.pth"
    with pytest.raises(ValueError, match="aggregation"):
        load_config(RW.RewardConfig, overrides=["aggregation=max"])


def test_frame_weights_by_hand():
    assert torch.equal(RW.frame_weights(3, "sum"), torch.ones(3))
    assert torch.allclose(RW.frame_weights(4, "mean"), torch.full((4,), 0.25))
    assert torch.equal(RW.frame_weights(3, "last"), torch.tensor([0.0, 0.0, 1.0]))
    z = 0.81 + 0.9 + 1.0
    assert torch.allclose(RW.frame_weights(3, "discount", 0.9), torch.tensor([0.81 / z, 0.9 / z, 1.0 / z]))


@pytest.fixture(scope="module")
def hand_d(models, frames):
    return _hand_distance(frames[0], frames[1], models[1])


@pytest.mark.parametrize("mode", ["sum", "mean", "last", "discount"])
def test_r3_each_aggregation(models, frames, hand_d, mode):
    ours, pkg = models
    pol, ref, _ = frames
    cfg = RW.RewardConfig(design="r3", aggregation=mode)
    R, terms = RW.verified_reward(cfg, policy_frames=pol, wm_reference_frames=ref, lpips_model=ours,
                                  return_terms=True)
    d = hand_d
    assert R.shape == (S, N) and terms["distance"].shape == (S, N, T)
    assert torch.allclose(terms["distance"].double(), d, atol=2e-5)
    assert torch.allclose(R.double(), _hand_aggregate(d, mode), atol=5e-5)


def test_r2_dataset_frames_weights_and_mse(models, frames):
    ours, pkg = models
    pol, _, data = frames
    cfg = RW.RewardConfig(design="r2", lambda_1=0.5, lambda_lp=2.0, pixel_loss="mse")
    R = RW.verified_reward(cfg, policy_frames=pol, dataset_frames=data, lpips_model=ours)
    want = _hand_aggregate(_hand_distance(pol, data, pkg, 0.5, 2.0, "mse"), "sum")
    assert torch.allclose(R.double(), want, atol=5e-5)
    # identical frames: zero distance, the best reward
    R0 = RW.verified_reward(cfg, policy_frames=data.expand(S, N, T, 3, HW, HW), dataset_frames=data,
                            lpips_model=ours)
    assert R0.abs().max() < 1e-5 and (R < R0).all()


def test_r2_r3_need_their_own_reference(models, frames):
    ours, _ = models
    pol, ref, data = frames
    with pytest.raises(ValueError, match="wm_reference_frames"):
        RW.verified_reward(RW.RewardConfig(design="r3"), policy_frames=pol, dataset_frames=data, lpips_model=ours)
    with pytest.raises(ValueError, match="other design"):
        RW.verified_reward(RW.RewardConfig(design="r2"), policy_frames=pol, dataset_frames=data,
                           wm_reference_frames=ref, lpips_model=ours)


def test_r1_action_deviation_by_hand():
    g = torch.Generator().manual_seed(1)
    pa = torch.randn(S, N, 4, 7, generator=g)
    da = torch.randn(S, 1, 4, 7, generator=g)
    for mode in ("sum", "mean", "last", "discount"):
        R = RW.verified_reward(RW.RewardConfig(design="r1", aggregation=mode), policy_actions=pa,
                               dataset_actions=da)
        for s in range(S):
            for n in range(N):
                per = [sum(abs(pa[s, n, t, a].item() - da[s, 0, t, a].item()) for a in range(7)) / 7
                       for t in range(4)]
                w = {"sum": [1] * 4, "mean": [0.25] * 4, "last": [0, 0, 0, 1],
                     "discount": [0.95 ** (3 - t) / sum(0.95 ** k for k in range(4)) for t in range(4)]}[mode]
                assert math.isclose(R[s, n].item(), -sum(wi * p for wi, p in zip(w, per)), abs_tol=1e-5)
    with pytest.raises(ValueError, match="dataset_actions"):
        RW.verified_reward(RW.RewardConfig(design="r1"), policy_actions=pa)


def test_bad_inputs(models, frames):
    ours, _ = models
    pol, ref, _ = frames
    cfg = RW.RewardConfig()
    bad = pol.clone()
    bad[0, 0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RW.verified_reward(cfg, policy_frames=bad, wm_reference_frames=ref, lpips_model=ours)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RW.verified_reward(cfg, policy_frames=pol * 255, wm_reference_frames=ref, lpips_model=ours)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RW.verified_reward(cfg, policy_frames=pol * 2 - 1, wm_reference_frames=ref, lpips_model=ours)
    with pytest.raises(ValueError, match="differ"):
        RW.verified_reward(cfg, policy_frames=pol, wm_reference_frames=ref[:, :, :2], lpips_model=ours)
    with pytest.raises(ValueError, match="broadcast"):
        RW.verified_reward(cfg, policy_frames=pol, wm_reference_frames=ref[:1].expand(1, 2, T, 3, HW, HW),
                           lpips_model=ours)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, 3, H, W\)"):
        RW.verified_reward(cfg, policy_frames=pol[..., :1, :, :], wm_reference_frames=ref[..., :1, :, :],
                           lpips_model=ours)
    pa = torch.zeros(S, N, 4, 7)
    pa[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RW.verified_reward(RW.RewardConfig(design="r1"), policy_actions=pa, dataset_actions=torch.zeros(S, 1, 4, 7))
    with pytest.raises(ValueError, match="design"):
        RW.verified_reward(RW.RewardConfig(design="r4"), policy_frames=pol, wm_reference_frames=ref)


def test_missing_lpips_weights_error_and_fallback(frames, tmp_path, monkeypatch):
    pol, ref, _ = frames
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as e:
        RW.verified_reward(RW.RewardConfig(), policy_frames=pol, wm_reference_frames=ref)
    assert "allow_l1_only_fallback" in str(e.value)
    RW._FALLBACK_WARNED.clear()
    with pytest.warns(UserWarning, match="verified reward is L1 only"):
        R = RW.verified_reward(RW.RewardConfig(allow_l1_only_fallback=True), policy_frames=pol,
                               wm_reference_frames=ref)
    l1 = (pol - ref).abs().flatten(-3).mean(-1).sum(-1)
    assert torch.allclose(R, -l1, atol=1e-6)
    # lambda_lp = 0 needs no LPIPS weights at all
    R0 = RW.verified_reward(RW.RewardConfig(lambda_lp=0.0), policy_frames=pol, wm_reference_frames=ref)
    assert torch.allclose(R0, -l1, atol=1e-6)
