"""The release's GRPO options (rl/grpo.py, defaults stay the paper's), each against a formula written here
from the release's described behaviour: dual-clip PPO, ratio and entropy per action element, the k1 KL of
the MSE gate, the action-head-only warm-up; and their wiring through `vla-rft rft` (Sigma Net bounds,
weight decay, the flow-MSE tau law of the SFT policy)."""
from __future__ import annotations

import math

import pytest
import torch

from vla_rft_engine.config import load_config
from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy
from vla_rft_engine.rl import grpo as G
from vla_rft_engine.rl.grpo import GRPOConfig

HALF_LOG_2PIE = 0.5 * math.log(2 * math.pi * math.e)


def release_pg_loss(lnew, lold, adv, eps, c):
    """The release's per-sample PPO loss with dual clip, averaged (verl's token-mean), in plain Python."""
    out = []
    for ln, lo, a in zip(lnew.flatten().tolist(), lold.flatten().tolist(), adv.flatten().tolist()):
        r = math.exp(ln - lo)
        l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        loss = max(l1, l2)
        if a < 0:
            loss = min(loss, -c * a)
        out.append(loss)
    return sum(out) / len(out)


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lold = torch.randn(n, generator=g, dtype=torch.float64)
    lnew = lold + 2.5 * (torch.rand(n, generator=g, dtype=torch.float64) - 0.3)  # ratios ~0.47 .. 5.8
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return lnew, lold, adv


def test_dual_clip_matches_the_release_formula():
    lnew, lold, adv = _batch()
    r = torch.exp(lnew - lold)
    capped = (adv < 0) & (r > 3)
    assert capped.sum() >= 3  # the batch reaches the dual clip
    for form in ("ppo", "clip"):
        cfg = GRPOConfig(policy_loss=form, clip_ratio_c=3.0)
        x = lnew.clone().requires_grad_(True)
        loss, m = G.grpo_loss(x, lold, adv, cfg=cfg)
        if form == "ppo":
            assert loss.item() == pytest.approx(release_pg_loss(lnew, lold, adv, 0.2, 3.0), rel=1e-12)
            assert m["dual_clip_frac"] == pytest.approx(capped.double().mean().item())
            loss.backward()
            assert (x.grad[capped] == 0).all()  # capped samples pass no gradient
        else:  # the paper's clipped term never exceeds (1+eps)|Adv| < c|Adv|: the dual clip is inert there
            assert loss.item() == pytest.approx(G.grpo_loss(lnew, lold, adv, cfg=GRPOConfig())[0].item(), rel=1e-12)
    for off in (0.0, None):  # off: the plain PPO min form
        a = G.grpo_loss(lnew, lold, adv, cfg=GRPOConfig(policy_loss="ppo", clip_ratio_c=off))[0]
        assert a.item() == pytest.approx(release_pg_loss(lnew, lold, adv, 0.2, float("inf")), rel=1e-12)


def tiny_policy():
    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(chunk_len=3, action_dim=2, proprio_dim=4, z_dim=16, enc_channels=8, d_model=16,
                                 depth=1, heads=2, sigma_d_model=16, sigma_depth=1, num_steps=4, sigma_init=0.1,
                                 backend="torch"))
    with torch.no_grad():  # a Sigma Net whose output depends on the state
        for p in pol.sigma_net.out.parameters():
            p.normal_(0, 0.3)
    return pol


def release_element_terms(pol, chain, z, s):
    """Per element (b, n, t, a): the log-density summed over the K steps, the entropy summed / (K + 1)."""
    B, N, K1, T, A = chain.shape
    K = K1 - 1
    lp = torch.zeros(B, N, T, A, dtype=torch.float64)
    ent = torch.zeros(B, N, T, A, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            for k in range(K):
                a_k = chain[b, n, k][None]
                tau = torch.full((1,), k / K)
                mu = a_k.double() + pol.velocity(z[b:b + 1], s[b:b + 1], a_k, tau).double() / K
                sig = pol.sigma(z[b:b + 1], s[b:b + 1], a_k, tau).double()
                lp[b, n] += torch.distributions.Normal(mu, sig).log_prob(chain[b, n, k + 1][None].double())[0]
                ent[b, n] += (torch.log(sig) + HALF_LOG_2PIE)[0]
    return lp, ent / (K + 1)


def test_element_ratio_and_entropy_match_the_release():
    pol = tiny_policy()
    g = torch.Generator().manual_seed(3)
    Z = int(pol.encoder.z_dim)
    z, s = torch.randn(2, Z, generator=g), torch.randn(2, 4, generator=g)
    chain = pol.sample_sde(z, s, 3, generator=g).chain  # (B, N, K+1, T, A) = (2, 3, 5, 3, 2)
    out = pol.log_prob(chain, z, s, per_element=True, logprob_reduce="sum")
    want_lp, want_ent = release_element_terms(pol, chain, z, s)
    torch.testing.assert_close(out["element_log_prob"].detach().double(), want_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["element_entropy"].detach().double(), want_ent, rtol=1e-5, atol=1e-5)
    # the per-element path and the fused per-rollout path agree on the rollout's log-prob
    torch.testing.assert_close(out["element_log_prob"].sum((2, 3)), pol.log_prob(chain, z, s, logprob_reduce="sum")["log_prob"],
                               rtol=1e-5, atol=1e-4)

    # the loss: per-element ratios, the rollout's Adv on each of its elements, mean over all elements
    lnew = out["element_log_prob"]
    lold = lnew.detach() + 1.5 * torch.randn(lnew.shape, generator=g)  # ratios from ~0.05 to ~20: every clip hit
    adv = torch.randn(2, 3, generator=g)
    cfg = GRPOConfig(policy_loss="ppo", clip_ratio_c=3.0, ratio_level="element", entropy_coef=0.003)
    loss, m = G.grpo_loss(lnew, lold, adv, entropy=out["element_entropy"], cfg=cfg)
    adv_e = adv[:, :, None, None].expand_as(lnew)
    want = release_pg_loss(lnew.detach(), lold, adv_e, 0.2, 3.0) - 0.003 * want_ent.mean().item()
    assert m["dual_clip_frac"] > 0 and m["clip_frac"] > 0
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["ratio_mean"] == pytest.approx(torch.exp(lnew.detach() - lold).mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in pol.sigma_net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="advantages shape"):
        G.grpo_loss(out["element_log_prob"], lold, adv[:, :2], cfg=cfg)


def test_entropy_scale_rollout_vs_element():
    """The docs' claim: per rollout the entropy is T*A*(K+1)/K times the per-element value (62x for 8 x 7, K 10)."""
    pol = VLAPolicy(PolicyConfig(chunk_len=8, action_dim=7, proprio_dim=4, z_dim=16, enc_channels=8, d_model=16,
                                 depth=1, heads=2, sigma_d_model=16, sigma_depth=1, num_steps=10))
    pol.restart_sigma(0.08, 0.2)  # a constant sigma: the ratio is exact
    z, s = torch.randn(2, int(pol.encoder.z_dim)), torch.randn(2, 4)
    out = pol.log_prob(pol.sample_sde(z, s, 2, generator=torch.Generator().manual_seed(0)).chain, z, s, per_element=True)
    ratio = (out["entropy"].mean() / out["element_entropy"].mean()).item()
    assert ratio == pytest.approx(8 * 7 * 11 / 10, rel=1e-5) and round(ratio) == 62


def test_k1_gate_is_mean_old_minus_new():
    lnew, lold, adv = _batch(seed=1)
    lnew = lold - 0.05 + 0.02 * torch.randn(lold.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k1 = sum(o - n for o, n in zip(lold.tolist(), lnew.tolist())) / len(lold)
    assert G.policy_kl(lnew, lold, "k1").item() == pytest.approx(k1, rel=1e-12)
    r = torch.exp(lnew - lold)
    assert G.policy_kl(lnew, lold, "k3").item() == pytest.approx(((r - 1) - (lnew - lold)).mean().item(), rel=1e-12)
    for est, kl in (("k1", k1), ("k3", G.approx_kl(lnew, lold).item())):
        mse = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        cfg = GRPOConfig(mse_kl_gate=True, mse_kl_estimator=est)
        _, m = G.grpo_loss(lnew, lold, adv, mse=mse, cfg=cfg)  # kl=None: this batch's estimate
        assert m["mse_weight"] == pytest.approx(0.01 * min(max(kl / 0.2, 0.0), 1.0), rel=1e-6)
        assert m["approx_kl_k1"] == pytest.approx(k1, rel=1e-9)
    assert 0.2 > k1 > 0.01  # the two estimators gate differently here
    assert abs(G.approx_kl(lnew, lold).item() - k1) > 0.01


def test_warmup_on_the_action_head_only():
    head, sigma = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    for warm_sigma in (True, False):
        cfg = GRPOConfig(warmup_steps=4, warmup_sigma=warm_sigma)
        opt = torch.optim.AdamW(G.optimizer_param_groups(head.parameters(), sigma.parameters(), cfg))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, G.lr_lambdas(cfg))
        for i in range(6):
            f = min(1.0, (i + 1) / 4)  # linear warm-up over 4 updates, then constant
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 * f)
            assert opt.param_groups[1]["lr"] == pytest.approx(1e-5 * (f if warm_sigma else 1.0))
            opt.step()
            sched.step()


def test_settings_are_checked():
    from vla_rft_engine.config import ConfigError
    from vla_rft_engine.rl.rft_config import RFTConfig
    for bad, msg in ((["grpo.clip_ratio_c=0.5"], "clip_ratio_c"), (["grpo.ratio_level=token"], "ratio_level"),
                     (["grpo.mse_kl_estimator=k2"], "mse_kl_estimator"), (["sigma_min=0.6"], "sigma_min < sigma_max"),
                     (["sigma_min=0.2", "sigma_max=0.1"], "sigma_min < sigma_max"),
                     (["sigma_min=0.08", "sigma_max=0.2"], r"sigma_init=0.02 must lie inside"),
                     (["grpo.weight_decay=-1"], "weight_decay"), (["grpo.sigma_weight_decay=-1"], "sigma_weight_decay")):
        with pytest.raises(ConfigError, match=msg):
            load_config(RFTConfig, None, bad)
    with pytest.raises(ConfigError, match="grpo.weight_decay"):  # the old key: a hint to the new one
        load_config(RFTConfig, None, ["weight_decay=0.01"])
    assert load_config(GRPOConfig, None, ["clip_ratio_c=null"]).clip_ratio_c is None
    c = GRPOConfig()  # the paper's defaults
    assert (c.clip_ratio_c, c.ratio_level, c.mse_kl_estimator, c.warmup_sigma) == (0.0, "rollout", "k3", True)


# ---- wiring through `vla-rft rft` (tiny stage files from test_rft) --------------------------------------------
@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    from test_rft import make_stage_files
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_stage_files(tmp_path_factory.mktemp("rft_release"))
    torch.set_num_threads(n)


RELEASE_LIKE = ["grpo.ratio_level=element", "grpo.policy_loss=ppo", "grpo.clip_ratio_c=3", "grpo.logprob_reduce=sum",
                "grpo.mse_kl_gate=true", "grpo.mse_kl_estimator=k1", "grpo.normalize_adv_std=true",
                "grpo.warmup_steps=4", "grpo.warmup_sigma=false", "grpo.weight_decay=0.01",
                "grpo.sigma_weight_decay=0.02", "sigma_min=0.08",
                "sigma_max=0.2", "sigma_init=0.1265"]


def test_rft_runs_the_release_options(stage, tmp_path):
    from test_rft import cfg_for
    from vla_rft_engine.rl import rft
    from vla_rft_engine.train.sft import load_policy
    cfg = cfg_for(stage, tmp_path, "grpo.steps=2", *RELEASE_LIKE)
    run = rft.build(cfg, rft.du.init("cpu"))
    assert [grp["weight_decay"] for grp in run.opt.param_groups] == [0.01, 0.02]
    net = run.policy.sigma_net
    assert (net.sigma_min, net.sigma_max) == (0.08, 0.2) and run.policy.cfg.sigma_init == 0.1265
    h = rft.train(cfg, run)["history"]
    assert h[0]["sigma/mean"] == pytest.approx(0.1265, rel=1e-5)  # restarted at sigma_init for every input
    assert h[0]["update/ratio_mean"] == pytest.approx(1.0) and h[0]["update/clip_frac"] == 0  # on-policy epoch
    assert [x["lr/sigma"] for x in h] == [1e-3, 1e-3]  # no warm-up on the Sigma Net ...
    assert [x["lr/action_head"] for x in h] == pytest.approx([0.5e-3, 0.75e-3])  # ... the head warms up
    for x in h:
        assert all(math.isfinite(v) for v in x.values())
    back = load_policy(tmp_path / "ckpt.pt")  # the checkpoint rebuilds the Sigma Net with the new bounds
    assert (back.sigma_net.sigma_min, back.sigma_net.sigma_max) == (0.08, 0.2)
    z, s, a = torch.randn(2, back.encoder.z_dim), torch.randn(2, 8), torch.randn(2, 4, 7)
    t = torch.rand(2)
    torch.testing.assert_close(back.sigma(z, s, a, t), run.policy.sigma(z, s, a, t))
    h_warm = rft.train(cfg_for(stage, tmp_path / "warm", "grpo.steps=1", "grpo.warmup_steps=4"))["history"]
    assert h_warm[0]["lr/sigma"] == pytest.approx(0.5e-3)  # default: both groups warm up


def test_rft_flow_mse_tau_follows_the_sft_policy(stage, tmp_path, monkeypatch):
    from test_rft import cfg_for
    from vla_rft_engine.models import policy as P
    from vla_rft_engine.rl import rft
    seen, real = [], P.sample_beta

    def spy(alpha, beta, n, generator=None, device=None):
        seen.append((alpha, beta))
        return real(alpha, beta, n, generator, device)
    monkeypatch.setattr(P, "sample_beta", spy)
    run = rft.build(cfg_for(stage, tmp_path, "grpo.steps=1"), rft.du.init("cpu"))
    assert run.policy.flow_tau == (1.0, 1.5)  # the test's SFT file predates flow_tau: the SFT default law
    run.policy.flow_tau = (0.5, 2.0)  # as load_policy sets it from an SFT run with tau_alpha=0.5 tau_beta=2
    run.step(0)
    assert seen and set(seen) == {(0.5, 2.0)}


def test_runs_from_before_the_new_settings_resume(stage, tmp_path):
    """A checkpoint whose config lacks the new settings resumes with their (paper) defaults, bit-exactly."""
    from test_rft import cfg_for
    from vla_rft_engine.rl import rft
    from vla_rft_engine.utils import atomic_save
    full = rft.train(cfg_for(stage, tmp_path / "full", "grpo.steps=2"))["history"]
    rft.train(cfg_for(stage, tmp_path / "cut", "grpo.steps=2", "stop_at=1"))
    ck = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    for k in ("clip_ratio_c", "ratio_level", "mse_kl_estimator", "warmup_sigma"):
        del ck["config"]["grpo"][k]
    del ck["config"]["sigma_min"], ck["config"]["sigma_max"]
    del ck["config"]["grpo"]["weight_decay"], ck["config"]["grpo"]["sigma_weight_decay"]
    ck["config"]["weight_decay"] = 0.0  # before grpo.weight_decay: one top-level key for both groups
    ck["config_hash"] = "written-earlier"
    atomic_save(ck, tmp_path / "cut" / "ckpt.pt")
    res = rft.train(cfg_for(stage, tmp_path / "cut", "grpo.steps=2"))["history"]
    strip = lambda hs: [{k: v for k, v in h.items() if not k.startswith("time/")} for h in hs]  # noqa: E731
    assert strip(res) == strip(full)
    with pytest.raises(rft.ConfigError, match="grpo.ratio_level: checkpoint 'rollout' vs now 'element'"):
        rft.train(cfg_for(stage, tmp_path / "cut", "grpo.steps=3", "grpo.ratio_level=element"))
