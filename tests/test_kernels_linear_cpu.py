"""kernels/linear_cpu.py: the packed-panel C++ GEMM against the product in float64 and against torch.mm / addmm_
(its reference), over row counts around the 6-row tile, panel edges (N around 32) and the decode step's shapes."""
import pytest
import torch

from vla_rft_engine.kernels.linear_cpu import extension_available, linear_cpu, linear_cpu_reference, pack_linear_cpu

needs_ext = pytest.mark.skipif(not extension_available(), reason="vla_rft_engine._linear_cpu not built")

# M rows, K, N: 1-7 rows and 34/68 (the CPU RFT's 2 x 17 rows, and with guidance); N = 1, 31, 32, 33 and the
# small preset's qkv (768), gate/up (2048), head (4375 dynamics codes) and w2 (K = 1024)
SHAPES = [(1, 16, 1), (2, 33, 31), (5, 64, 32), (6, 64, 33), (7, 48, 65), (34, 256, 768), (34, 256, 4375),
          (34, 1024, 256), (68, 256, 2048), (13, 7, 100)]


def _case(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)


@needs_ext
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_float64_and_torch_mm(M, K, N, accumulate):
    x, w, res = _case(M, K, N)
    packed = pack_linear_cpu(w)
    assert packed is not None and packed.shape == ((N + 31) // 32, K, 32)
    out = res.clone()
    got = linear_cpu(x, w, packed, out=out, accumulate=accumulate) if accumulate else linear_cpu(x, w, packed)
    want = (res.double() if accumulate else 0) + x.double() @ w.double().t()
    assert got.shape == (M, N) and got.dtype == torch.float32 and (got is out) == accumulate
    # one multiply-add chain per output: error ~ K ulps of the row's magnitude, as for torch.mm's blocked sums
    tol = 4 * K * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t()).max().item()
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    ref = linear_cpu_reference(x, w, res.clone(), accumulate) if accumulate else linear_cpu_reference(x, w)
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


@needs_ext
def test_non_contiguous_input_and_fallbacks():
    x, w, _ = _case(9, 40, 70)
    packed = pack_linear_cpu(w)
    wide = torch.cat([x, x], 1)[:, ::2]  # a strided view: copied, not misread
    torch.testing.assert_close(linear_cpu(wide, w, packed), torch.mm(wide, w.t()), atol=1e-4, rtol=1e-5)
    assert pack_linear_cpu(w.bfloat16()) is None  # other dtypes keep torch.mm
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear_cpu(xb, wb, None), torch.mm(xb, wb.t()))


@needs_ext
def test_bad_input_says_what_is_wrong():
    from vla_rft_engine.kernels import linear_cpu as mod
    x, w, _ = _case(4, 16, 40)
    packed = mod.pack_linear_cpu(w)
    with pytest.raises(RuntimeError, match=r"packed must be linear_cpu.pack\(w\) of a weight \(70, 16\)"):
        mod._ext.linear(x, packed, 70, torch.empty(4, 70), False)  # 2 panels packed, 3 needed
    with pytest.raises(RuntimeError, match=r"packed must be linear_cpu.pack\(w\) of a weight \(40, 17\)"):
        mod._ext.linear(torch.randn(4, 17), packed, 40, torch.empty(4, 40), False)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous fp32 \(4, 40\) tensor"):
        mod._ext.linear(x, packed, 40, torch.empty(40, 4).t(), False)
    with pytest.raises(RuntimeError, match="2-D fp32 CPU tensor"):
        mod._ext.pack(w.double())
