"""PROTOTYPE action conditioning (issue #10, WorldModelConfig.action_cond): off by default, changes the logits
of the next frame's tokens when on, round-trips through save/load, and the engine refuses it."""
import pytest
import torch

from vla_rft_engine.layout import TokenLayout
from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, action_features, init_weights
from vla_rft_engine.train.world_model_config import WMTrainConfig

LAY = TokenLayout(num_codes=16, num_action_bins=8, action_dim=3, context_tokens=4, dynamics_tokens=5)


def _cfg(**kw):
    return WorldModelConfig.preset("tiny", vocab_size=LAY.vocab_size, num_codes=LAY.num_codes, max_position=256,
                                   action_dim=LAY.action_dim, **kw)


def _segment(g, act=None):
    ctx = torch.randint(0, LAY.num_codes, (1, LAY.context_tokens), generator=g)
    dyn = torch.randint(0, LAY.num_codes, (1, 3, LAY.dynamics_tokens), generator=g)
    act = torch.randint(0, LAY.num_action_bins, (1, 2, LAY.action_dim), generator=g) if act is None else act
    return LAY.build_segment(ctx, dyn, act), act


def test_off_by_default():
    assert WorldModelConfig().action_cond is False and WMTrainConfig().action_cond is False
    wm = WorldModel(WorldModelConfig.preset("tiny"))
    assert wm.action_proj is None and not any(n.startswith("action_proj") for n, _ in wm.named_parameters())
    assert "vla_rft_action_cond" not in WorldModelConfig().to_hf_dict()


def test_features_and_logits(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids, act = _segment(g)
    feat, on = action_features(ids, _cfg(action_cond=True))
    a0_end = LAY.context_tokens + LAY.dynamics_tokens + LAY.action_dim - 1  # last token of a_0
    assert not on[0, :a0_end].any() and on[0, a0_end:a0_end + 1 + LAY.dynamics_tokens].all()
    want = (act[0, 0].float() + 0.5) / LAY.num_action_bins * 2 - 1
    assert torch.allclose(feat[0, a0_end + 1], want)
    # on: changing a_0's bins changes the logits of frame 1 (teacher-forced) only through the projection too
    wm = init_weights(WorldModel(_cfg(action_cond=True)), seed=0).eval()
    other = act.clone()
    other[0, 0] = (other[0, 0] + 3) % LAY.num_action_bins
    ids2, _ = _segment(torch.Generator().manual_seed(0), other)
    # same frame tokens, other a_0: positions before a_0 agree, frame-1 positions differ
    with torch.no_grad():
        l1, l2 = wm(ids), wm(ids2)
    start = LAY.context_tokens + LAY.dynamics_tokens
    assert torch.allclose(l1[:, :start], l2[:, :start])
    assert not torch.allclose(l1[:, a0_end + 1:a0_end + 1 + LAY.dynamics_tokens], l2[:, a0_end + 1:a0_end + 1 + LAY.dynamics_tokens])
    # the projection alone changes the logits: zero it and the on-model equals the same weights without it
    base = WorldModel(_cfg())
    base.load_state_dict({k: v for k, v in wm.state_dict().items() if not k.startswith("action_proj")})
    with torch.no_grad():
        assert not torch.allclose(base(ids), l1)
        for p in wm.action_proj.parameters():
            p.zero_()
        assert torch.allclose(base(ids), wm(ids), atol=1e-6)
    # save/load keeps the option and the weights; the engine refuses it
    wm2 = init_weights(WorldModel(_cfg(action_cond=True)), seed=1).eval()
    wm2.save_pretrained(tmp_path / "wm")
    back = WorldModel.from_pretrained(tmp_path / "wm")
    assert back.config.action_cond and torch.allclose(back(ids), wm2(ids))
    with pytest.raises(NotImplementedError):
        back.rollout(ids[:, :start], act[:, 1:] + LAY.action_offset)
