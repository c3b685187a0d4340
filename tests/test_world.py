"""LearnedWorld (models/world.py): one directory, checked pairings, and `imagine` equal to the pipeline written
out by hand (tokenizer -> per-row prompt with each rollout's own a_0 -> world model -> tokenizer)."""
from __future__ import annotations

import json

import pytest
import torch

from vla_rft_engine.layout import ActionDiscretizer
from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
from vla_rft_engine.models.world import LearnedWorld, tokenizer_hash
from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights


def _tok(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(image_size=16, channels=[8, 8, 8], latent_channels=8, dyn_patch=2, levels=[4, 4])
    return VisualTokenizer(TokenizerConfig(**{**cfg, **kw})).eval()


def _world(tok=None):
    tok = tok or _tok()
    lay = tok.layout
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=lay.vocab_size, num_codes=lay.num_codes,
                                                         max_position=256)), std=0.3, seed=1).eval()
    disc = ActionDiscretizer(-torch.ones(7), torch.ones(7))
    return LearnedWorld(tok, wm, disc)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    w = _world()
    w.save(path)
    return path, w


def _inputs(B=2, N=3, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 16, 16, generator=g), torch.rand(B, N, T, 7, generator=g) * 2 - 1


def test_save_load_roundtrip_and_manifest(world_dir):
    path, w = world_dir
    man = json.loads((path / "world.json").read_text())
    assert man["tokenizer_sha256"] == tokenizer_hash(w.tokenizer) and man["layout"]["dynamics_tokens"] == 4
    assert (path / "tokenizer" / "tokenizer.safetensors").is_file() and (path / "config.json").is_file()
    w2 = LearnedWorld.load(path)
    start, acts = _inputs()
    a = w.imagine(start, acts, temperature=0)
    assert torch.equal(a, w2.imagine(start, acts, temperature=0))


def test_imagine_equals_the_pipeline_by_hand(world_dir):
    _, w = world_dir
    start, acts = _inputs()
    B, N, T = acts.shape[:3]
    frames, toks = w.imagine(start, acts, temperature=0, return_tokens=True)
    assert frames.shape == (B, N, T, 3, 16, 16) and toks.shape == (B, N, T, 4)
    lay, tok = w.layout, w.tokenizer
    bins = lay.bins_to_vocab(w.discretizer.encode(acts))
    for b in range(B):
        for n in range(N):  # one full prompt per rollout: ctx(o_0) + dyn(o_0) + its own a_0, no sharing
            prompt = torch.cat([lay.context_to_vocab(tok.encode_context(start[b:b + 1])),
                                lay.dynamics_to_vocab(tok.encode_dynamics(start[b:b + 1], start[b:b + 1])),
                                bins[b, n, :1]], 1)
            ids = w.world_model.rollout(prompt, bins[b, n, None, 1:], tokens_per_frame=lay.dynamics_tokens,
                                        temperature=0, cpu_fast=False)
            dyn = lay.vocab_to_dynamics(ids)
            assert torch.equal(toks[b, n], dyn[0])
            ref = tok.decode(tok.encode_context(start[b:b + 1]), dyn)
            torch.testing.assert_close(frames[b, n], ref[0], atol=1e-5, rtol=1e-5)


def test_first_action_reaches_the_frames(world_dir):
    _, w = world_dir
    start, acts = _inputs(B=1, N=2, T=2, seed=3)
    acts[0, 1, 1:] = acts[0, 0, 1:]  # the two chunks differ only in a_0
    acts[0, 1, 0] = -acts[0, 0, 0]
    _, toks = w.imagine(start, acts, temperature=0, return_tokens=True)
    assert not torch.equal(toks[0, 0], toks[0, 1])
    shared = w.imagine(start, acts[:, 0], num_samples=2, temperature=0)  # one chunk, two rollouts: equal greedily
    assert shared.shape == (1, 2, 2, 3, 16, 16) and torch.equal(shared[0, 0], shared[0, 1])


def test_mismatched_parts_are_clear_errors(world_dir, tmp_path):
    path, w = world_dir
    other_layout = _tok(dyn_patch=4)  # same vocabulary, another token layout (1 dynamics token per frame)
    other_layout.save(tmp_path / "tok_patch")
    with pytest.raises(ValueError, match="does not match the one world model"):
        LearnedWorld.load(path, tokenizer=tmp_path / "tok_patch")
    _tok(seed=5).save(tmp_path / "tok_weights")  # same config, other weights
    with pytest.raises(ValueError, match="other weights"):
        LearnedWorld.load(path, tokenizer=tmp_path / "tok_weights")
    ActionDiscretizer(-2 * torch.ones(7), torch.ones(7)).save(tmp_path / "ranges.json")
    with pytest.raises(ValueError, match="action ranges differ"):
        LearnedWorld.load(path, action_ranges=tmp_path / "ranges.json")
    with pytest.raises(ValueError, match="vocab"):
        LearnedWorld(_tok(levels=[5, 4]), w.world_model, w.discretizer)
    with pytest.raises(FileNotFoundError, match="pretrain-wm"):
        LearnedWorld.load(tmp_path / "nothing")


def test_bad_inputs_name_the_argument(world_dir):
    _, w = world_dir
    start, acts = _inputs()
    with pytest.raises(ValueError, match=r"start frames must be \(B, 3, 16, 16\)"):
        w.imagine(torch.rand(2, 3, 32, 32), acts)
    with pytest.raises(ValueError, match="actions must be"):
        w.imagine(start, acts[..., :6])
    bad = acts.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        w.imagine(start, bad)


def test_imagine_with_action_guidance_is_the_engine_guided_rollout(world_dir):
    """guidance=w: the unconditional twin's action tokens are the layout's null action id."""
    _, w = world_dir
    start, acts = _inputs()
    B, N = acts.shape[:2]
    lay = w.layout
    frames, toks = w.imagine(start, acts, temperature=0, return_tokens=True, guidance=2.0)
    ctx, dyn0 = w.tokenizer.encode_clip(start[:, None])
    bins = lay.bins_to_vocab(w.discretizer.encode(acts)).flatten(0, 1)
    null = torch.full_like(bins, lay.null_action_id)
    shared = torch.cat([lay.context_to_vocab(ctx), lay.dynamics_to_vocab(dyn0[:, 0])], 1)
    ids = w.world_model.rollout(shared, bins[:, 1:], tokens_per_frame=lay.dynamics_tokens, num_samples=N,
                                temperature=0, row_prompt_ids=bins[:, 0], guidance=2.0,
                                uncond_row_prompt_ids=null[:, 0], uncond_action_ids=null[:, 1:])
    assert torch.equal(toks.flatten(0, 1), lay.vocab_to_dynamics(ids))
    assert not torch.equal(toks, w.imagine(start, acts, temperature=0, return_tokens=True)[1])


def test_reward_response_by_scale():
    """R3 of perturbed chunks against the unperturbed chunk's rollout: 0 when nothing is perturbed (greedy),
    below 0 once the chunks differ; the ranking statistic is a Spearman correlation."""
    from vla_rft_engine.train.wm_eval import reward_response
    w = _world()
    start, acts = _inputs(B=3, N=1)
    out = reward_response(w, start, acts[:, 0], scales=[1e-9, 0.5], chunks=3)
    assert out["reward_by_scale"]["1e-09"] == 0.0  # every chunk tokenizes to the reference's bins
    assert out["reward_by_scale"]["0.5"] < 0.0
    assert -1.0 <= out["spearman_by_scale"]["0.5"] <= 1.0


def test_guidance_refused_for_a_world_model_trained_without_action_dropout(tmp_path):
    w = _world()
    w.action_dropout = 0.0
    w.save(tmp_path)
    loaded = LearnedWorld.load(tmp_path)
    assert loaded.action_dropout == 0.0
    start, acts = _inputs()
    with pytest.raises(ValueError, match="trained with action_dropout > 0"):
        loaded.imagine(start, acts, temperature=0, guidance=1.0)
    loaded.imagine(start, acts, temperature=0)  # plain rollouts are fine
