"""Split-K decode attention with a group-shared prefix (kernels/decode_attention.py) vs the materialised
reference, plus the engine's eager/sdpa paths vs the same reference. fp32 atol 2e-5; bf16 atol 2e-2
(bf16 P@V operands). Shapes cover MHA/GQA, L=1 decode and L=8 action chunks, ragged prefix lengths,
several key splits and empty splits."""
import pytest
import torch

from vla_rft_engine.engine.attention import eager_attention, sdpa_attention
from vla_rft_engine.kernels.decode_attention import decode_attention, decode_attention_reference, merge_partials

CASES = [  # G, N, L, H, HKV, D, P, S, s0, lens
    (1, 1, 1, 2, 2, 16, 20, 8, 0, [20]),
    (2, 3, 1, 4, 2, 16, 37, 20, 5, [37, 11]),
    (2, 2, 8, 4, 4, 32, 24, 40, 17, [3, 24]),
    (3, 4, 1, 4, 1, 16, 50, 30, 29, [50, 1, 33]),
]


def _make(G, N, L, H, HKV, D, P, S, dtype):
    B = G * N
    return (torch.randn(B, L, H, D).to(dtype), torch.randn(G, HKV, P, D).to(dtype), torch.randn(G, HKV, P, D).to(dtype),
            torch.randn(B, HKV, S, D).to(dtype), torch.randn(B, HKV, S, D).to(dtype))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES)
def test_triton_decode_attention(case, dtype, tol):
    G, N, L, H, HKV, D, P, S, s0, lens = case
    q, pk, pv, sk, sv = _make(G, N, L, H, HKV, D, P, S, dtype)
    lens = torch.tensor(lens)
    ref = decode_attention_reference(q.float(), pk.float(), pv.float(), lens, sk.float(), sv.float(), s0)
    out = decode_attention(q, pk, pv, lens, sk, sv, s0, split_size=16, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    out_t = decode_attention(q, pk, pv, lens, sk, sv, torch.tensor(s0), split_size=32, block_n=16)  # device-scalar s0
    torch.testing.assert_close(out_t.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("fn", [eager_attention, sdpa_attention])
@pytest.mark.parametrize("case", CASES)
def test_engine_torch_backends(fn, case):
    G, N, L, H, HKV, D, P, S, s0, lens = case
    q, pk, pv, sk, sv = _make(G, N, L, H, HKV, D, P, S, torch.float32)
    lens = torch.tensor(lens)
    ref = decode_attention_reference(q, pk, pv, lens, sk, sv, s0)
    torch.testing.assert_close(fn(q, pk, pv, lens, sk, sv, torch.tensor(s0), s0 + L), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fn(q, pk, pv, lens, sk, sv, torch.tensor(s0), None), ref, atol=2e-5, rtol=2e-5)


def test_group_prefix_equals_repeated_prompt():
    """Sharing one prefix across N samples == N copies of the prefix as separate groups."""
    G, N, L, H, HKV, D, P, S, s0 = 2, 3, 1, 4, 2, 16, 21, 10, 4
    q, pk, pv, sk, sv = _make(G, N, L, H, HKV, D, P, S, torch.float32)
    lens = torch.tensor([21, 9])
    shared = decode_attention(q, pk, pv, lens, sk, sv, s0, split_size=16, block_n=16)
    rep = decode_attention(q, pk.repeat_interleave(N, 0), pv.repeat_interleave(N, 0), lens.repeat_interleave(N),
                           sk, sv, s0, split_size=16, block_n=16)
    torch.testing.assert_close(shared, rep, atol=1e-6, rtol=1e-6)


def test_merge_partials_ignores_empty_splits():
    o = torch.randn(1, 1, 3, 2, 4)
    lse = torch.tensor([[[[0.5, float("-inf")], [float("-inf"), float("-inf")], [0.5, 1.0]]]])
    out = merge_partials(o, lse)
    torch.testing.assert_close(out[0, 0, 0], (o[0, 0, 0, 0] + o[0, 0, 2, 0]) / 2)
    torch.testing.assert_close(out[0, 0, 1], o[0, 0, 2, 1])
