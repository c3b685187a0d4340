"""Fused rotary + KV-cache write (kernels/rotary_kv.py) vs reference, fp32 (atol 1e-5) and bf16 (atol 3e-2:
the kernel rotates in fp32 and rounds once, the reference rounds each bf16 product). Ragged write slots."""
import pytest
import torch

from vla_rft_engine.kernels.rotary_kv import rotary_kv, rotary_kv_reference
from vla_rft_engine.models.world_model import WorldModelConfig, apply_rotary, rotary_tables


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B,L,H,HKV,D,S", [(1, 1, 2, 2, 16, 4), (3, 5, 4, 2, 32, 12), (2, 8, 4, 1, 16, 20)])
def test_rotary_kv_matches_reference(B, L, H, HKV, D, S, dtype, tol):
    q, k, v = (torch.randn(B, L, h, D).to(dtype) for h in (H, HKV, HKV))
    ang = torch.rand(B, L, D // 2) * 6
    cos, sin = ang.cos(), ang.sin()
    pos = torch.randint(0, S - L + 1, (B,))
    ck, cv = torch.zeros(B, HKV, S, D, dtype=dtype), torch.zeros(B, HKV, S, D, dtype=dtype)
    rk, rv = ck.clone(), cv.clone()
    qo = rotary_kv(q, k, v, cos, sin, ck, cv, pos)
    qr = rotary_kv_reference(q, k, v, cos, sin, rk, rv, pos)
    torch.testing.assert_close(qo.float(), qr.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ck.float(), rk.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(cv, rv, atol=0, rtol=0)  # v is copied, not computed
    assert (ck.abs().sum(-1) > 0).sum() == B * L * HKV  # exactly the chunk's slots were written


def test_rotary_kv_into_layer_view_of_stacked_cache():
    cfg = WorldModelConfig.preset("tiny")
    cos_t, sin_t = rotary_tables(cfg)
    B, L, D = 2, 3, cfg.head_dim
    pos = torch.tensor([4, 9])
    positions = pos[:, None] + torch.arange(L)
    q, k, v = torch.randn(B, L, 4, D), torch.randn(B, L, 2, D), torch.randn(B, L, 2, D)
    big_k, big_v = torch.zeros(3, B, 2, 16, D), torch.zeros(3, B, 2, 16, D)
    qo = rotary_kv(q, k, v, cos_t[positions], sin_t[positions], big_k[1], big_v[1], pos)
    torch.testing.assert_close(qo, apply_rotary(q, cos_t[positions], sin_t[positions]), atol=1e-5, rtol=1e-5)
    assert big_k[0].abs().sum() == 0 and big_k[2].abs().sum() == 0
    torch.testing.assert_close(big_k[1, 1, :, 9:12].transpose(0, 1), apply_rotary(k, cos_t[positions], sin_t[positions])[1],
                               atol=1e-5, rtol=1e-5)
