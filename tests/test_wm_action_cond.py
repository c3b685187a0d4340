"""Action conditioning (issue #10, WorldModelConfig.action_cond): off by default, changes the logits of the next
frame's tokens when on, round-trips through save/load, and the rollout engine (KV cache, shared prefix, per-row
prompts, CPU fast path, generic path, Triton) gives the tokens of a full-recompute greedy loop."""
import pytest
import torch

from vla_rft_engine.layout import TokenLayout
from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, action_features, init_weights
from vla_rft_engine.train.world_model_config import WMTrainConfig

from conftest import cuda_only

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
    feat, on, _ = action_features(ids, _cfg(action_cond=True))
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
    # save/load keeps the options and the weights
    for use_sum in (False, True):
        wm2 = init_weights(WorldModel(_cfg(action_cond=True, action_cond_sum=use_sum)), seed=1).eval()
        wm2.save_pretrained(tmp_path / f"wm{use_sum}")
        back = WorldModel.from_pretrained(tmp_path / f"wm{use_sum}")
        assert back.config.action_cond and back.config.action_cond_sum == use_sum
        assert torch.allclose(back(ids), wm2(ids))


def test_sum_features_are_the_displacement_so_far():
    """action_cond_sum: the extra features at a frame's tokens are the sum of every action block before them."""
    g = torch.Generator().manual_seed(3)
    ids, act = _segment(g)
    feat, on, _ = action_features(ids, _cfg(action_cond=True, action_cond_sum=True))
    vals = (act[0].float() + 0.5) / LAY.num_action_bins * 2 - 1  # (2 blocks, A)
    A, n = LAY.action_dim, LAY.dynamics_tokens
    ends = [LAY.context_tokens + n + A - 1, LAY.context_tokens + n + A + n + A - 1]  # last ids of a_0, a_1
    assert feat.shape[-1] == 2 * A
    assert torch.allclose(feat[0, ends[0] + 1, :A], vals[0]) and torch.allclose(feat[0, ends[0] + 1, A:], vals[0])
    assert torch.allclose(feat[0, ends[1] + 1, :A], vals[1]) and torch.allclose(feat[0, ends[1] + 1, A:], vals[0] + vals[1])
    assert torch.equal(on, action_features(ids, _cfg(action_cond=True))[1])
    with pytest.raises(Exception, match="action_cond_sum=true needs action_cond"):
        WMTrainConfig(segments="seg.pt", action_cond_sum=True).validate()


@pytest.mark.parametrize("seed,use_sum", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_chunked_features_equal_one_pass(seed, use_sum):
    """The carry makes features computed chunk by chunk (as the engine feeds them) equal one pass over the
    sequence, for structured segments and for random ids with action runs of any length."""
    g = torch.Generator().manual_seed(seed)
    cfg = _cfg(action_cond=True, action_cond_sum=use_sum)
    seg = torch.cat([_segment(g)[0] for _ in range(2)], 0)
    noise = torch.randint(0, LAY.vocab_size, (2, 60), generator=g)
    runs = torch.randint(0, 2, (2, 60), generator=g).bool()
    noise = torch.where(runs, torch.randint(LAY.action_offset, LAY.action_offset + LAY.num_action_bins, (2, 60),
                                            generator=g), noise)
    for ids in (seg, noise):
        feat, on, _ = action_features(ids, cfg)
        cuts = sorted(torch.randperm(ids.shape[1] - 1, generator=g)[:5].add(1).tolist())
        carry, parts = None, []
        for a, b in zip([0] + cuts, cuts + [ids.shape[1]]):
            f, o, carry = action_features(ids[:, a:b], cfg, carry)
            parts.append((f, o))
        assert torch.equal(torch.cat([o for _, o in parts], 1), on)
        torch.testing.assert_close(torch.cat([f for f, _ in parts], 1)[on], feat[on], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_sum", [False, True])
def test_embed_token_by_token_equals_one_pass(use_sum):
    """The engine feeds embed one token at a time after the prompt; on the CPU a frame token reuses the carried
    projection instead of re-deriving it. Each step's embedding equals the one-pass embedding of the sequence."""
    import types
    g = torch.Generator().manual_seed(5)
    wm = init_weights(WorldModel(_cfg(action_cond=True, action_cond_sum=use_sum)), std=0.1, seed=5).eval()
    seg = torch.cat([_segment(g)[0] for _ in range(2)], 0)
    runs = torch.randint(0, 2, (2, 60), generator=g).bool()  # action runs of any length, ragged ones too
    noise = torch.where(runs, torch.randint(LAY.action_offset, LAY.action_offset + LAY.num_action_bins, (2, 60),
                                            generator=g), torch.randint(0, 2 * LAY.num_codes, (2, 60), generator=g))
    for ids in (seg, noise):
        with torch.no_grad():
            ref = wm.embed(ids)
            cache = types.SimpleNamespace()
            parts = [wm.embed(ids[:, :6], cache)] + [wm.embed(ids[:, i:i + 1], cache) for i in range(6, ids.shape[1])]
        torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-6, rtol=0)


def _greedy_reference(wm, shared, rows, acts, T, F):
    """Full causal forward over the whole sequence for every token: no cache, no carry."""
    N = rows.shape[0] // shared.shape[0]
    seq = torch.cat([shared.repeat_interleave(N, 0), rows], 1)
    out = []
    for t in range(T):
        frame = []
        for _ in range(F):
            tok = wm(seq)[:, -1, :wm.config.num_codes].argmax(-1)
            frame.append(tok)
            seq = torch.cat([seq, tok[:, None]], 1)
        out.append(torch.stack(frame, 1))
        if t < T - 1:
            seq = torch.cat([seq, acts[:, t]], 1)
    return torch.stack(out, 1)


def _engine_case(seed: int, G: int, N: int, T: int, proj_scale: float = 30.0, **cfg):
    """An action_cond model (projection scaled up, so other actions change greedy tokens) and rollout inputs:
    the groups' shared prompt (context + first dynamics frame) and every rollout's own action bins (G*N, T, A)."""
    wm = init_weights(WorldModel(_cfg(action_cond=True, n_layer=2, **cfg)), std=0.1, seed=seed).eval()
    with torch.no_grad():
        for p in wm.action_proj.parameters():
            p.mul_(proj_scale)
    F = LAY.dynamics_tokens
    g = torch.Generator().manual_seed(seed + 10)
    shared = torch.cat([torch.randint(LAY.context_offset, LAY.context_offset + LAY.num_codes, (G, LAY.context_tokens),
                                      generator=g), torch.randint(0, LAY.num_codes, (G, F), generator=g)], 1)
    bins = torch.randint(0, LAY.num_action_bins, (G * N, T, LAY.action_dim), generator=g) + LAY.action_offset
    return wm, shared, bins


@pytest.mark.parametrize("backend,fast,use_sum", [("eager", True, False), ("eager", False, False), ("sdpa", True, False),
                                                   ("triton", False, False), ("eager", True, True), ("sdpa", False, True)])
def test_engine_rollout_equals_full_forward_loop(backend, fast, use_sum):
    """Each rollout's own a_0 (row prompt) and its own later actions reach its frames through the projection."""
    G, N, T, F = 2, 3, 3, LAY.dynamics_tokens
    wm, shared, bins = _engine_case(3, G, N, T, attn_backend=backend, action_cond_sum=use_sum)
    ref = _greedy_reference(wm, shared, bins[:, 0], bins[:, 1:], T, F)
    out = wm.rollout(shared, bins[:, 1:], tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=bins[:, 0],
                     cpu_fast=fast)
    assert torch.equal(out, ref)
    # the actions matter: the same model without the projection's contribution gives other tokens
    with torch.no_grad():
        for p in wm.action_proj.parameters():
            p.zero_()
    assert not torch.equal(wm.rollout(shared, bins[:, 1:], tokens_per_frame=F, num_samples=N, temperature=0,
                                      row_prompt_ids=bins[:, 0], cpu_fast=fast), ref)


def test_engine_sampled_rollout_fast_equals_generic():
    G, N, T, F = 2, 2, 3, LAY.dynamics_tokens
    wm, shared, bins = _engine_case(4, G, N, T, proj_scale=1.0, attn_backend="eager")
    run = lambda fast: wm.rollout(shared, bins[:, 1:], tokens_per_frame=F, num_samples=N, top_p=0.9, cpu_fast=fast,
                                  row_prompt_ids=bins[:, 0], return_logprobs=True,
                                  generator=torch.Generator().manual_seed(7))
    (t0, lp0), (t1, lp1) = run(False), run(True)
    assert torch.equal(t0, t1)
    torch.testing.assert_close(lp0, lp1, atol=1e-5, rtol=1e-5)


@cuda_only()
def test_engine_cuda_graph_action_cond_equals_full_forward_loop():
    G, N, T, F = 2, 3, 3, LAY.dynamics_tokens
    wm, shared, bins = (t.cuda() for t in _engine_case(3, G, N, T, attn_backend="triton"))
    ref = _greedy_reference(wm, shared, bins[:, 0], bins[:, 1:], T, F)
    out = wm.rollout(shared, bins[:, 1:], tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=bins[:, 0],
                     use_cuda_graph=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fast", [True, False])
def test_engine_ragged_prompts_of_an_action_cond_model(fast):
    """Right-padded prompts: a group whose prompt ends on a frame token (or after a whole action block) rolls out
    as alone; one that ends inside an action block is refused (the carry would be the padding's)."""
    G, N, T, F = 2, 2, 2, LAY.dynamics_tokens
    wm, shared, bins = _engine_case(5, G, N, T, attn_backend="eager")
    a = bins[0, 0]  # a whole action block ends group 1's prompt, then two frame tokens
    short = torch.cat([shared[1, :-2], a, shared[1, -2:]])
    P = short.numel()
    prompts = torch.cat([shared, torch.zeros(G, P - shared.shape[1], dtype=shared.dtype)], 1)
    prompts[1] = short
    lens = torch.tensor([shared.shape[1], P])
    out = wm.rollout(prompts, bins[:, 1:], tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=bins[:, 0],
                     prompt_lengths=lens, cpu_fast=fast)
    for g, p in enumerate((shared[0], short)):
        rows = slice(g * N, (g + 1) * N)
        ref = _greedy_reference(wm, p[None], bins[rows, 0], bins[rows, 1:], T, F)
        assert torch.equal(out[rows], ref)
    long0 = torch.cat([shared[0], torch.arange(3)])  # group 0 the longer: group 1 is padded
    mid = torch.cat([shared[1], a[:2]])  # two of the block's three action ids, the third in the row prompts
    prompts = torch.stack([long0, torch.cat([mid, torch.zeros(1, dtype=mid.dtype)])])
    with pytest.raises(ValueError, match="inside an action block"):
        wm.rollout(prompts, bins[:, 1:], tokens_per_frame=F, num_samples=N, temperature=0,
                   row_prompt_ids=bins[:, 0, 2:], prompt_lengths=torch.tensor([long0.numel(), mid.numel()]), cpu_fast=fast)
    # unpadded, the same prompt is fine: the block completes in the row prompts
    rows = slice(N, 2 * N)
    out = wm.rollout(mid[None], bins[rows, 1:], tokens_per_frame=F, num_samples=N, temperature=0,
                     row_prompt_ids=bins[rows, 0, 2:], cpu_fast=fast)
    assert torch.equal(out, _greedy_reference(wm, mid[None], bins[rows, 0, 2:], bins[rows, 1:], T, F))
