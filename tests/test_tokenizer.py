"""FSQ/VQ round trips, the mixed-radix format of REFERENCE.md, and the tokenizer's token path."""
import itertools

import pytest
import torch

from vla_rft_engine.models.quantizers import FSQ, VQ, fsq_codes_to_indices, fsq_indices_to_codes
from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
from vla_rft_engine.ops.vq_decode import vq_decode_reference


@pytest.mark.parametrize("levels", [(7, 5, 5, 5, 5), (8, 5, 5, 5), (3, 4, 6)])
def test_fsq_index_digits_match_reference_format(levels):
    n = 1
    for L in levels:
        n *= L
    ids = torch.arange(n)
    codes = fsq_indices_to_codes(ids, levels)
    # REFERENCE.md: digits in mixed radix, basis = cumulative product; d -> (d - L//2) / (L//2)
    for i in [0, 1, n // 3, n - 1]:
        rem, expect = i, []
        for L in levels:
            d = rem % L
            rem //= L
            expect.append((d - L // 2) / (L // 2))
        assert codes[i].tolist() == pytest.approx(expect, rel=1e-6)
    assert torch.equal(fsq_codes_to_indices(codes, levels), ids)  # every code round-trips
    assert len({tuple(c) for c in codes.tolist()}) == n


@pytest.mark.parametrize("levels", [(7, 5, 5, 5, 5), (8, 5, 5, 5)])
def test_fsq_quantize_roundtrip_and_straight_through(levels):
    q = FSQ(levels)
    z = (torch.randn(64, len(levels)) * 3).requires_grad_()
    codes, ids = q(z)
    assert ids.min() >= 0 and ids.max() < q.codebook_size
    assert torch.equal(q.indices_to_codes(ids), codes.detach())
    # each code is the rounded bounded latent, normalised per level
    half = torch.tensor([L // 2 for L in levels], dtype=torch.float32)
    torch.testing.assert_close(codes.detach(), torch.round(q.bound(z.detach())) / half)
    codes.sum().backward()  # straight-through: gradient flows to z
    assert z.grad is not None and z.grad.abs().sum() > 0
    # every level is reachable
    big = FSQ(levels)(torch.linspace(-6, 6, 2001)[:, None].expand(-1, len(levels)).contiguous())[0]
    for j, L in enumerate(levels):
        assert big[:, j].unique().numel() == L


def test_vq_nearest_and_roundtrip():
    vq = VQ(num_codes=16, dim=4)
    z = vq.codebook.detach()[torch.tensor([3, 7, 7, 0])] + 1e-4
    q, ids = vq(z)
    assert ids.tolist() == [3, 7, 7, 0]
    assert torch.allclose(vq.indices_to_codes(ids), q.detach(), atol=1e-3)
    assert vq.last_loss.item() >= 0


@pytest.mark.parametrize("quantizer,patch", [("fsq", 2), ("vq", 2), ("fsq", 4)])
def test_tokenizer_token_path_equals_training_path(quantizer, patch):
    cfg = TokenizerConfig(image_size=32, downsample=4, channels=[8, 16, 16], latent_channels=16, dyn_patch=patch,
                          quantizer=quantizer, vq_codes=64, vq_dim=4)
    tok = VisualTokenizer(cfg).eval()
    ctx, fr = torch.rand(3, 3, 32, 32), torch.rand(3, 2, 3, 32, 32)
    rc, rd, _ = tok(ctx, fr)
    cid = tok.encode_context(ctx)
    did = torch.stack([tok.encode_dynamics(fr[:, t], ctx) for t in range(2)], 1)
    assert cid.shape == (3, 64) and did.shape == (3, 2, (8 // patch) ** 2)
    assert tok.layout.context_tokens == 64 and tok.layout.dynamics_tokens == (8 // patch) ** 2
    torch.testing.assert_close(tok.decode(cid, did), rd.clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tok.decode_context(cid), rc.clamp(0, 1), atol=1e-5, rtol=0)
    # encode_clip (context encoded once per clip) gives the same ids as the per-frame calls
    cid2, did2 = tok.encode_clip(torch.cat([ctx[:, None], fr], 1))
    assert torch.equal(cid2, cid) and torch.equal(did2[:, 1:], did)
    assert torch.equal(did2[:, 0], tok.encode_dynamics(ctx, ctx))


def test_tokenizer_errors_and_save_load(tmp_path):
    cfg = TokenizerConfig(image_size=32, channels=[8, 16, 16], latent_channels=16)
    tok = VisualTokenizer(cfg).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.encode_context(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        tok.encode_context(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    cid = tok.encode_context(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(cid, torch.full((2, 1, 16), 4375))
    with pytest.raises(ValueError, match="dynamics_ids"):
        tok.decode(cid, torch.zeros(2, 1, 15, dtype=torch.long))
    tok.save(tmp_path / "tok")
    tok2 = VisualTokenizer.load(tmp_path / "tok")
    did = torch.randint(0, 4375, (2, 2, 16))
    assert torch.equal(tok2.decode(cid, did), tok.decode(cid, did))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt"):
        VisualTokenizer.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="not found"):
        VisualTokenizer.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="divisible|channel"):
        VisualTokenizer(TokenizerConfig(image_size=32, downsample=8, channels=[8, 16, 16]))


def test_vq_decode_reference_is_plain_conv_and_linear():
    """The fused-decode semantics equal a 1x1 conv (p = 1) and a per-patch linear + pixel layout (p > 1)."""
    levels = (7, 5, 5, 5, 5)
    ids = torch.randint(0, 4375, (2, 16))
    W, b = torch.randn(6, 5), torch.randn(6)
    out = vq_decode_reference(ids, W, b, (4, 4), 1, levels=levels)
    codes = fsq_indices_to_codes(ids, levels).view(2, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(codes, W[:, :, None, None], b))
    W2, b2 = torch.randn(3 * 4, 5), torch.randn(12)
    out2 = vq_decode_reference(ids, W2, b2, (4, 4), 2, levels=levels)
    y = fsq_indices_to_codes(ids, levels) @ W2.t() + b2  # (2, 16, 12) with index c*4 + u*2 + v
    for bi, (i, j, c, u, v) in itertools.product(range(2), itertools.product(range(4), range(4), range(3), range(2), range(2))):
        assert out2[bi, c, i * 2 + u, j * 2 + v] == y[bi, i * 4 + j, c * 4 + u * 2 + v]


def test_tokenizer_weights_are_safetensors_and_legacy_files_still_load(tmp_path):
    from vla_rft_engine.config import BadFileError
    from vla_rft_engine.config import to_dict
    tok = VisualTokenizer(TokenizerConfig(image_size=32, channels=[8, 16, 16], latent_channels=16)).eval()
    tok.save(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["tokenizer.safetensors", "tokenizer_config.yaml"]
    (tmp_path / "old").mkdir()  # the pre-safetensors layout: one torch file, read as plain data
    torch.save({"config": to_dict(tok.cfg), "state_dict": tok.state_dict(), "format": "vla-rft-tokenizer/1"},
               tmp_path / "old" / "tokenizer.pt")
    for d in ("new", "old"):
        sd = VisualTokenizer.load(tmp_path / d).state_dict()
        assert all(torch.equal(sd[k], v) for k, v in tok.state_dict().items()), d
    (tmp_path / "new" / "tokenizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadFileError, match="tokenizer.safetensors is corrupt"):
        VisualTokenizer.load(tmp_path / "new")


@pytest.mark.parametrize("ci,co,h,w", [(8, 4, 5, 7), (16, 8, 8, 8), (3, 16, 1, 2)])
def test_up_conv_equals_conv_of_the_upsampled_input(ci, co, h, w):
    """Decoder.frames' nearest-2x upsample + 3x3 conv on the low-res input, against the two torch ops."""
    from vla_rft_engine.models.tokenizer import _up_conv
    torch.manual_seed(ci + co + h)
    conv = torch.nn.Conv2d(ci, co, 3, padding=1)
    x = torch.randn(3, ci, h, w)
    ref = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    with torch.no_grad():
        got = _up_conv(x.contiguous(memory_format=torch.channels_last), conv)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_up_conv(x, conv), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_cond", [1, 5])
def test_encoder_frames_equals_forward_with_repeated_cond(per_cond):
    """The encoder's inference path (split 1x1 mix, cond once per context frame, channels-last) gives the
    module's forward on per_cond copies of each context's features; encode_clip's ids are the module path's."""
    cfg = TokenizerConfig(image_size=32, downsample=4, channels=[8, 16, 32], latent_channels=16, dyn_patch=2)
    tok = VisualTokenizer(cfg).eval()
    torch.manual_seed(per_cond)
    for p in tok.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    ctx, fr = torch.rand(3, 3, 32, 32), torch.rand(3 * per_cond, 3, 32, 32)
    _, feats = tok.ctx_encoder(ctx * 2 - 1)
    ref, _ = tok.dyn_encoder(fr * 2 - 1, [f.repeat_interleave(per_cond, 0) for f in feats])
    got = tok.dyn_encoder.frames(fr * 2 - 1, feats, per_cond)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref.detach(), atol=2e-5, rtol=1e-5)
    clip = torch.cat([ctx[:, None], fr.view(3, per_cond, 3, 32, 32)], 1)
    with torch.enable_grad():  # the module path (training's)
        slow = tok._encode_dynamics(clip.flatten(0, 1), tok._encode_context(ctx)[2], per_cond + 1)[1]
    assert torch.equal(tok.encode_clip(clip)[1], slow.view(3, per_cond + 1, -1))


@pytest.mark.parametrize("per_cond", [1, 5])
def test_decoder_frames_equals_forward_with_repeated_cond(per_cond):
    """The inference path (split 1x1 mix, cond once per context, up-convs on the low-res input, channels-last)
    gives the module's forward on per_cond copies of each context's features."""
    cfg = TokenizerConfig(image_size=32, downsample=4, channels=[8, 16, 32], latent_channels=16, dyn_patch=2)
    tok = VisualTokenizer(cfg).eval()
    torch.manual_seed(per_cond)
    for p in tok.parameters():  # away from init, so every weight slice matters
        p.data.add_(torch.randn_like(p) * 0.05)
    zc, zd = torch.randn(3, 16, 8, 8), torch.randn(3 * per_cond, 16, 8, 8)
    _, feats = tok.ctx_decoder(zc)
    ref, _ = tok.dyn_decoder(zd, [f.repeat_interleave(per_cond, 0) for f in feats])
    got = tok.dyn_decoder.frames(zd, feats, per_cond)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref.detach(), atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # _decode_latents takes the inference path without grad, the module with it
        fast = tok._decode_latents(zc, zd, per_cond)[1]
    torch.testing.assert_close(fast, tok._decode_latents(zc, zd, per_cond)[1].detach(), atol=2e-5, rtol=1e-5)
