"""Fused RMSNorm (kernels/rmsnorm.py) vs its PyTorch reference under TRITON_INTERPRET=1.
Tolerances: fp32 atol 1e-5; bf16 atol/rtol 1.6e-2 (one bf16 ulp: the kernel rounds once, the reference twice)."""
import pytest
import torch

from vla_rft_engine.kernels.rmsnorm import rmsnorm, rmsnorm_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape", [(1, 16), (3, 5, 64), (7, 100)])
def test_rmsnorm_matches_reference(shape, dtype, tol):
    x = (torch.randn(shape) * 3).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    out, ref = rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_rmsnorm_strided_rows():
    x = torch.randn(4, 96)[:, :48]  # row stride 96
    w = torch.randn(48)
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)
