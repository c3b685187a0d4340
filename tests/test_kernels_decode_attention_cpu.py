"""kernels/decode_attention_cpu.py: the C++ loop and the torch reference, each against attention written out per
(row, head) with torch's scaled_dot_product_attention over [the group's valid prefix | the row's filled suffix]."""
import pytest
import torch
import torch.nn.functional as F

from vla_rft_engine.kernels.decode_attention_cpu import (decode_attention_cpu, decode_attention_cpu_reference,
                                                         extension_available)

needs_ext = pytest.mark.skipif(not extension_available(), reason="vla_rft_engine._attn_cpu not built")

# G, N, H, Hkv, D, P, Smax, S, ragged prefix lengths (None = all P)
SHAPES = [
    (2, 17, 4, 4, 64, 40, 30, 30, None),  # the CPU RFT layout (rep 1), every suffix slot filled
    (2, 3, 4, 4, 64, 33, 50, 1, [33, 20]),  # first decode step, ragged prompts
    (1, 5, 8, 2, 128, 17, 23, 13, None),  # GQA rep 4, D = 128
    (3, 2, 6, 3, 32, 9, 11, 7, [9, 1, 4]),  # D without a specialisation (runtime D), rep 2, a 1-token prompt
    (2, 4, 2, 1, 48, 6, 9, 9, [0, 6]),  # a group with no prefix at all
    (4, 9, 4, 2, 16, 21, 19, 6, None),  # the quickstart's tiny world model (D = 16, rep 2)
    (1, 7, 4, 1, 64, 12, 20, 17, None),  # 7 (row, kv head) blocks: 4 side by side, then 3 (1 thread)
    (1, 5, 2, 1, 32, 8, 10, 10, [3]),  # 5 blocks: 4 side by side, then 1 (1 thread)
]


def _naive(q, pk, pv, plens, sk, sv, S):
    if q.dim() == 4:  # a chunk of L: position l sees the suffix up to its own slot, S - L + 1 + l
        return torch.stack([_naive(q[:, l], pk, pv, plens, sk, sv, S - q.shape[1] + 1 + l) for l in range(q.shape[1])], 1)
    B, H, D = q.shape
    G, HKV = pk.shape[:2]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        g = b // (B // G)
        for h in range(H):
            kh = h // (H // HKV)
            k = torch.cat([pk[g, kh, :plens[g]], sk[b, kh, :S]]).double()
            v = torch.cat([pv[g, kh, :plens[g]], sv[b, kh, :S]]).double()
            out[b, h] = F.scaled_dot_product_attention(q[b, h][None].double(), k, v)[0]
    return out


def _inputs(G, N, H, HKV, D, P, Smax, ragged, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = G * N
    q = torch.randn(B, H, D, generator=g)
    pk, pv = torch.randn(2, G, HKV, P, D, generator=g) * 1.5
    sk, sv = torch.randn(2, B, HKV, Smax, D, generator=g) * 1.5
    plens = torch.tensor(ragged if ragged is not None else [P] * G, dtype=torch.int64)
    return [t.to(dtype) for t in (q, pk, pv)] + [plens] + [t.to(dtype) for t in (sk, sv)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_sdpa_per_row(shape, threads):
    *dims, S, ragged = shape
    q, pk, pv, plens, sk, sv = _inputs(*dims, ragged, torch.float32)
    from vla_rft_engine.kernels import decode_attention_cpu as mod
    got = mod._ext.decode_attention(q, *mod._ext.pack_prefix(pk, pv, plens), plens, sk, sv, S)  # the C++ op itself
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(decode_attention_cpu(q, pk, pv, plens, sk, sv, S), got, atol=0, rtol=0)
    torch.testing.assert_close(got.double(), _naive(q, pk, pv, plens, sk, sv, S), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_sdpa_per_row(shape, dtype):
    *dims, S, ragged = shape
    q, pk, pv, plens, sk, sv = _inputs(*dims, ragged, dtype)
    got = decode_attention_cpu_reference(q, pk, pv, plens, sk, sv, S)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.double(), _naive(q, pk, pv, plens, sk, sv, S), **tol)


# G, N, H, Hkv, D, P, Smax, S, ragged, L
CHUNKS = [(2, 17, 4, 4, 64, 40, 30, 15, None, 8),  # the CPU RFT's action step: frame end + 7 action tokens
          (2, 3, 4, 2, 64, 33, 20, 7, [33, 5], 7),  # each row's own a_0 right after the prefill (S = L), GQA
          (1, 4, 6, 3, 48, 9, 12, 12, [0], 3),  # runtime D, no prefix
          (4, 9, 4, 2, 16, 21, 19, 10, None, 2)]  # the tiny world model


@pytest.mark.parametrize("shape", CHUNKS)
def test_chunk_is_causal_inside_and_matches_sdpa(shape, threads):
    """A chunk of L tokens per row: position l sees the prefix and the suffix up to its own slot. The C++ op (where
    built) and the reference against per-(row, position, head) attention in float64."""
    *dims, S, ragged, L = shape
    q, pk, pv, plens, sk, sv = _inputs(*dims, ragged, torch.float32)
    qc = torch.randn(q.shape[0], L, *q.shape[1:], generator=torch.Generator().manual_seed(5))
    want = _naive(qc, pk, pv, plens, sk, sv, S)
    sk[:, :, S:], sv[:, :, S:] = float("nan"), float("nan")  # past the chunk: never read
    torch.testing.assert_close(decode_attention_cpu_reference(qc, pk, pv, plens, sk, sv, S).double(), want,
                               atol=2e-6, rtol=2e-5)
    if extension_available():
        got = decode_attention_cpu(qc, pk, pv, plens, sk, sv, S)
        assert got.shape == qc.shape
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)
        from vla_rft_engine.kernels import decode_attention_cpu as mod
        with pytest.raises(RuntimeError, match=rf"S must be in \[L = {L}, Smax"):
            mod._ext.decode_attention(qc, *mod._ext.pack_prefix(pk, pv, plens), plens, sk, sv, L - 1)


@needs_ext
def test_cpp_reads_only_the_valid_slots():
    """Prefix padding and suffix slots past S hold NaN: a read of either would poison the output."""
    q, pk, pv, plens, sk, sv = _inputs(2, 3, 4, 2, 64, 12, 20, [12, 5], torch.float32)
    ref = decode_attention_cpu(q, pk, pv, plens, sk, sv, 9)
    pk[1, :, 5:], pv[1, :, 5:] = float("nan"), float("nan")
    sk[:, :, 9:], sv[:, :, 9:] = float("nan"), float("nan")
    got = decode_attention_cpu(q, pk, pv, plens, sk, sv, 9)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@needs_ext
def test_cpp_takes_strided_queries_and_refuses_bad_input():
    q, pk, pv, plens, sk, sv = _inputs(1, 2, 4, 4, 64, 8, 10, None, torch.float32)
    wide = torch.cat([q, torch.randn_like(q)], 1)[:, :4]  # a non-contiguous view, as the decoder passes it
    torch.testing.assert_close(decode_attention_cpu(wide, pk, pv, plens, sk, sv, 10),
                               decode_attention_cpu(q, pk, pv, plens, sk, sv, 10), atol=0, rtol=0)
    from vla_rft_engine.kernels import decode_attention_cpu as mod
    kp, vp = mod._ext.pack_prefix(pk, pv, plens)
    assert kp.shape == (1, 4, 1, 64, 32) and vp.shape == (1, 4, 2, 32, 32)  # P = 8 padded to one 32-slot panel
    with pytest.raises(RuntimeError, match=r"S must be in \[L = 1, Smax = 10\], got 11"):
        mod._ext.decode_attention(q, kp, vp, plens, sk, sv, 11)
    with pytest.raises(RuntimeError, match=r"plens must be in \[0, P = 8\], got 9"):
        mod._ext.pack_prefix(pk, pv, torch.tensor([9]))
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        mod._ext.decode_attention(q.double(), kp, vp, plens, sk, sv, 3)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        mod._ext.decode_attention(q[:, :3].contiguous(), kp, vp, plens, sk, sv, 3)
    with pytest.raises(RuntimeError, match="shapes do not agree"):  # a prefix packed for another head size
        mod._ext.decode_attention(q, *mod._ext.pack_prefix(pk[..., :32].contiguous(), pv[..., :32].contiguous(),
                                                           plens), plens, sk, sv, 3)


def test_low_precision_takes_the_reference():
    q, pk, pv, plens, sk, sv = _inputs(2, 3, 4, 2, 64, 10, 12, [10, 4], torch.bfloat16)
    torch.testing.assert_close(decode_attention_cpu(q, pk, pv, plens, sk, sv, 7),
                               decode_attention_cpu_reference(q, pk, pv, plens, sk, sv, 7), atol=0, rtol=0)
