"""GRPO (Eq. 9, 12, 13): loss values and gradients against a reference written straight from Eq. 13,
both policy forms, the release's KL-gated MSE weight, group advantages by hand, error cases."""
import math

import pytest
import torch

from vla_rft_engine.config import load_config
from vla_rft_engine.rl import grpo as G


def eq13_reference(lnew, lold, adv, ent, mse, eps, form, w_mse, alpha):
    """Eq. 13 term by term, one rollout at a time."""
    terms = []
    for i in range(lnew.numel()):
        r = torch.exp(lnew[i] - lold[i])  # Eq. 9
        rc = torch.clamp(r, 1 - eps, 1 + eps)
        terms.append(rc * adv[i] if form == "clip" else torch.minimum(r * adv[i], rc * adv[i]))
    return -torch.stack(terms).mean() + w_mse * mse - alpha * ent.mean()


def _batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    lold = torch.randn(n, generator=g, dtype=torch.float64)
    lnew = lold + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)  # ratios in ~[0.6, 1.65]: both clips hit
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    ent = torch.randn(n, generator=g, dtype=torch.float64)
    mse = torch.rand((), generator=g, dtype=torch.float64)
    return lnew, lold, adv, ent, mse


@pytest.mark.parametrize("form", ["clip", "ppo"])
def test_loss_and_grads_match_eq13(form):
    lnew, lold, adv, ent, mse = _batch()
    cfg = G.GRPOConfig(policy_loss=form)
    ins = [t.clone().requires_grad_(True) for t in (lnew, ent, mse)]
    ref_ins = [t.clone().requires_grad_(True) for t in (lnew, ent, mse)]
    loss, m = G.grpo_loss(ins[0], lold, adv, entropy=ins[1], mse=ins[2], cfg=cfg)
    ref = eq13_reference(ref_ins[0], lold, adv, ref_ins[1], ref_ins[2], 0.2, form, 0.01, 0.003)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-10, abs_tol=1e-12)
    loss.backward()
    ref.backward()
    for a, b in zip(ins, ref_ins):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)
    assert ins[2].grad.item() == pytest.approx(0.01) and torch.allclose(ins[1].grad, torch.full((32,), -0.003 / 32, dtype=torch.float64))
    r = torch.exp(lnew - lold)
    out = (r < 0.8) | (r > 1.2)
    assert 0 < out.sum() < 32
    assert m["clip_frac"] == pytest.approx(out.double().mean().item())
    assert m["ratio_min"] == pytest.approx(r.min().item()) and m["ratio_max"] == pytest.approx(r.max().item())
    assert m["ratio_mean"] == pytest.approx(r.mean().item())
    assert m["approx_kl_k3"] == pytest.approx(((r - 1) - (lnew - lold)).mean().item())
    assert m["mse_weight"] == pytest.approx(0.01) and m["mse"] == pytest.approx(mse.item())
    assert m["entropy"] == pytest.approx(ent.mean().item()) and m["adv_mean"] == pytest.approx(adv.mean().item())
    # outside the clip range the paper's form passes no gradient; the PPO form keeps it where min picks r*A
    if form == "clip":
        assert (ins[0].grad[out] == 0).all()


def test_forms_differ_and_agree_at_ratio_one():
    lnew, lold, adv, _, _ = _batch(1)
    a, _ = G.grpo_loss(lnew, lold, adv, cfg=G.GRPOConfig(policy_loss="clip"))
    b, _ = G.grpo_loss(lnew, lold, adv, cfg=G.GRPOConfig(policy_loss="ppo"))
    assert not math.isclose(a.item(), b.item())
    # on-policy (first PPO epoch): r = 1, both reduce to -mean(Adv)
    for form in ("clip", "ppo"):
        lo, m = G.grpo_loss(lold, lold, adv, cfg=G.GRPOConfig(policy_loss=form))
        assert lo.item() == pytest.approx(-adv.mean().item()) and m["approx_kl_k3"] == 0.0


def test_kl_gated_mse_weight():
    for kl, w in ((0.0, 0.0), (0.1, 0.005), (0.3, 0.01), (-0.05, 0.0)):
        assert G.kl_gated_weight(kl, 0.01, 0.0, 0.2).item() == pytest.approx(w, abs=1e-9)
    lnew, lold, adv, ent, mse = _batch(2)
    cfg = G.GRPOConfig(mse_kl_gate=True)
    for kl, w in ((0.0, 0.0), (0.1, 0.005), (0.3, 0.01)):
        m_in = mse.clone().requires_grad_(True)
        loss, m = G.grpo_loss(lnew, lold, adv, entropy=ent, mse=m_in, cfg=cfg, kl=kl)
        loss.backward()
        assert m["mse_weight"] == pytest.approx(w) and m_in.grad.item() == pytest.approx(w)
        ref = eq13_reference(lnew, lold, adv, ent, mse, 0.2, "clip", w, 0.003)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # kl=None: gated by this batch's k3 estimate
    _, m = G.grpo_loss(lnew, lold, adv, mse=mse, cfg=cfg)
    assert m["mse_weight"] == pytest.approx(0.01 * min(max(m["approx_kl_k3"] / 0.2, 0.0), 1.0), rel=1e-5)


def test_group_advantage_by_hand():
    R = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    assert torch.allclose(G.group_advantage(R), torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]))
    # release form: / (std + 1e-6), Bessel-corrected std: 1 and sqrt(3)
    want = torch.tensor([[-1.0, 0.0, 1.0], [-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]])
    got = G.group_advantage(R, normalize_std=True)
    assert torch.allclose(got, want * torch.tensor([[1 / (1 + 1e-6 / 1)], [math.sqrt(3) / (math.sqrt(3) + 1e-6)]]))
    # a group of equal rewards carries no signal, in both forms
    assert torch.equal(G.group_advantage(torch.full((1, 4), 2.5), normalize_std=True), torch.zeros(1, 4))
    assert torch.allclose(G.group_advantage(R).sum(-1), torch.zeros(2))


def test_ratio_and_k3():
    lnew, lold = torch.tensor([0.0, math.log(2.0)]), torch.tensor([0.0, 0.0])
    assert torch.allclose(G.rollout_ratio(lnew, lold), torch.tensor([1.0, 2.0]))
    assert G.approx_kl(lnew, lold).item() == pytest.approx((0 + (1 - math.log(2))) / 2)


def test_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        G.group_advantage(torch.ones(4, 1))
    with pytest.raises(ValueError, match="NaN"):
        G.group_advantage(torch.tensor([[1.0, float("nan")]]))
    lnew, lold, adv, ent, mse = _batch(3)
    with pytest.raises(ValueError, match="one shape"):
        G.grpo_loss(lnew, lold[:5], adv)
    with pytest.raises(ValueError, match="logp_new"):
        G.grpo_loss(lnew * float("nan"), lold, adv)
    with pytest.raises(ValueError, match="advantages"):
        G.grpo_loss(lnew, lold, adv * float("inf"))
    with pytest.raises(ValueError, match="entropy"):
        G.grpo_loss(lnew, lold, adv, entropy=ent * float("nan"))
    with pytest.raises(ValueError, match="policy_loss"):
        G.grpo_loss(lnew, lold, adv, cfg=G.GRPOConfig(policy_loss="dpo"))
    with pytest.raises(ValueError, match="N >= 2"):
        load_config(G.GRPOConfig, overrides=["rollouts=1"])


def test_config_table7_defaults():
    c = G.GRPOConfig()
    assert (c.lr, c.sigma_lr, c.mse_coef, c.entropy_coef, c.steps, c.task_instances, c.rollouts) == \
        (1e-6, 1e-5, 0.01, 0.003, 400, 16, 16)
    assert (c.clip_eps, c.ppo_epochs, c.grad_clip, c.logprob_reduce, c.policy_loss) == (0.2, 1, 1.0, "mean", "clip")
    assert not c.normalize_adv_std and not c.mse_kl_gate and (c.mse_kl_low, c.mse_kl_high) == (0.0, 0.2)
    c = load_config(G.GRPOConfig, overrides=["policy_loss=ppo", "mse_kl_gate=true"])
    assert c.policy_loss == "ppo" and c.mse_kl_gate
    head, sigma = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    groups = G.optimizer_param_groups(head.parameters(), sigma.parameters())
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-6, 1e-5]
    assert G.warmup_factor(0) == pytest.approx(0.1) and G.warmup_factor(9) == 1.0 and G.warmup_factor(100) == 1.0
