"""The SDE policy (Eq. 5-8): log-probs vs torch.distributions.Normal, ODE limit, seeding, backends."""
import math

import pytest
import torch
from torch.distributions import Normal

from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy
from vla_rft_engine.models.sde import ode_sample, sde_log_prob, sde_sample

T, A, P = 4, 3, 5


def tiny_policy(**kw):
    cfg = PolicyConfig(action_dim=A, chunk_len=T, proprio_dim=P, z_dim=16, enc_channels=8, d_model=16, depth=1,
                       heads=2, sigma_d_model=16, sigma_depth=1, **kw)
    pol = VLAPolicy(cfg)
    # Sigma Net starts constant (zero output layer); perturb it so sigma depends on the inputs
    torch.nn.init.normal_(pol.sigma_net.out.weight, std=0.5)
    return pol


Z = 16 + 2 * 4  # the default (v2) small encoder's z: 16 features + x, y of 4 instruction queries


def cond(B=3):
    return torch.randn(B, Z), torch.randn(B, P)


def test_log_prob_equals_normal_on_chain():
    pol = tiny_policy()
    z, s = cond()
    out = pol.sample_sde(z, s, num_samples=4, generator=torch.Generator().manual_seed(1))
    B, N, K1 = out.chain.shape[:3]
    assert out.chain.shape == (3, 4, 11, T, A) and out.log_prob.shape == (3, 4)
    # by hand: mu_k, sigma_k from the nets, Normal.log_prob of a_{k+1}, summed over dims, mean over K
    manual = torch.zeros(B, N, K1 - 1)
    ent = torch.zeros(B, N, K1 - 1)
    with torch.no_grad():
        for b in range(B):
            for k in range(K1 - 1):
                a = out.chain[b, :, k]
                tau = torch.full((N,), k / 10)
                zz, ss = z[b:b + 1].expand(N, -1), s[b:b + 1].expand(N, -1)
                d = Normal(a + 0.1 * pol.velocity(zz, ss, a, tau), pol.sigma(zz, ss, a, tau))
                manual[b, :, k] = d.log_prob(out.chain[b, :, k + 1]).sum((1, 2))
                ent[b, :, k] = d.entropy().sum((1, 2))
    torch.testing.assert_close(out.step_log_probs, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob, manual.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ent.mean(-1), rtol=1e-5, atol=1e-5)
    # entropy formula: sum log sigma + 0.5 log(2 pi e) per dim
    closed = (out.sigmas.log() + 0.5 * math.log(2 * math.pi * math.e)).sum((-1, -2))
    torch.testing.assert_close(out.step_entropy, closed, rtol=1e-5, atol=1e-5)
    # recompute with gradients gives the same numbers, on both backends
    for backend in ("torch", "triton"):
        pol.cfg.backend = backend
        rec = pol.log_prob(out.chain, z, s)
        torch.testing.assert_close(rec["step_log_probs"].detach(), manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec["entropy"].detach(), ent.mean(-1), rtol=1e-5, atol=1e-5)


def test_reduce_sum_and_mean():
    pol = tiny_policy()
    z, s = cond(2)
    m = pol.sample_sde(z, s, 3, generator=torch.Generator().manual_seed(0))
    sm = pol.sample_sde(z, s, 3, generator=torch.Generator().manual_seed(0), logprob_reduce="sum")
    torch.testing.assert_close(sm.log_prob, 10 * m.log_prob, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pol.log_prob(sm.chain, z, s, logprob_reduce="sum")["log_prob"].detach(), sm.log_prob,
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reduce"):
        sde_log_prob(pol.velocity, pol.sigma, sm.chain, z, s, reduce="max")


def test_seeded_and_backend_reproducible():
    pol = tiny_policy()
    z, s = cond(2)
    outs = []
    for backend in ("torch", "torch", "triton"):
        pol.cfg.backend = backend
        outs.append(pol.sample_sde(z, s, 5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(outs[0].chain, outs[1].chain)
    torch.testing.assert_close(outs[2].chain, outs[0].chain, atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[2].log_prob, outs[0].log_prob, rtol=1e-5, atol=1e-4)
    other = pol.sample_sde(z, s, 5, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other.chain, outs[0].chain)


def test_small_sigma_converges_to_ode():
    z, s = cond(2)
    a0 = torch.randn(2, 3, T, A)
    errs = []
    for smin in (1e-2, 1e-4, 1e-6):
        torch.manual_seed(0)  # same weights for every sigma level
        pol = tiny_policy(sigma_min=smin, sigma_max=10 * smin, sigma_init=2 * smin)
        sde = pol.sample_sde(z, s, 3, generator=torch.Generator().manual_seed(3), a0=a0)
        ode = torch.stack([pol.sample_ode(z, s, noise=a0[:, n]) for n in range(3)], 1)
        errs.append((sde.actions - ode).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs


def test_grads_match_between_backends():
    pol = tiny_policy()
    z, s = cond(2)
    out = pol.sample_sde(z, s, 3, generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("torch", "triton"):
        pol.zero_grad()
        pol.cfg.backend = backend
        r = pol.log_prob(out.chain, z, s)
        (r["log_prob"].sum() + 0.1 * r["entropy"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None})
    assert any(n.startswith("flow_head") for n in grads[0]) and any(n.startswith("sigma_net") for n in grads[0])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


def test_ode_is_deterministic_euler():
    v = lambda z, s, a, tau: torch.ones_like(a) * 2.0  # noqa: E731
    z, s = cond(2)
    noise = torch.zeros(2, T, A)
    torch.testing.assert_close(ode_sample(v, z, s, (T, A), 10, noise), torch.full((2, T, A), 2.0))


def test_bad_inputs_raise():
    pol = tiny_policy()
    z, s = cond(2)
    out = pol.sample_sde(z, s, 2, generator=torch.Generator().manual_seed(0))
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z holds NaN"):
        pol.sample_sde(bad, s, 2)
    bad = s.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="proprio"):
        pol.log_prob(out.chain, z, bad)
    chain = out.chain.clone()
    chain[0, 0, 3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="chain holds NaN"):
        pol.log_prob(chain, z, s)
    with pytest.raises(ValueError, match="action chunk"):
        pol.log_prob(out.chain[..., :2], z, s)
    with pytest.raises(ValueError, match="chain must be"):
        pol.log_prob(out.chain[0], z, s)
    with pytest.raises(ValueError, match="a0 must be"):
        sde_sample(pol.velocity, pol.sigma, z, s, (T, A), 2, a0=torch.zeros(2, 2, T + 1, A))
