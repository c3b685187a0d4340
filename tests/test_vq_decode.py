"""vq_decode extension (csrc/) against the PyTorch reference: codes exact, fp32 latents within 1e-6."""
import math
import warnings

import pytest
import torch

from vla_rft_engine.models.quantizers import fsq_indices_to_codes
from vla_rft_engine.ops import vq_decode as vqd

from conftest import cuda_only

_cpu = vqd._load_ext("cpu")
needs_cpu_ext = pytest.mark.skipif(_cpu is None, reason=f"_vq_cpu not built: run .ci/build_ext.sh "
                                                        f"({vqd.extension_available('cpu')[1]})")

LEVELS = [(7, 5, 5, 5, 5), (8, 5, 5, 5), (8, 8, 8), (2, 3), (4, 6, 9)]


def _params(C, p, d, dtype=torch.float32, bias=True, device="cpu"):
    w = torch.randn(C * p * p, d, device=device).to(dtype)
    b = torch.randn(C * p * p, device=device).to(dtype) if bias else None
    return w, b


@needs_cpu_ext
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_fsq_codes_exact(levels, id_dtype):
    n = math.prod(levels)
    ids = torch.arange(n, dtype=id_dtype).reshape(1, n)  # every code once
    ref = fsq_indices_to_codes(ids, levels)
    assert torch.equal(_cpu.fsq_codes(ids, list(levels)), ref)
    # Through the fused decode: an identity projection returns the codes themselves, bit for bit.
    d = len(levels)
    out = vqd.vq_decode(ids, torch.eye(d), torch.zeros(d), (1, n), 1, levels)
    assert torch.equal(out[0, :, 0, :].t(), ref[0])


@needs_cpu_ext
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_vq_codebook_exact(id_dtype):
    cb = torch.randn(37, 6)
    ids = torch.randint(0, 37, (3, 4 * 5), dtype=id_dtype)
    out = vqd.vq_decode(ids, torch.eye(6), None, (4, 5), 1, codebook=cb)
    assert torch.equal(out, vqd.vq_decode_reference(ids, torch.eye(6), None, (4, 5), 1, codebook=cb))


SHAPES = [  # B, gh, gw, p, C
    (2, 8, 8, 4, 16),   # dynamics tokens: 8x8 grid of 4x4 patches -> 32x32
    (1, 32, 32, 1, 8),  # context tokens: 1x1 conv
    (3, 5, 7, 2, 5),
    (2, 3, 4, 4, 3),
    (1, 2, 9, 1, 1),
    (2, 3, 3, 3, 4),    # odd patch: generic path
    (1, 1, 1, 8, 2),
]


@needs_cpu_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("levels", [(7, 5, 5, 5, 5), (8, 5, 5, 5)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bias", [True, False])
def test_fsq_decode_matches_reference(shape, levels, id_dtype, bias):
    B, gh, gw, p, C = shape
    ids = torch.randint(0, math.prod(levels), (B, gh * gw), dtype=id_dtype)
    w, b = _params(C, p, len(levels), bias=bias)
    ref = vqd.vq_decode_reference(ids, w, b, (gh, gw), p, levels)
    out = vqd.vq_decode(ids, w, b, (gh, gw), p, levels)
    assert out.shape == (B, C, gh * p, gw * p) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@needs_cpu_ext
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("d", [3, 8, 40])  # 40 > 32: the generic (non-blocked) path
def test_vq_decode_matches_reference(shape, d):
    B, gh, gw, p, C = shape
    cb = torch.randn(100, d) * 0.3
    ids = torch.randint(0, 100, (B, gh * gw))
    w, b = _params(C, p, d)
    w = w / math.sqrt(d)
    ref = vqd.vq_decode_reference(ids, w, b, (gh, gw), p, codebook=cb)
    torch.testing.assert_close(vqd.vq_decode(ids, w, b, (gh, gw), p, codebook=cb), ref, rtol=0, atol=1e-6)


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights(dtype):
    levels = (7, 5, 5, 5, 5)
    ids = torch.randint(0, 4375, (2, 64))
    w, b = _params(6, 4, 5, dtype=dtype)
    out = vqd.vq_decode(ids, w, b, (8, 8), 4, levels)
    ref = vqd.vq_decode_reference(ids, w, b, (8, 8), 4, levels)
    assert out.dtype == dtype
    # fp32 accumulation vs the reference's matmul: at most a rounding step of the half type apart.
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    exact = vqd.vq_decode_reference(ids, w.float(), b.float(), (8, 8), 4, levels)
    torch.testing.assert_close(out.float(), exact, rtol=3e-2, atol=5e-2)


@needs_cpu_ext
def test_non_contiguous_inputs():
    levels = (7, 5, 5, 5, 5)
    big = torch.randint(0, 4375, (64, 6))
    ids = big.t()[:, ::2]  # (6, 32), strided
    assert not ids.is_contiguous()
    wt = torch.randn(5, 3 * 4)
    w = wt.t()  # (12, 5), transposed view
    b = torch.randn(24)[::2]
    ref = vqd.vq_decode_reference(ids, w, b, (4, 8), 2, levels)
    torch.testing.assert_close(vqd.vq_decode(ids, w, b, (4, 8), 2, levels), ref, rtol=0, atol=1e-6)


@needs_cpu_ext
@pytest.mark.parametrize("bad", [-1, 4375, 2**40, -(2**40)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_bad_ids_raise_value_error(bad, id_dtype):
    if id_dtype == torch.int32 and abs(bad) >= 2**31:
        bad = 2**31 - 1 if bad > 0 else -(2**31)
    ids = torch.randint(0, 4375, (2, 64), dtype=id_dtype)
    ids[1, 17] = bad
    w, b = _params(4, 4, 5)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 4375\)"):
        vqd.vq_decode(ids, w, b, (8, 8), 4, (7, 5, 5, 5, 5))
    with pytest.raises(ValueError, match=r"out of range"):
        _cpu.fsq_codes(ids, [7, 5, 5, 5, 5])
    cb = torch.randn(4375, 5)
    with pytest.raises(ValueError, match=r"\[0, 4375\)"):
        vqd.vq_decode(ids, w, b, (8, 8), 4, codebook=cb)


@needs_cpu_ext
def test_bad_shapes_and_dtypes():
    levels = (7, 5, 5, 5, 5)
    ids = torch.randint(0, 4375, (2, 64))
    w, b = _params(4, 4, 5)
    with pytest.raises(ValueError, match=r"ids must be \(B, 64\) for grid 8x8"):
        vqd.vq_decode(ids[:, :60], w, b, (8, 8), 4, levels)
    with pytest.raises(ValueError, match=r"ids must be"):
        vqd.vq_decode(ids.reshape(-1), w, b, (8, 8), 4, levels)
    with pytest.raises(ValueError, match=r"weight must be \(C\*4\*4, 5\)"):
        vqd.vq_decode(ids, w[:, :4], b, (8, 8), 4, levels)
    with pytest.raises(ValueError, match=r"weight must be"):
        vqd.vq_decode(ids, w[:10], b[:10], (8, 8), 4, levels)
    with pytest.raises(ValueError, match=r"bias must be \(64,\)"):
        vqd.vq_decode(ids, w, b[:5], (8, 8), 4, levels)
    with pytest.raises(TypeError, match=r"int32/int64"):
        vqd.vq_decode(ids.float(), w, b, (8, 8), 4, levels)
    with pytest.raises(TypeError, match=r"weight must be float"):
        vqd.vq_decode(ids, w.double(), b.double(), (8, 8), 4, levels)
    with pytest.raises(ValueError, match=r"exactly one of levels"):
        vqd.vq_decode(ids, w, b, (8, 8), 4, levels, codebook=torch.randn(4375, 5))
    with pytest.raises(ValueError, match=r"levels must all be >= 2"):
        vqd.vq_decode(ids, w, b, (8, 8), 4, (7, 5, 5, 5, 1))


@needs_cpu_ext
def test_empty_batch():
    w, b = _params(4, 4, 5)
    out = vqd.vq_decode(torch.zeros(0, 64, dtype=torch.long), w, b, (8, 8), 4, (7, 5, 5, 5, 5))
    assert out.shape == (0, 4, 32, 32)


def test_fallback_warns_when_extension_missing(monkeypatch):
    monkeypatch.setattr(vqd, "_load_ext", lambda kind="cpu": None)
    monkeypatch.setattr(vqd, "_WARNED", set())
    levels = (7, 5, 5, 5, 5)
    ids = torch.randint(0, 4375, (2, 64))
    w, b = _params(4, 4, 5)
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        out = vqd.vq_decode(ids, w, b, (8, 8), 4, levels)
    torch.testing.assert_close(out, vqd.vq_decode_reference(ids, w, b, (8, 8), 4, levels), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per call
        vqd.vq_decode(ids, w, b, (8, 8), 4, levels)


def test_loader_reports_missing_module(monkeypatch):
    monkeypatch.setattr(vqd, "_EXTS", {})
    monkeypatch.setattr(vqd, "_EXT_ERRS", {})
    assert vqd._load_ext("nonexistent_kind") is None
    ok, msg = vqd.extension_available("nonexistent_kind")
    assert not ok and "not built" in msg


@cuda_only()
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_cuda_parity(shape, id_dtype):
    cu = vqd._load_ext("cuda")
    if cu is None:
        pytest.skip(f"_vq_cuda not built ({vqd.extension_available('cuda')[1]})")
    B, gh, gw, p, C = shape
    for levels in [(7, 5, 5, 5, 5), (8, 5, 5, 5)]:
        ids = torch.randint(0, math.prod(levels), (B, gh * gw), dtype=id_dtype)
        w, b = _params(C, p, len(levels))
        ref = vqd.vq_decode_reference(ids, w, b, (gh, gw), p, levels)
        out = vqd.vq_decode(ids.cuda(), w.cuda(), b.cuda(), (gh, gw), p, levels)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-6)
        codes = cu.fsq_codes(ids.cuda(), list(levels))
        assert torch.equal(codes.cpu(), fsq_indices_to_codes(ids, levels))
    cb = torch.randn(50, 20) * 0.3  # wider than the register path
    ids = torch.randint(0, 50, (B, gh * gw), dtype=id_dtype)
    w, b = _params(C, p, 20)
    ref = vqd.vq_decode_reference(ids, w, b, (gh, gw), p, codebook=cb)
    out = vqd.vq_decode(ids.cuda(), w.cuda(), b.cuda(), (gh, gw), p, codebook=cb.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        w16, b16 = w.to(dtype), b.to(dtype)
        out = vqd.vq_decode(ids.cuda(), w16.cuda(), b16.cuda(), (gh, gw), p, codebook=cb.cuda())
        ref = vqd.vq_decode_reference(ids, w16, b16, (gh, gw), p, codebook=cb)
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=5e-2)


@cuda_only()
def test_cuda_bad_ids():
    if vqd._load_ext("cuda") is None:
        pytest.skip("_vq_cuda not built")
    ids = torch.randint(0, 4375, (2, 64), device="cuda")
    ids[0, 3] = 4375
    w, b = _params(4, 4, 5, device="cuda")
    with pytest.raises(ValueError, match=r"\[0, 4375\)"):
        vqd.vq_decode(ids, w, b, (8, 8), 4, (7, 5, 5, 5, 5))
    ids[0, 3] = -1
    with pytest.raises(ValueError, match=r"got \[-1, "):
        vqd.vq_decode(ids, w, b, (8, 8), 4, (7, 5, 5, 5, 5))
