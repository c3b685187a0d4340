"""Parity of the fused SDE kernels (Triton, under TRITON_INTERPRET=1 here) with their
torch.distributions.Normal references, forward and backward.

Tolerances: fp32 log-probs are sums of D terms of size ~|log sigma| + r^2/2 (~5 each), so they are
compared with rtol 1e-5 / atol 1e-4 (summation order differs); elementwise outputs atol 1e-6.
bf16 inputs are upcast exactly to fp32 in both paths, so the same tolerances hold.
"""
import pytest
import torch

from vla_rft_engine.kernels import sde_euler_step as es
from vla_rft_engine.kernels import sde_log_prob as sl

from conftest import cuda_only

SHAPES = [(1, 1, 7), (37, 8, 7), (130, 3, 5), (5, 70)]


def _inputs(shape, dtype, device="cpu"):
    a, v, eps = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    sigma = (torch.rand(shape, device=device) * 0.5 + 0.01).to(dtype)
    return a, v, sigma, eps


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_parity(shape, dtype):
    a, v, sigma, eps = _inputs(shape, dtype)
    ref = es.euler_step_reference(a, v, sigma, eps, 0.1)
    out = es.euler_step_triton(a, v, sigma, eps, 0.1)
    assert out[0].dtype == torch.float32 and out[0].shape == a.shape  # chain never stored in bf16
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)
    for o, r in zip(out[1:], ref[1:]):
        assert o.shape == (shape[0],)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)


def test_euler_step_reference_is_normal_and_f64():
    a, v, sigma, eps = _inputs((4, 8, 7), torch.float64)
    x, lp, ent = es.euler_step_triton(a, v, sigma, eps, 0.1)
    mu = a + 0.1 * v
    torch.testing.assert_close(x, mu + sigma * eps)
    d = torch.distributions.Normal(mu, sigma)
    torch.testing.assert_close(lp, d.log_prob(x).sum((1, 2)), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ent, d.entropy().sum((1, 2)), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_prob_forward_backward_parity(shape, dtype):
    a, v, sigma, eps = _inputs(shape, dtype)
    x = (a.float() + 0.1 * v.float() + sigma.float() * eps.float()).to(dtype)
    g_lp, g_ent = torch.randn(shape[0]), torch.randn(shape[0])
    res = []
    for fn in (sl.log_prob_reference, sl.FusedSDELogProb.apply):
        ins = [t.clone().requires_grad_() for t in (x, a, v, sigma)]
        lp, ent = fn(*ins, 0.1)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        res.append((lp.detach(), ent.detach(), [t.grad for t in ins]))
    (lp_r, ent_r, g_r), (lp_t, ent_t, g_t) = res
    torch.testing.assert_close(lp_t, lp_r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent_t, ent_r, rtol=1e-5, atol=1e-4)
    for gt, gr in zip(g_t, g_r):
        assert gt.dtype == dtype and gt.shape == gr.shape
        if dtype == torch.float32:
            torch.testing.assert_close(gt, gr, rtol=1e-5, atol=1e-5)
        else:  # both grads are rounded to bf16 from (differently ordered) fp32 math
            torch.testing.assert_close(gt.float(), gr.float(), rtol=1e-2, atol=1e-2)


def test_log_prob_gradcheck_float64():
    a, v, sigma, eps = _inputs((3, 2, 3), torch.float64)
    x = a + 0.1 * v + sigma * eps
    ins = [t.clone().requires_grad_() for t in (x, a, v, sigma)]
    assert torch.autograd.gradcheck(lambda *t: sl.FusedSDELogProb.apply(*t, 0.1), ins)
    # one output unused: its upstream grad is None in backward
    assert torch.autograd.gradcheck(lambda *t: sl.FusedSDELogProb.apply(*t, 0.1)[0], ins)


def test_backend_selection_and_fallback(monkeypatch):
    a, v, sigma, eps = _inputs((4, 8, 7), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        es.euler_step(a, v, sigma, eps, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        sl.sde_log_prob(a, a, v, sigma, 0.1, backend="fast")
    called = []
    monkeypatch.setattr(sl.FusedSDELogProb, "apply", lambda *t: called.append(1) or sl.log_prob_reference(*t))
    sl.sde_log_prob(a, a, v, sigma, 0.1, backend="triton")
    assert called  # interpreter on: the triton path runs
    called.clear()
    sl.sde_log_prob(a, a, v, sigma, 0.1, backend="auto")
    assert not called  # auto on CPU: eager torch (the interpreter is no speed path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not es.triton_usable(torch.device("cpu"))
    sl.sde_log_prob(a, a, v, sigma, 0.1, backend="triton")
    assert not called  # triton cannot run on a CPU tensor without the interpreter: torch fallback


def test_shape_mismatch_raises():
    a, v, sigma, eps = _inputs((4, 8, 7), torch.float32)
    with pytest.raises(ValueError, match="sigma"):
        es.euler_step_triton(a, v, sigma[:, :7], eps, 0.1)
    with pytest.raises(ValueError, match="v has shape"):
        sl.log_prob_reference(a, a, v[:2], sigma, 0.1)


@cuda_only()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_cuda(dtype):
    a, v, sigma, eps = _inputs((256, 8, 7), dtype, "cuda")
    ref = es.euler_step_reference(a, v, sigma, eps, 0.1)
    out = es.euler_step(a, v, sigma, eps, 0.1, backend="triton")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
    x = out[0]
    ins = [t.clone().float().requires_grad_() for t in (x, a, v, sigma)]
    lp, ent = sl.sde_log_prob(*ins, 0.1, backend="triton")
    (lp.sum() + ent.sum()).backward()
    ins_r = [t.detach().clone().requires_grad_() for t in ins]
    lp_r, ent_r = sl.log_prob_reference(*ins_r, 0.1)
    (lp_r.sum() + ent_r.sum()).backward()
    torch.testing.assert_close(lp, lp_r, rtol=1e-5, atol=1e-4)
    for t, r in zip(ins, ins_r):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5)
