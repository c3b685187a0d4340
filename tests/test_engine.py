"""Rollout engine: Triton backends end to end (interpreter, tiny shapes), cache sharing, CUDA graphs (GPU only)."""
import pytest
import torch

from vla_rft_engine.engine import RolloutCache
from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights

from conftest import cuda_only


def _wm(**kw):
    return init_weights(WorldModel(WorldModelConfig.preset("tiny", n_layer=1, **kw)), std=0.05).eval()


def _inputs(G=2, P=12, T=2):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4375, 8750, (G, P), generator=g), torch.randint(8750, 9006, (G, T - 1, 7), generator=g)


def test_triton_engine_matches_eager_ragged_group():
    wm = _wm()
    prompt, acts = _inputs()
    kw = dict(tokens_per_frame=4, num_samples=2, prompt_lengths=[12, 7])
    ref_t, ref_lp = wm.rollout(prompt, acts, temperature=0, return_logprobs=True, **kw)
    wm.config.attn_backend, wm.config.norm_backend = "triton", "triton"
    for m in wm.modules():
        if hasattr(m, "backend") and m.__class__.__name__ == "RMSNorm":
            m.backend = "triton"
    out_t, out_lp = wm.rollout(prompt, acts, temperature=0, return_logprobs=True, **kw)
    assert torch.equal(out_t, ref_t)
    torch.testing.assert_close(out_lp, ref_lp, atol=1e-4, rtol=1e-4)


def test_triton_sampling_in_engine_is_seeded():
    wm = _wm(attn_backend="triton")
    prompt, acts = _inputs(G=1)
    run = lambda: wm.rollout(prompt, acts, tokens_per_frame=3, num_samples=2, top_p=0.8, top_k=50,
                             generator=torch.Generator().manual_seed(3))
    wm_ref = _wm(attn_backend="eager")
    ref = wm_ref.rollout(prompt, acts, tokens_per_frame=3, num_samples=2, top_p=0.8, top_k=50,
                         generator=torch.Generator().manual_seed(3))
    a = run()
    assert torch.equal(a, run()) and torch.equal(a, ref)  # kernel sampler == sort-based reference, same noise


def test_cache_shares_prefix_memory():
    cfg = WorldModelConfig.preset("tiny")
    c = RolloutCache(cfg, groups=2, samples=17, prefix_len=100, suffix_len=30, dtype=torch.float32, device="cpu")
    assert c.prefix_k.shape[1] == 2 and c.suffix_k.shape[1] == 34  # prompt stored once per group
    assert c.row_positions(3).shape == (34, 3)


def test_bf16_rollout_runs_on_cpu():
    wm = _wm().to(torch.bfloat16)
    prompt, acts = _inputs()
    out = wm.rollout(prompt, acts, tokens_per_frame=4, num_samples=2, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 2, 4) and int(out.max()) < 4375


def test_cuda_graph_request_on_cpu_is_an_error():
    wm = _wm()
    with pytest.raises(ValueError, match="CUDA device"):
        wm.rollout(*_inputs(), tokens_per_frame=2, use_cuda_graph=True)


def _rft_rollout(kw, T=3, F=5, action_cond=False, backend="eager", device="cpu"):
    """run(**opts): a tiny rollout in the RFT layout (each row's own a_0; guidance twins when kw asks), the same
    inputs and generator seed on every call."""
    wm = _wm(attn_backend=backend, action_cond=action_cond).to(device)
    prompt, acts = (t.to(device) for t in _inputs(T=T))
    a0 = torch.randint(8750, 9006, (6, 7), generator=torch.Generator().manual_seed(1)).to(device)
    extra = dict(uncond_row_prompt_ids=a0.flip(0), uncond_action_ids=acts.flip(0)) if kw.get("guidance") else {}

    def run(**opts):
        return wm.rollout(prompt, acts, tokens_per_frame=F, num_samples=3, row_prompt_ids=a0,
                          generator=torch.Generator(device=device).manual_seed(3), **kw, **extra, **opts)
    return run


def _assert_same_rollout(a, b, kw):
    if kw.get("return_logprobs"):
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("action_cond", [False, True])
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_p=0.8, top_k=40, return_logprobs=True),
                                dict(top_p=0.9, guidance=1.5)])
def test_token_programs_read_nothing_on_the_host(monkeypatch, kw, action_cond):
    """What capturing them as CUDA graphs needs, checked on the CPU: the decode and action programs (sampling,
    the writes, the generic model step) never turn a tensor into a Python value, and give the tokens of the
    CPU decode path."""
    from vla_rft_engine.engine import token_step
    run = _rft_rollout(kw, action_cond=action_cond)
    fast = run(cpu_fast=True)

    def boom(*a, **k):
        raise AssertionError("a host read inside a token program")
    for name in ("_decode", "_action"):
        program = getattr(token_step.TokenStep, name)

        def guarded(self, program=program):
            with monkeypatch.context() as m:
                for attr in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
                    m.setattr(torch.Tensor, attr, boom)
                program(self)
        monkeypatch.setattr(token_step.TokenStep, name, guarded)
    from vla_rft_engine.engine import rollout as rollout_mod
    from vla_rft_engine.kernels.sampling import sample_reference  # the CPU sampler checks on the host; this one not
    monkeypatch.setattr(rollout_mod, "_sampler", lambda backend, device, logprob: sample_reference)
    generic_forward = rollout_mod._generic_forward

    def without_host_mirror(wm, cache):  # as under capture: attention takes the fill level from the device only
        forward = generic_forward(wm, cache)

        def step(ids):
            cache.s0_host = None
            return forward(ids)
        return step
    monkeypatch.setattr(rollout_mod, "_generic_forward", without_host_mirror)
    _assert_same_rollout(fast, run(cpu_fast=False), kw)


@pytest.mark.parametrize("T,F,action_cond,kw", [(3, 5, False, dict(top_p=0.8, return_logprobs=True)),
                                                (3, 5, True, dict(temperature=0)), (2, 1, True, dict(top_p=0.9)),
                                                (2, 4, False, dict(top_p=0.9, top_k=40, guidance=1.5)),
                                                (1, 2, False, dict(temperature=0)), (1, 1, False, dict(top_p=0.9))])
def test_capture_bookkeeping_runs_on_the_cpu(monkeypatch, T, F, action_cond, kw):
    """The capture path on the CPU, with a stand-in graph that re-runs its program on replay: the warm-up and its
    restores, the fixed logits buffer, the actions copied in, no host mirror of the fill level. It gives the
    eager rollout's tokens; short rollouts included (a warm-up that ran past the suffix fails here)."""
    import contextlib

    from vla_rft_engine.engine import rollout as rollout_mod
    from vla_rft_engine.engine import token_step
    run = _rft_rollout(kw, T, F, action_cond)
    eager = run(cpu_fast=False)

    class Replay:
        def __init__(self, fn):
            self.replay = fn

        def pool(self):
            return None
    monkeypatch.setattr(token_step, "_record", lambda fn, pool: Replay(fn))
    monkeypatch.setattr(token_step, "_side_stream", contextlib.nullcontext)
    caches, programs = [], []
    generic_forward, init = rollout_mod._generic_forward, token_step.TokenStep.__init__
    monkeypatch.setattr(rollout_mod, "_generic_forward", lambda wm, cache: caches.append(cache) or generic_forward(wm, cache))

    def init_and_capture(self, *a, **k):
        init(self, *a, **k)
        self.capture(caches[-1], decode=F > 1)
        programs.append(self)
    monkeypatch.setattr(token_step.TokenStep, "__init__", init_and_capture)
    captured = run(cpu_fast=False)
    assert programs[0].static and set(programs[0].graphs) == {n for n, on in (("decode", F > 1), ("action", T > 1)) if on}
    assert caches[0].s0_host is None and int(caches[0].s0) == caches[0].suffix_len - 1  # all but the last token fed
    _assert_same_rollout(eager, captured, kw)


@cuda_only()
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_p=0.8, return_logprobs=True),
                                dict(top_p=0.9, top_k=40, temperature=1.2, guidance=1.5)])
@pytest.mark.parametrize("T,F,action_cond", [(3, 5, False), (3, 5, True), (2, 4, False), (2, 1, True), (1, 1, False),
                                             (1, 2, False)])
def test_cuda_graph_rollout_matches_eager(backend, kw, T, F, action_cond):
    """Each token as one graph replay (sampling, the writes, the model step, the frame-end + action step too) gives
    the eager programs' tokens and log-probs: the same generator stream, the same code. Short rollouts too, where
    the warm-up before capture must not run past the suffix."""
    run = _rft_rollout(kw, T, F, action_cond, backend=backend, device="cuda")
    _assert_same_rollout(run(use_cuda_graph=False), run(use_cuda_graph=True), kw)


def test_fused_weights_same_logits_and_track_updates():
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny")), std=0.05).eval()
    x = torch.randn(5, 64)
    blk = wm.layers[0]
    wqkv, w13 = wm.fused_weights()[0]
    a = blk.attention
    torch.testing.assert_close(x @ wqkv.t(), torch.cat([a.wq(x), a.wk(x), a.wv(x)], -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x @ w13.t(), torch.cat([blk.feed_forward.w1(x), blk.feed_forward.w3(x)], -1),
                               atol=1e-6, rtol=1e-6)
    assert wm.fused_weights()[0][0] is wqkv  # cached while the weights are unchanged
    with torch.no_grad():
        a.wk.weight.add_(1.0)  # an optimizer step: in place
    assert not torch.equal(wm.fused_weights()[0][0], wqkv)
    wm.to(torch.bfloat16)  # new parameter tensors
    assert wm.fused_weights()[0][0].dtype == torch.bfloat16
    assert "layers.0.attention.wq.weight" in wm.state_dict() and not any("fused" in k for k in wm.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset,lens", [("tiny", None), ("tiny", [12, 7]), ("small", [12, 9])])
def test_cpu_decode_path_equals_generic_path(dtype, preset, lens):
    """engine/cpu_decode.py (fused weights, rotary tables, mask-free single-token attention, GQA in tiny)
    gives the generic path's tokens, greedy and sampled, ragged prompts included."""
    wm = init_weights(WorldModel(WorldModelConfig.preset(preset, attn_backend="eager")), std=0.05).eval().to(dtype)
    prompt, acts = _inputs(T=3)
    for kw in (dict(temperature=0), dict(top_p=0.8), dict(top_p=0.9, top_k=40, temperature=1.2)):
        run = lambda fast: wm.rollout(prompt, acts, tokens_per_frame=5, num_samples=3, prompt_lengths=lens,
                                      return_logprobs=True, generator=torch.Generator().manual_seed(2), cpu_fast=fast, **kw)
        (t0, lp0), (t1, lp1) = run(False), run(True)
        assert torch.equal(t0, t1), kw
        torch.testing.assert_close(lp1, lp0, atol=1e-4, rtol=1e-4)


def test_rollout_phase_timings():
    from vla_rft_engine.engine.rollout import rollout
    wm = _wm()
    prompt, acts = _inputs()
    t = {}
    assert rollout(wm, prompt, acts, tokens_per_frame=3, num_samples=2, top_p=0.8, timings=t).shape == (4, 2, 3)
    assert {"prefill_s", "sample_s", "decode_s", "action_s"} <= set(t) and all(v >= 0 for v in t.values())


def test_cpu_rollout_runs_without_triton():
    """The CPU path (auto backend) never imports Triton: it runs where Triton is absent (macOS, some ARM)."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch\n"
        "from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights\n"
        "wm = init_weights(WorldModel(WorldModelConfig.preset('tiny', n_layer=1)), std=0.05).eval()\n"
        "p = torch.randint(4375, 8750, (1, 12)); a = torch.randint(8750, 9006, (2, 1, 7))\n"
        "for t in (0.0, 1.0):\n"
        "    out = wm.rollout(p, a, tokens_per_frame=3, num_samples=2, temperature=t, top_p=0.8,\n"
        "                     generator=torch.Generator().manual_seed(0))\n"
        "    assert out.shape == (2, 2, 3)\n"
        "print('ok', 'triton' in sys.modules and sys.modules['triton'] is not None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok False"


def test_rollout_validates_sampling_settings_and_reports_nan_logits():
    wm = _wm()
    prompt, acts = _inputs(G=1)
    for kw in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="sampling settings out of range"):
            wm.rollout(prompt, acts, tokens_per_frame=3, **kw)
    with torch.no_grad():
        wm.layers[0].feed_forward.w2.weight[0, 0] = float("nan")  # a corrupt checkpoint
    for t in (0.0, 1.0):
        with pytest.raises(FloatingPointError, match="NaN/Inf logits"):
            wm.rollout(prompt, acts, tokens_per_frame=3, temperature=t, generator=torch.Generator().manual_seed(0))
