"""kernels/decode_layer_cpu.py: the C++ layer (fp32) against the torch reference run in float64 on the same inputs,
the output and the suffix cache slots it writes; the reference itself against the model's own layer."""
import pytest
import torch

from vla_rft_engine.kernels.decode_attention_cpu import extension_available, pack_prefix
from vla_rft_engine.kernels.decode_layer_cpu import decode_layer_cpu, decode_layer_cpu_reference, layer_weights

needs_ext = pytest.mark.skipif(not extension_available(), reason="vla_rft_engine._attn_cpu not built")

# G, N, L, H, Hkv, D, dim, I, P, Smax, s0, ragged prefix lengths (None = all P)
SHAPES = [
    (2, 17, 1, 4, 4, 64, 256, 96, 40, 30, 10, None),  # the CPU RFT layout, one token per row
    (2, 3, 8, 4, 4, 64, 64, 48, 33, 40, 20, [33, 20]),  # a chunk of 8 (frame end + action), ragged prompts
    (1, 5, 1, 8, 2, 32, 96, 64, 17, 23, 0, None),  # GQA rep 4, the first suffix slot
    (3, 2, 2, 6, 3, 16, 48, 40, 9, 11, 5, [9, 1, 4]),  # D = 16 (the tiny preset), rep 2
    (2, 4, 1, 2, 1, 48, 96, 32, 6, 9, 3, [0, 6]),  # D without a specialisation, a group with no prefix
]


def _inputs(G, N, L, H, HKV, D, dim, I, P, Smax, ragged, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = G * N
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
    ws = (1 + 0.1 * r(dim), r((H + 2 * HKV) * D, dim, scale=dim ** -0.5), r(dim, H * D, scale=(H * D) ** -0.5),
          1 + 0.1 * r(dim), r(2 * I, dim, scale=dim ** -0.5), r(dim, I, scale=I ** -0.5))
    ang = r(G, Smax, D // 2)
    caches = (r(G, HKV, P, D), r(G, HKV, P, D), r(B, HKV, Smax, D), r(B, HKV, Smax, D))
    plens = torch.tensor(ragged if ragged is not None else [P] * G, dtype=torch.int64)
    return r(B, L, dim), ws, ang.cos(), ang.sin(), caches, plens


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_layer_matches_float64_reference(shape, threads):
    *dims, s0, ragged = shape
    G, N, L, H, HKV, D, dim, I, P, Smax = dims
    x, ws, cos, sin, (pk, pv, sk, sv), plens = _inputs(*dims, ragged)
    w = layer_weights(*ws)
    assert w.packed is not None
    want_sk, want_sv = sk.double(), sv.double()
    w64 = layer_weights(*[t.double() for t in ws])
    want = decode_layer_cpu_reference(x.double(), w64, cos.double(), sin.double(), pk.double(), pv.double(), plens,
                                      want_sk, want_sv, s0, H, 1e-6)
    before_sk = sk.clone()
    got = decode_layer_cpu(x, w, cos, sin, pk, pv, plens, sk, sv, s0, H, 1e-6, pack_prefix(pk, pv, plens))
    assert got.shape == (G * N, L, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sk.double(), want_sk, atol=1e-5, rtol=1e-5)  # this step's rotated keys ...
    torch.testing.assert_close(sv.double(), want_sv, atol=1e-5, rtol=1e-5)  # ... and values, in their slots
    untouched = torch.ones(Smax, dtype=torch.bool)
    untouched[s0:s0 + L] = False
    assert torch.equal(sk[:, :, untouched], before_sk[:, :, untouched])


def test_reference_is_the_model_layer():
    """The reference (fused q/k/v and gate/up weights, rotary tables per suffix slot, attention over [prefix |
    suffix]) equals the world model's own Block over the same tokens: prompt + step, full causal attention."""
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    torch.manual_seed(0)
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", n_layer=1, attn_backend="eager")), std=0.05).eval()
    cfg, blk = wm.config, wm.layers[0]
    B, P, S0, L = 2, 9, 4, 3
    hidden = torch.randn(B, P + S0 + L, cfg.dim)
    pos = torch.arange(P + S0 + L)
    with torch.no_grad():
        want = blk(hidden, *wm.rope(pos[None].expand(B, -1)), None)[:, P + S0:]  # causal over the whole sequence
        # the caches a rollout holds after the prompt (one group per row here) and S0 suffix tokens
        a = blk.attention
        h = blk.attention_norm(hidden)
        cos, sin = wm.rope(pos[None].expand(B, -1))
        k = a.wk(h).view(B, -1, cfg.n_kv_head, cfg.head_dim)
        from vla_rft_engine.models.world_model import apply_rotary
        k = apply_rotary(k, cos, sin).transpose(1, 2)
        v = a.wv(h).view(B, -1, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        sk, sv = torch.zeros(B, cfg.n_kv_head, S0 + L, cfg.head_dim), torch.zeros(B, cfg.n_kv_head, S0 + L, cfg.head_dim)
        sk[:, :, :S0], sv[:, :, :S0] = k[:, :, P:P + S0], v[:, :, P:P + S0]
        (wqkv, w13), = wm.fused_weights()
        w = layer_weights(blk.attention_norm.weight, wqkv, a.wo.weight, blk.ffn_norm.weight, w13,
                          blk.feed_forward.w2.weight)
        ang_cos, ang_sin = wm.rope(P + torch.arange(S0 + L)[None].expand(B, -1))
        got = decode_layer_cpu_reference(hidden[:, P + S0:], w, ang_cos, ang_sin, k[:, :, :P], v[:, :, :P],
                                          torch.full((B,), P), sk, sv, S0, cfg.n_head, cfg.rms_eps)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sk[:, :, S0:], k[:, :, P + S0:], atol=1e-6, rtol=1e-6)


@needs_ext
def test_cpp_layer_refuses_bad_input():
    from vla_rft_engine.kernels import decode_layer_cpu as mod
    x, ws, cos, sin, (pk, pv, sk, sv), plens = _inputs(1, 2, 1, 2, 1, 16, 32, 24, 5, 8, None)
    w = layer_weights(*ws)
    args = lambda **o: [o.get("x", x), w.attention_norm, *w.packed[:2], w.ffn_norm, *w.packed[2:], o.get("cos", cos),
                        sin, *pack_prefix(pk, pv, plens), plens, sk, sv, o.get("s0", 0), o.get("n_head", 2), 1e-6]
    with pytest.raises(RuntimeError, match=r"slots s0 \+ L = 9 within Smax = 8"):
        mod._ext.decode_layer(*args(s0=8))
    with pytest.raises(RuntimeError, match="weights must be linear_cpu packs"):
        mod._ext.decode_layer(*args(n_head=1, x=x.clone()))
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        mod._ext.decode_layer(*args(cos=cos[:, :, :4].contiguous()))
    with pytest.raises(RuntimeError, match="n_head must be positive"):
        mod._ext.decode_layer(*args(n_head=-1))


def test_grad_tracked_input_takes_the_reference():
    """The C++ layer writes x through its pointer, which autograd would not see: with grad on and an x that
    requires it, the torch reference runs and x is left as it was."""
    x, ws, cos, sin, (pk, pv, sk, sv), plens = _inputs(1, 2, 1, 2, 1, 16, 32, 24, 5, 8, None)
    x.requires_grad_(True)
    x0 = x.detach().clone()
    out = decode_layer_cpu(x, layer_weights(*ws), cos, sin, pk, pv, plens, sk, sv, 0, 2, 1e-6,
                           pack_prefix(pk, pv, plens))
    assert out.grad_fn is not None and torch.equal(x.detach(), x0)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
