"""WorldModel vs transformers' LlamaForCausalLM on a tiny random checkpoint (vocab 9008): logits, the
authors' per-frame generate protocol, seeding, group sharing, ragged prompts, save/load, clear errors."""
import json
import sys
from pathlib import Path

import pytest
import torch

from vla_rft_engine.engine.attention import has_triton, resolve_backend

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: kernels/ must not shadow PyPI kernels
from bench.hf_protocol import hf_frame_by_frame, hf_kv_cached  # noqa: E402
from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig

transformers = pytest.importorskip("transformers")
NUM_CODES, F = 4375, 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=9008, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return path, model


def _prompt(G=2, P=20, T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.cat([torch.randint(NUM_CODES, 2 * NUM_CODES, (G, P - 7), generator=g),
                        torch.randint(8750, 9006, (G, 7), generator=g)], 1)
    return prompt, torch.randint(8750, 9006, (G, T - 1, 7), generator=g)


def test_forward_logits_match_transformers(hf_dir):
    path, hf = hf_dir
    wm = WorldModel.from_pretrained(path)
    ids = torch.randint(0, 9008, (2, 40))
    with torch.no_grad():
        err = (wm.forward_logits(ids) - hf(ids).logits).abs().max().item()
    assert err <= 1e-4, err


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_rollout_matches_authors_protocol(hf_dir, backend):
    path, hf = hf_dir
    wm = WorldModel.from_pretrained(path, attn_backend=backend)
    prompt, acts = _prompt()
    ref = hf_frame_by_frame(hf, prompt, acts, F, NUM_CODES)
    ours = wm.rollout(prompt, acts, tokens_per_frame=F, temperature=0)
    assert ours.shape == (2, 3, F) and int(ours.max()) < NUM_CODES
    assert torch.equal(ours, ref)


def test_logprobs_match_full_forward(hf_dir):
    wm = WorldModel.from_pretrained(hf_dir[0])
    prompt, acts = _prompt(G=1)
    toks, lp = wm.rollout(prompt, acts, tokens_per_frame=F, temperature=0, return_logprobs=True)
    parts = [prompt[0]]
    for t in range(3):
        parts.append(toks[0, t])
        if t < 2:
            parts.append(acts[0, t])
    seq = torch.cat(parts)[None]
    with torch.no_grad():
        full = wm.forward_logits(seq)[0, :, :NUM_CODES].log_softmax(-1)
    P, step = prompt.shape[1], F + 7
    pos = torch.cat([P - 1 + t * step + torch.arange(F) for t in range(3)])
    torch.testing.assert_close(lp[0].flatten(), full[pos].gather(1, toks[0].flatten()[:, None])[:, 0], atol=1e-4, rtol=1e-4)


def test_sampling_seeded_and_reproducible(hf_dir):
    wm = WorldModel.from_pretrained(hf_dir[0])
    prompt, acts = _prompt()
    run = lambda s: wm.rollout(prompt, acts, tokens_per_frame=F, num_samples=3, top_p=0.8,
                               generator=torch.Generator().manual_seed(s))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, F) and int(a.max()) < NUM_CODES
    assert not torch.equal(a[0], a[1])  # samples of one prompt differ


def test_group_sharing_equals_repeated_prompt(hf_dir):
    wm = WorldModel.from_pretrained(hf_dir[0])
    prompt, acts = _prompt()
    shared = wm.rollout(prompt, acts, tokens_per_frame=F, num_samples=3, temperature=0)
    repeated = wm.rollout(prompt.repeat_interleave(3, 0), acts.repeat_interleave(3, 0), tokens_per_frame=F, temperature=0)
    assert torch.equal(shared, repeated)
    per_sample = torch.randint(8750, 9006, (6, 2, 7))  # one action sequence per sample (RFT)
    a = wm.rollout(prompt, per_sample, tokens_per_frame=F, num_samples=3, temperature=0)
    b = wm.rollout(prompt.repeat_interleave(3, 0), per_sample, tokens_per_frame=F, temperature=0)
    assert torch.equal(a, b)


def test_ragged_prompts_equal_unpadded_rows(hf_dir):
    wm = WorldModel.from_pretrained(hf_dir[0])
    p1, a1 = _prompt(G=1, P=20, seed=3)
    p2, a2 = _prompt(G=1, P=13, seed=4)
    padded = torch.full((2, 20), 9007)
    padded[0], padded[1, :13] = p1[0], p2[0]
    out = wm.rollout(padded, torch.cat([a1, a2]), tokens_per_frame=F, num_samples=2, temperature=0, prompt_lengths=[20, 13])
    r1 = wm.rollout(p1, a1, tokens_per_frame=F, num_samples=2, temperature=0)
    r2 = wm.rollout(p2, a2, tokens_per_frame=F, num_samples=2, temperature=0)
    assert torch.equal(out, torch.cat([r1, r2]))


def test_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    wm = WorldModel.from_pretrained(hf_dir[0])
    wm.save_pretrained(tmp_path)
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 9008, (1, 16))
    with torch.no_grad():
        assert (hf2(ids).logits - wm.forward_logits(ids)).abs().max() <= 1e-4
    # and pytorch_model.bin checkpoints load too
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf2.state_dict(), tmp_path / "pytorch_model.bin")
    wm2 = WorldModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert wm2.output.weight.dtype == torch.bfloat16
    assert wm2.rollout(*_prompt(G=1, T=2), tokens_per_frame=4, temperature=0).shape == (1, 2, 4)


def test_presets():
    with torch.device("meta"):
        paper = WorldModel(WorldModelConfig.preset("paper"))
    # Table 5 says ~138M; the listed shapes (untied, vocab 9008) give 127.1M, the table's figure may count more
    assert paper.num_params() == 127_101_696
    assert WorldModelConfig.preset("small").n_layer == 4
    with pytest.raises(ValueError, match="unknown world-model preset"):
        WorldModelConfig.preset("huge")


def test_clear_errors(hf_dir, tmp_path):
    path, hf = hf_dir
    wm = WorldModel.from_pretrained(path)
    prompt, acts = _prompt()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        wm.forward_logits(torch.tensor([[0, 9008]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        wm.rollout(prompt.clamp(max=9007) + 5000, acts, tokens_per_frame=F)
    with pytest.raises(ValueError, match="action_ids must be"):
        wm.rollout(prompt, acts[:, :, None], tokens_per_frame=F)
    with pytest.raises(ValueError, match="action_ids must be"):
        wm.rollout(prompt, acts[:1], tokens_per_frame=F, num_samples=2)
    with pytest.raises(ValueError, match="exceeds the cache"):
        wm.rollout(prompt, acts, tokens_per_frame=F, max_seq_len=40)
    with pytest.raises(ValueError, match="exceeds the cache"):
        wm.rollout(torch.zeros(1, 250, dtype=torch.long), acts[:1], tokens_per_frame=F)  # max_position 256
    with pytest.raises(ValueError, match="prompt_lengths"):
        wm.rollout(prompt, acts, tokens_per_frame=F, prompt_lengths=[20, 21])
    with pytest.raises(ValueError, match=r"n_layer: config 4 vs checkpoint 2"):
        WorldModel.from_pretrained(path, config="small")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
        WorldModel.from_pretrained(bad)


@pytest.mark.parametrize("backend,cpu_fast", [("auto", None), ("eager", True), ("sdpa", False), ("triton", False)])
def test_own_first_action_per_row_matches_authors_protocol(hf_dir, backend, cpu_fast):
    """Eq. 10: a group shares ctx + dyn0, each rollout's prompt ends with its OWN a_0 (engine: row_prompt_ids).
    Reference: transformers' per-frame generate with each row's full prompt written out."""
    path, hf = hf_dir
    wm = WorldModel.from_pretrained(path, attn_backend=backend)
    G, N = 2, 3
    prompt, _ = _prompt(G=G, P=20)
    shared = prompt[:, :13]  # context + first dynamics frame
    g = torch.Generator().manual_seed(5)
    a0 = torch.randint(8750, 9006, (G * N, 7), generator=g)
    a0[1] = a0[0]  # two rows with one a_0 and one chunk: equal rollouts
    acts = torch.randint(8750, 9006, (G * N, 2, 7), generator=g)
    acts[1] = acts[0]
    full = torch.cat([shared.repeat_interleave(N, 0), a0], 1)
    ref = hf_frame_by_frame(hf, full, acts, F, NUM_CODES)
    ours = wm.rollout(shared, acts, tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=a0,
                      cpu_fast=cpu_fast)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[0], ours[1]) and not torch.equal(ours[0], ours[2])  # a_0 reaches the frames


def test_own_first_action_with_ragged_shared_prefix(hf_dir):
    wm = WorldModel.from_pretrained(hf_dir[0])
    p1, _ = _prompt(G=1, P=20, seed=3)
    p2, _ = _prompt(G=1, P=13, seed=4)
    padded = torch.full((2, 13), 9007)
    padded[0], padded[1, :6] = p1[0, :13], p2[0, :6]
    a0 = torch.randint(8750, 9006, (4, 7))
    acts = torch.randint(8750, 9006, (4, 2, 7))
    out = wm.rollout(padded, acts, tokens_per_frame=F, num_samples=2, temperature=0, prompt_lengths=[13, 6],
                     row_prompt_ids=a0)
    for g, p in enumerate((p1[:, :13], p2[:, :6])):
        rows = slice(2 * g, 2 * g + 2)
        full = torch.cat([p.expand(2, -1), a0[rows]], 1)
        assert torch.equal(out[rows], wm.rollout(full, acts[rows], tokens_per_frame=F, temperature=0))
    with pytest.raises(ValueError, match="row_prompt_ids"):
        wm.rollout(padded, acts, tokens_per_frame=F, num_samples=2, prompt_lengths=[13, 6], row_prompt_ids=a0[:3])
    with pytest.raises(ValueError, match="row_prompt_ids"):
        wm.rollout(padded, acts, tokens_per_frame=F, num_samples=2, prompt_lengths=[13, 6], row_prompt_ids=a0 + 100)


def test_auto_backend_resolves_to_the_fast_path_per_device():
    assert WorldModelConfig().attn_backend == "auto" and WorldModelConfig().norm_backend == "auto"
    assert resolve_backend("auto", "cpu") == "sdpa"  # + engine/cpu_decode.py (prefix read once per group)
    assert resolve_backend("auto", "cuda") == ("triton" if has_triton() else "sdpa")
    assert resolve_backend("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="attn_backend 'fast' unknown"):
        resolve_backend("fast", "cpu")


def test_kv_cached_baseline_matches_per_frame_protocol(hf_dir):
    """Baseline 2 of bench/wm_rollout.py (cache kept across frames) gives the per-frame protocol's tokens."""
    _, hf = hf_dir
    prompt, acts = _prompt(G=3, P=20, T=3)
    ref = hf_frame_by_frame(hf, prompt, acts, F, NUM_CODES)
    assert torch.equal(hf_kv_cached(hf, prompt, acts, F, NUM_CODES), ref)
    assert torch.equal(hf_kv_cached(hf, prompt, acts, F, NUM_CODES, static=True), ref)  # baseline 3's cache (CUDA)
    # nucleus sampling with a vanishing top_p keeps only the argmax
    g = torch.Generator().manual_seed(0)
    assert torch.equal(hf_kv_cached(hf, prompt, acts, F, NUM_CODES, do_sample=True, top_p=1e-6, generator=g), ref)
    sampled = hf_kv_cached(hf, prompt, acts, F, NUM_CODES, do_sample=True, temperature=5.0, generator=g)
    assert sampled.shape == ref.shape and int(sampled.max()) < NUM_CODES and not torch.equal(sampled, ref)


def _guided_reference(hf, cond, uncond, acts, uacts, w):
    """Action guidance written out: full recompute through transformers for the conditional and the
    unconditional sequence, tokens = argmax((1 + w) * logits_cond - w * logits_uncond) over the codes."""
    cond, uncond, frames = cond.clone(), uncond.clone(), []
    T = acts.shape[1] + 1
    for t in range(T):
        frame = []
        for _ in range(F):
            with torch.no_grad():
                lc, lu = hf(cond).logits[:, -1, :NUM_CODES], hf(uncond).logits[:, -1, :NUM_CODES]
            tok = ((1 + w) * lc - w * lu).argmax(-1, keepdim=True)
            frame.append(tok)
            cond, uncond = torch.cat([cond, tok], 1), torch.cat([uncond, tok], 1)
        frames.append(torch.cat(frame, 1))
        if t < T - 1:
            cond, uncond = torch.cat([cond, acts[:, t]], 1), torch.cat([uncond, uacts[:, t]], 1)
    return torch.stack(frames, 1)


@pytest.mark.parametrize("backend,cpu_fast", [("eager", True), ("sdpa", False), ("triton", False)])
def test_action_guidance_matches_written_out_reference(hf_dir, backend, cpu_fast):
    """guidance=w: each rollout's unconditional twin (null action ids) shares its group's prefix and every token."""
    path, hf = hf_dir
    wm = WorldModel.from_pretrained(path, attn_backend=backend)
    G, N, null = 2, 2, 9007
    prompt, _ = _prompt(G=G, P=20)
    shared = prompt[:, :13]
    g = torch.Generator().manual_seed(9)
    a0 = torch.randint(8750, 9006, (G * N, 7), generator=g)
    acts = torch.randint(8750, 9006, (G * N, 2, 7), generator=g)
    u0, uacts = torch.full_like(a0, null), torch.full_like(acts, null)
    full = shared.repeat_interleave(N, 0)
    for w in (0.0, 1.5):
        ours = wm.rollout(shared, acts, tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=a0,
                          cpu_fast=cpu_fast, guidance=w, uncond_row_prompt_ids=u0, uncond_action_ids=uacts)
        ref = _guided_reference(hf, torch.cat([full, a0], 1), torch.cat([full, u0], 1), acts, uacts, w)
        assert torch.equal(ours, ref), w
    plain = wm.rollout(shared, acts, tokens_per_frame=F, num_samples=N, temperature=0, row_prompt_ids=a0)
    assert torch.equal(plain, _guided_reference(hf, torch.cat([full, a0], 1), torch.cat([full, u0], 1), acts, uacts, 0.0))
    assert not torch.equal(ours, plain)  # w = 1.5 changes the frames of this random model
    with pytest.raises(ValueError, match="guidance > 0 needs"):
        wm.rollout(shared, acts, tokens_per_frame=F, num_samples=N, row_prompt_ids=a0, guidance=1.0)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        wm.rollout(shared, acts, tokens_per_frame=F, num_samples=N, row_prompt_ids=a0, guidance=-1.0,
                   uncond_row_prompt_ids=u0, uncond_action_ids=uacts)
