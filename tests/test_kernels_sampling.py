"""Fused temperature/top-k/top-p sampling (kernels/sampling.py) vs the sort-based reference, same Gumbel
noise: tokens must be identical, log-probs within 1e-5 (fp32 logits) / 1e-4 (bf16 logits)."""
import pytest
import torch

from vla_rft_engine.kernels.sampling import gumbel_noise, sample, sample_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)])
@pytest.mark.parametrize("V", [37, 300, 4375])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 1.0), (1.0, 0, 0.8),
                                                     (1.3, 50, 0.6), (1.0, 1, 1.0)])
def test_sampling_matches_reference(V, temperature, top_k, top_p, dtype, tol):
    logits = (torch.randn(4, V) * 3).to(dtype)
    noise = gumbel_noise((4, V), generator=torch.Generator().manual_seed(V))
    tok, lp = sample(logits, noise, temperature, top_k, top_p)
    rtok, rlp = sample_reference(logits, noise, temperature, top_k, top_p)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp, atol=tol, rtol=tol)


def test_sampling_column_slice_restricts_vocab():
    logits = torch.randn(3, 100)
    logits[:, 60:] += 100.0  # huge logits outside the allowed range must never be picked
    tok, _ = sample(logits[:, :60], gumbel_noise((3, 60)), 1.0, 0, 0.9)
    assert int(tok.max()) < 60
    tok, _ = sample(logits[:, :60], None, 0.0)
    assert torch.equal(tok, logits[:, :60].argmax(-1))


def test_top_p_keeps_smallest_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for s in range(64):
        tok, _ = sample(logits, gumbel_noise((1, 4), generator=torch.Generator().manual_seed(s)), 1.0, 0, 0.75)
        seen.add(int(tok))
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut


@pytest.mark.parametrize("V", [37, 4375])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.8), (1.3, 50, 0.6), (0.7, 0, 0.95), (1.0, 0, 1.0),
                                                     (0.0, 0, 0.8)])
def test_cpu_sampler_equals_reference(V, scale, temperature, top_k, top_p):
    from vla_rft_engine.kernels.sampling import sample_cpu
    g = torch.Generator().manual_seed(V + int(scale * 10))
    logits = torch.randn(6, V, generator=g) * scale
    noise = gumbel_noise((6, V), generator=g)
    tok, lp = sample_cpu(logits, noise, temperature, top_k, top_p)
    rtok, rlp = sample_reference(logits, noise, temperature, top_k, top_p)
    assert torch.equal(tok, rtok) and torch.equal(lp, rlp)
    assert sample_cpu(logits, noise, temperature, top_k, top_p, logprob=False)[1] is None


def test_cpu_sampler_ties_and_fallback():
    """Ties straddling the top-p cut take the reference path, so the result stays the reference's."""
    from vla_rft_engine.kernels.sampling import sample_cpu
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [0.0] * 5, [3.0, 3.0, 1.0, -1.0, -1.0]]).repeat(4, 1)
    for s in range(16):
        noise = gumbel_noise(logits.shape, generator=torch.Generator().manual_seed(s))
        for tp in (0.5, 0.6, 0.8, 0.99):
            assert torch.equal(sample_cpu(logits, noise, 1.0, 0, tp)[0], sample_reference(logits, noise, 1.0, 0, tp)[0])


@pytest.mark.parametrize("n", [1, 15, 16, 4375 * 3 + 7])
def test_cpp_gumbel_matches_log_log_in_float64(n):
    """The C++ transform (vectorised log, 16 at a time, a scalar tail) against -log(-log(u)) in float64 of the same
    clamped fp32 u, as close as torch's own fp32 ops are; the clamp's ends and values near 1/e included."""
    from vla_rft_engine.kernels import sampling
    if sampling._gumbel_cpp is None:
        pytest.skip("vla_rft_engine._sampling_cpu not built")
    g = torch.Generator().manual_seed(n)
    u = torch.cat([torch.tensor([0.0, 1e-12, 1e-10, 0.3678794, 0.5, 1 - 1e-7, 1.0]), torch.rand(n, generator=g)])[:n]
    want = -(-(u.clone().clamp_(*sampling.GUMBEL_CLAMP).double()).log()).log()
    torch_ops = sampling.gumbel_from_uniform_reference_(u.clone()).double()
    got = sampling.gumbel_from_uniform_(u.clone()).double()
    scale = want.abs().clamp(min=1.0)
    torch_err = ((torch_ops - want).abs() / scale).max().item()
    assert ((got - want).abs() / scale).max().item() <= max(2 * torch_err, 2.5e-7)


def test_gumbel_noise_out_buffer_same_stream():
    buf = torch.empty(3, 50)
    a = gumbel_noise((3, 50), generator=torch.Generator().manual_seed(4))
    b = gumbel_noise((3, 50), generator=torch.Generator().manual_seed(4), out=buf)
    assert b.data_ptr() == buf.data_ptr() and torch.equal(a, b)
    u = torch.rand((3, 50), generator=torch.Generator().manual_seed(4)).clamp(1e-10, 1.0 - 1e-7)
    # the generator's draws, transformed (the C++ log rounds like torch.log to ~1 ulp, not bit for bit)
    torch.testing.assert_close(a, -torch.log(-torch.log(u)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", [2.0, 4.0, 8.0])
@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_cpu_sampler_head_cut_equals_full_sort(scale, top_p):
    """Peaked rows (a trained model's) take the head path: only the values above 1/V are sorted. Its cut is
    the full sort's, and the tokens are the reference's."""
    from vla_rft_engine.kernels.sampling import _full_cut, _head_cut, sample_cpu
    g = torch.Generator().manual_seed(int(scale * 100 + top_p * 10))
    logits = torch.randn(34, 4375, generator=g) * scale
    logits[:3] = logits[:3] * 3  # a few much sharper rows beside the others
    p = logits.softmax(-1).numpy()
    head = _head_cut(p, top_p)
    if top_p < 0.9:  # the head (values above 1/V) holds the mass here; at 0.95 it may not, and then declines
        assert head is not None
    assert head is None or torch.equal(head, _full_cut(p, top_p))
    noise = gumbel_noise(logits.shape, generator=g)
    tok, lp = sample_cpu(logits, noise, 1.0, 0, top_p)
    rtok, rlp = sample_reference(logits, noise, 1.0, 0, top_p)
    assert torch.equal(tok, rtok) and torch.equal(lp, rlp)


def test_cpu_sampler_head_cut_declines_when_unsure():
    """A flat row (the cut lies among values below 1/V) or a head whose mass barely reaches top_p: no head
    cut, the full sort decides."""
    from vla_rft_engine.kernels.sampling import _head_cut
    flat = torch.randn(4, 4375).mul(0.3).softmax(-1).numpy()
    assert _head_cut(flat, 0.8) is None
    p = torch.zeros(2, 100)
    p[:, :4] = torch.tensor([0.4, 0.3, 0.1, 0.1])  # mass above 1/V: 0.9; the rest spread below 1/V
    p[:, 4:] = 0.1 / 96
    assert _head_cut(p.numpy(), 0.5) is not None
    assert _head_cut(p.numpy(), 0.9) is None  # the head's mass does not exceed top_p by more than rounding


def _nucleus_impls():
    """The top-p check's two implementations: the torch reference and, where built, the C++ op."""
    from vla_rft_engine.kernels import sampling
    impls = [pytest.param(sampling._nucleus_argmax, id="torch")]
    skip = pytest.mark.skipif(sampling._ext is None, reason="vla_rft_engine._sampling_cpu not built")
    impls.append(pytest.param(lambda p, s, tp: sampling._ext.nucleus_argmax(p, s, tp), id="cpp", marks=skip))
    return impls


@pytest.mark.parametrize("_nucleus_argmax", _nucleus_impls())
@pytest.mark.parametrize("scale,top_p", [(0.05, 0.8), (0.3, 0.3), (1.0, 0.8), (4.0, 0.95), (8.0, 0.5)])
def test_cpu_sampler_nucleus_check_needs_no_sort(scale, top_p, _nucleus_argmax):
    """The Gumbel-max winner checked against the top-p set by the mass above it: certain for nearly every row
    of flat (random-init) and peaked (trained) rows alike, winners outside the set taking further rounds
    (top_p 0.3 on flat rows: most first winners are out), and always the reference's token."""
    g = torch.Generator().manual_seed(int(scale * 100 + top_p * 10))
    logits = torch.randn(64, 4375, generator=g) * scale
    noise = gumbel_noise(logits.shape, generator=g)
    p = logits.softmax(-1)
    tok, done = _nucleus_argmax(p, logits + noise, top_p)
    assert done.float().mean() > 0.9
    rtok, _ = sample_reference(logits, noise, 1.0, 0, top_p)
    assert torch.equal(tok[done], rtok[done])
    first = (logits + noise).argmax(-1)
    if scale <= 0.3 and top_p <= 0.3:
        assert (first != rtok).float().mean() > 0.5  # the drop rounds did the work


@pytest.mark.parametrize("_nucleus_argmax", _nucleus_impls())
def test_cpu_sampler_nucleus_check_leaves_the_margin_to_the_sort(_nucleus_argmax):
    """A winner whose mass above lies within the rounding margin of top_p, or NaN values: no verdict."""
    from vla_rft_engine.kernels.sampling import sample_cpu
    V = 1000
    p = torch.full((3, V), 1.0 / V, dtype=torch.float64)
    p[:, :500] += torch.linspace(2e-5, 1e-5, 500, dtype=torch.float64)  # distinct, descending: no ties
    p[:, 500:] -= torch.linspace(1e-5, 2e-5, 500, dtype=torch.float64)
    p = (p / p.sum(-1, keepdim=True)).float()
    score = torch.full((3, V), -1e9)
    score[:, 300] = 0.0  # the winner: mass strictly above it = p[:, :300].sum()
    mass = float(p[0, :300].double().sum())
    tol = V * 2.0 ** -22
    top_ps = torch.tensor([mass + tol / 2, mass - 3 * tol, mass + 3 * tol])
    for i, tp in enumerate(top_ps.tolist()):  # within the margin: none; certainly out: the next winner; in: 300
        tok, done = _nucleus_argmax(p[i:i + 1], score[i:i + 1], tp)
        assert bool(done[0]) == (i != 0)
        if i:
            ref = sample_reference(p[i:i + 1].log(), score[i:i + 1] - p[i:i + 1].log(), 1.0, 0, tp)[0]
            assert int(tok[0]) == int(ref[0]) == (300 if i == 2 else 0)
    logits = torch.randn(2, 50)
    logits[1, 7] = float("nan")
    tok, done = _nucleus_argmax(logits.softmax(-1), logits, 0.8)
    assert not bool(done[1])
    noise = gumbel_noise((2, 50), generator=torch.Generator().manual_seed(0))
    assert int(sample_cpu(logits, noise, 1.0, 0, 0.8)[0][0]) == int(sample_reference(logits, noise, 1.0, 0, 0.8)[0][0])
