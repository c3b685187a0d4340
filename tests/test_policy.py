"""The VLA policy: encoders (built-in and HF adapter), Sigma Net bounds/init, flow loss, input checks."""
import math

import pytest
import torch

from vla_rft_engine.models.action_head import SigmaNet
from vla_rft_engine.models.encoders import HFVLMEncoder, LoRALinear, SmallEncoder
from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy, sample_beta

T, A, P = 8, 7, 8


def small_cfg(**kw):
    base = dict(action_dim=A, chunk_len=T, proprio_dim=P, z_dim=32, enc_channels=8, d_model=32, depth=1, heads=2,
                sigma_d_model=16, sigma_depth=1)
    base.update(kw)
    return PolicyConfig(**base)


def obs(B=2, size=32):
    img = torch.randint(0, 256, (B, size, size, 3), dtype=torch.uint8)
    return img, ["put the red block in the bowl", "push blue"][:B] * (B // 2 or 1), torch.randn(B, P)


def test_encoder_runs_once_per_start_state():
    pol = VLAPolicy(small_cfg())
    calls = []
    pol.encoder.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    img, instr, prop = obs(2)
    z, s = pol.encode(img, instr, prop), pol.normalize_proprio(prop)  # as rl/rft.py: encode once, then N samples
    out = pol.sample_sde(z, s, 16, generator=torch.Generator().manual_seed(0))
    assert calls == [2]  # one call, B rows, not B*N
    # v2 (default): the features (z_dim) then the instruction queries' raw x, y points (2 x 4 queries)
    assert out.chain.shape == (2, 16, 11, T, A) and z.shape == (2, 32 + 2 * 4) == (2, pol.encoder.z_dim)


def test_image_formats_agree():
    enc = SmallEncoder(P, z_dim=16, channels=8)
    img, instr, prop = obs(2)
    z1 = enc(img, instr, prop)
    z2 = enc(img.permute(0, 3, 1, 2).float() / 255.0, instr, prop)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
    assert z1.shape == (2, enc.z_dim) == (2, 16 + 8)
    with pytest.raises(ValueError, match="channels-first"):
        enc(img.float(), instr, prop)  # float HWC is ambiguous: rejected
    with pytest.raises(ValueError, match="batch mismatch"):
        enc(img, instr[:1], prop)
    # instruction words matter, word order does not (bag of words); token-id input works too
    z3 = enc(img, ["bowl the in block red the put", "push blue"], prop)
    torch.testing.assert_close(z1, z3)
    assert not torch.allclose(z1, enc(img, ["open the drawer", "push blue"], prop))
    assert enc(img, torch.tensor([[1, 2, -1], [3, -1, -1]]), prop).shape == (2, enc.z_dim)


def test_sigma_net_bounds_and_init():
    sn = SigmaNet(A, T, 16, P, d_model=16, depth=1, heads=2, sigma_min=0.01, sigma_max=0.5, sigma_init=0.03)
    z, s, a, tau = torch.randn(4, 16), torch.randn(4, P), torch.randn(4, T, A), torch.rand(4)
    torch.testing.assert_close(sn(z, s, a, tau), torch.full((4, T, A), 0.03), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        sn.out.weight.normal_(std=50.0)  # saturate: still inside the bounds
    sig = sn(z, s, a * 10, tau)
    assert sig.min() >= 0.01 * (1 - 1e-5) and sig.max() <= 0.5 * (1 + 1e-5)
    sn.reset_sigma(0.2)  # RFT's sigma_init: back to a constant std, whatever the trained weights were
    torch.testing.assert_close(sn(z, s, a, tau), torch.full((4, T, A), 0.2), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="strictly inside"):
        sn.reset_sigma(0.6)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        SigmaNet(A, T, 16, P, sigma_min=0.5, sigma_max=0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VLAPolicy(small_cfg(sigma_min=0.5, sigma_max=0.1))
    with pytest.raises(ValueError, match="sigma_init"):
        VLAPolicy(small_cfg(sigma_init=0.9))


def test_bad_inputs_raise():
    pol = VLAPolicy(small_cfg())
    img, instr, prop = obs(2)
    bad = prop.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="proprio holds NaN"):
        pol.encode(img, instr, bad)
    z = pol.encode(img, instr, prop)
    s = pol.normalize_proprio(prop)
    acts = torch.randn(2, T, A)
    bad = acts.clone()
    bad[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="actions holds NaN or Inf"):
        pol.flow_loss(z, s, bad)
    with pytest.raises(ValueError, match="action chunk"):
        pol.flow_loss(z, s, torch.randn(2, T - 1, A))
    zb = z.detach().clone()
    zb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="z holds NaN"):
        pol.flow_loss(zb, s, acts)
    with pytest.raises(ValueError, match="z must be"):
        pol.velocity(z[:, :5], s, acts, torch.rand(2))
    with pytest.raises(ValueError, match="encoder"):
        VLAPolicy(small_cfg(encoder="clip"))


def test_flow_loss_eq4_and_beta():
    pol = VLAPolicy(small_cfg())
    img, instr, prop = obs(2)
    z, s = pol.encode(img, instr, prop), pol.normalize_proprio(prop)
    a, eps, tau = torch.randn(2, T, A), torch.randn(2, T, A), torch.tensor([0.2, 0.9])
    a_tau = tau.view(2, 1, 1) * a + (1 - tau.view(2, 1, 1)) * eps
    want = (pol.velocity(z, s, a_tau, tau) - (a - eps)).pow(2).mean()
    torch.testing.assert_close(pol.flow_loss(z, s, a, tau=tau, noise=eps), want)
    t = sample_beta(1.0, 1.5, 200_000, torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 1 / 2.5) < 0.01 and t.min() >= 0 and t.max() <= 0.999
    t2 = sample_beta(1.0, 1.5, 10, torch.Generator().manual_seed(0))
    assert torch.equal(t2, sample_beta(1.0, 1.5, 10, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("alpha,beta", [(0.5, 2.0), (2.0, 0.5), (0.3, 0.3), (1.0, 1.5), (2.0, 5.0)])
def test_sample_beta_matches_the_beta_distribution(alpha, beta):
    """Two-sample KS test against torch.distributions.Beta, including shapes below 1 (unbounded density)."""
    n = 20_000
    ours = sample_beta(alpha, beta, n, torch.Generator().manual_seed(1)).double()
    torch.manual_seed(2)
    ref = torch.distributions.Beta(alpha, beta).sample((n,)).float().clamp(max=0.999).double()  # same cap
    grid = torch.cat([ours, ref]).sort().values
    ks = ((torch.searchsorted(ours.sort().values, grid, right=True) -
           torch.searchsorted(ref.sort().values, grid, right=True)).abs().max() / n).item()
    assert ks < 1.95 * (2 / n) ** 0.5, ks  # p < 0.001 critical value
    assert abs(ours.mean().item() - alpha / (alpha + beta)) < 0.01
    assert torch.equal(sample_beta(alpha, beta, 50, torch.Generator().manual_seed(3)),
                       sample_beta(alpha, beta, 50, torch.Generator().manual_seed(3)))  # the generator decides


def test_normalisation_roundtrip():
    pol = VLAPolicy(small_cfg())
    acts = torch.rand(50, T, A) * 3 - 1
    acts[..., 6] = 1.0  # a constant dim must not divide by zero
    pol.set_norm_stats(acts, torch.randn(50, P))
    n = pol.normalize_actions(acts)
    assert n.min() >= -1 - 1e-5 and n.max() <= 1 + 1e-5
    torch.testing.assert_close(pol.unnormalize_actions(n), acts, atol=1e-5, rtol=1e-5)
    pol2 = VLAPolicy(small_cfg())
    pol2.load_state_dict(pol.state_dict())
    assert torch.equal(pol2.action_high, pol.action_high)


# ---- Hugging Face adapter -------------------------------------------------------------------------
def tiny_llava(path):
    from transformers import LlavaConfig, LlavaModel, Qwen2Config, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8)
    tc = Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=127, vision_feature_select_strategy="full",
                      vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaModel(cfg).save_pretrained(str(path))
    return path


def test_hf_adapter_loads_and_encodes(tmp_path):
    pytest.importorskip("transformers")
    path = tiny_llava(tmp_path / "tiny_llava")
    enc = HFVLMEncoder.from_pretrained(path, tokenizer=lambda s: [ord(c) % 100 for c in s])
    assert enc.z_dim == 48 and enc.num_image_tokens == 16
    assert not any(p.requires_grad for p in enc.parameters())  # frozen
    img = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)  # resized to the tower's 32x32
    z = enc(img, ["pick up", "push the blue block"])
    assert z.shape == (2, 48) and torch.isfinite(z).all()
    ids = torch.tensor([[ord(c) % 100 for c in "pick up"] + [-1] * 12, [ord(c) % 100 for c in "push the blue block"]])
    torch.testing.assert_close(enc(img, ids), z, atol=1e-4, rtol=1e-4)  # -1 padding is masked out
    with pytest.raises(FileNotFoundError):
        HFVLMEncoder.from_pretrained(tmp_path / "missing")
    # the policy with encoder=hf: z computed once, head sized to hidden_size
    pol = VLAPolicy(small_cfg(encoder="hf", hf_path=str(path)))
    prop2 = torch.randn(2, P)
    z2, s = pol.encode(img, ids, prop2), pol.normalize_proprio(prop2)
    out = pol.sample_sde(z2, s, 3, generator=torch.Generator().manual_seed(0))
    assert z2.shape == (2, 48) and out.actions.shape == (2, 3, T, A)


def test_hf_adapter_lora(tmp_path):
    pytest.importorskip("transformers")
    path = tiny_llava(tmp_path / "tiny_llava")
    img = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    ids = torch.randint(0, 100, (2, 6))
    z0 = HFVLMEncoder.from_pretrained(path)(img, ids)
    enc = HFVLMEncoder.from_pretrained(path, lora_rank=4)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in enc.modules()) == 4  # q, v in 2 layers
    z = enc(img, ids)
    torch.testing.assert_close(z, z0, atol=1e-5, rtol=1e-5)  # B = 0 at init: unchanged model
    z.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters() if "lora_A" in n
               or "lora_B" in n)
    assert math.isfinite(float(z.detach().sum()))


def test_spatial_softmax_world_frame_matches_renderer():
    """Keypoints come out in the table's world frame (x right, y UP, as the renderer and the proprio use):
    the old readout used linspace(-1, 1) over rows, i.e. y pointing DOWN the image, the opposite of world y."""
    from vla_rft_engine.envs.render import Canvas
    from vla_rft_engine.models.encoders import pixel_grid, spatial_softmax
    cv = Canvas(16)
    xs, ys = pixel_grid(16, 16)
    torch.testing.assert_close(xs, torch.as_tensor(cv.xs))
    torch.testing.assert_close(ys, torch.as_tensor(cv.ys))
    h = torch.full((1, 1, 16, 16), -1e4)
    h[0, 0, 2, 13] = 0.0  # row 2 (near the top = far side of the table, y > 0), column 13 (x > 0)
    xy = spatial_softmax(h)
    torch.testing.assert_close(xy[0], torch.tensor([cv.xs[13], cv.ys[2]]))
    assert xy[0, 1] > 0


def test_small_encoder_v2_finds_named_colour():
    """The v2 encoder's instruction queries can point at the named object: with the colour query set by hand,
    the text keypoint lands on the pixel of that colour (world coordinates)."""
    enc = SmallEncoder(P, z_dim=16, channels=8, version=2, keypoints=2, text_queries=1)
    img = torch.zeros(1, 3, 16, 16)
    img[0, 0, 12, 3] = 1.0  # a red pixel: lower left of the table
    with torch.no_grad():
        enc.pix[0].weight.zero_(); enc.pix[0].bias.zero_(); enc.pix[0].weight[0, 0] = 1.0
        enc.pix[2].weight.zero_(); enc.pix[2].bias.zero_(); enc.pix[2].weight[0, 0] = 1.0
        enc.query.weight.zero_(); enc.query.bias.zero_(); enc.query.bias[0] = 1.0
        enc.kp_log_temp.fill_(4.0)
    kp = enc.keypoints(img, ["move to the red block"])  # (1, 2 * (2 + 1)): x of 3 points, then y of 3 points
    x, y = kp[0, 2].item(), kp[0, 5].item()
    assert x == pytest.approx(-1 + 3.5 / 8, abs=0.02) and y == pytest.approx(1 - 12.5 / 8, abs=0.02)
    z = enc(img, ["move to the red block"], torch.zeros(1, P))
    assert z.shape == (1, 16 + 2) == (1, enc.z_dim)
    torch.testing.assert_close(z[0, 16:], torch.tensor([x, y]))  # the named object's point reaches z unchanged
    names = {id(p) for p in enc.readout_parameters()}
    assert id(enc.kp_log_temp) in names and id(enc.query.weight) in names and id(enc.kp.weight) not in names


def test_proprio_stats_leave_constant_dims_unscaled():
    """A constant proprio dim (std 0) is not divided by a tiny clamp: drift at test time stays drift."""
    pol = VLAPolicy(small_cfg())
    prop = torch.randn(100, P)
    prop[:, 3] = 0.5
    pol.set_norm_stats(torch.randn(100, A), prop)
    assert pol.proprio_std[3] == 1.0 and pol.proprio_mean[3] == pytest.approx(0.5)
    shifted = prop[:1].clone()
    shifted[0, 3] += 0.01
    assert pol.normalize_proprio(shifted)[0, 3] == pytest.approx(0.01, abs=1e-6)


def test_legacy_encoder_v1_still_builds():
    pol = VLAPolicy(small_cfg(enc_version=1))
    img, instr, prop = obs(2)
    assert pol.encode(img, instr, prop).shape == (2, 32) and pol.encoder.readout_parameters() == []
    with pytest.raises(ValueError, match="enc_version"):
        small_cfg(enc_version=3).validate()
