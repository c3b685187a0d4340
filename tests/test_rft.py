"""Stage II loop (rl/rft.py): runs, resumes bit-for-bit, 2 gloo ranks == 1 rank, one WM batch per block
holds the policy chunks and the reference chunk, bad inputs fail clearly. Tiny models built here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_rft_engine.config import ConfigError, load_config, to_dict
from vla_rft_engine.rl import rft
from vla_rft_engine.utils import atomic_save, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def make_stage_files(root: Path) -> dict:
    """A 16x16 tokenizer (16 FSQ codes), a 2-layer WM on its vocabulary, a tiny SFT-format policy, 3 demos."""
    from vla_rft_engine.data.demos import collect_demos, save_demos
    from vla_rft_engine.layout import ActionDiscretizer
    from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy
    from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    torch.manual_seed(0)
    tok = VisualTokenizer(TokenizerConfig(image_size=16, channels=[8, 8, 8], latent_channels=8, dyn_patch=2,
                                          levels=[4, 4]))
    tok.save(root / "tok")
    lay = tok.layout
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=lay.vocab_size, num_codes=lay.num_codes,
                                                         max_position=128)), std=0.2)
    wm.save_pretrained(root / "wm")
    demos = collect_demos("reach", 3, image_size=16)
    save_demos(demos, root / "demos.pt")
    acts = torch.as_tensor(demos["actions"])
    ActionDiscretizer.from_dataset(acts).save(root / "wm" / "action_ranges.json")
    pc = PolicyConfig(chunk_len=4, z_dim=32, enc_channels=8, d_model=32, depth=1, heads=2, sigma_d_model=32,
                      sigma_depth=1, num_steps=4, sigma_init=0.1)
    pol = VLAPolicy(pc)
    pol.set_norm_stats(acts, torch.as_tensor(demos["proprio"]))
    atomic_save({"model": pol.state_dict(), "policy_config": to_dict(pc)}, root / "sft.pt")
    return {"tokenizer": str(root / "tok"), "world_model": str(root / "wm"), "policy": str(root / "sft.pt"),
            "demos": str(root / "demos.pt")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return make_stage_files(tmp_path_factory.mktemp("rft_stage"))


def args_for(stage: dict, out: Path, *extra: str) -> list[str]:
    return [f"{k}={v}" for k, v in stage.items()] + [
        f"out_dir={out}", "grpo.task_instances=2", "grpo.rollouts=3", "grpo.steps=3", "grpo.lr=1e-3",
        "grpo.sigma_lr=1e-3", "grpo.warmup_steps=2", "reward.lambda_lp=0", "image_every=2", "ckpt_every=2",
        "progress=false", "device=cpu", "sigma_init=0.1", *extra]


def cfg_for(stage: dict, out: Path, *extra: str) -> rft.RFTConfig:
    return load_config(rft.RFTConfig, None, args_for(stage, out, *extra))


def params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_short_run_writes_everything(stage, tmp_path):
    res = rft.train(cfg_for(stage, tmp_path, "grpo.ppo_epochs=2", "grpo.minibatches=2"))
    assert res["step"] == 3
    for h in res["history"]:
        for k in ("reward/mean", "reward/std", "adv/abs_mean", "update/ratio_mean", "update/clip_frac",
                  "update/approx_kl_k3", "update/entropy", "sigma/mean", "update/mse", "update/grad_norm",
                  *(f"time/{p}" for p in rft.PHASES)):
            assert k in h and torch.isfinite(torch.tensor(h[k])), k
        assert h["reward/mean"] <= 0 and h["time/wm_rollout"] > 0
    assert (tmp_path / "ckpt.pt").is_file() and (tmp_path / "reward_curve.png").is_file()
    assert (tmp_path / "rollouts" / "step_00002.png").is_file() and list((tmp_path / "tb").iterdir())
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    from vla_rft_engine.train.sft import load_policy
    from_ckpt = load_policy(tmp_path / "ckpt.pt")  # the RFT checkpoint is a policy checkpoint too
    deployed = load_policy(tmp_path)  # ... and policy.safetensors beside it is the same policy, without pickle
    assert all(torch.equal(v, deployed.state_dict()[k]) for k, v in from_ckpt.state_dict().items())
    assert from_ckpt.image_size == deployed.image_size == 16  # the start states' frames (vla-rft eval checks it)
    # only the action head and the Sigma Net moved; the encoder is frozen
    before, after = torch.load(stage["policy"], weights_only=False)["model"], params(tmp_path / "ckpt.pt")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("flow_head.", "sigma_net.")) for k in moved)
    assert any(k.startswith("sigma_net.") for k in moved) and any(k.startswith("flow_head.") for k in moved)


def test_resume_is_bit_exact(stage, tmp_path):
    full = rft.train(cfg_for(stage, tmp_path / "full", "grpo.steps=4"))
    rft.train(cfg_for(stage, tmp_path / "cut", "grpo.steps=4", "stop_at=2"))
    res = rft.train(cfg_for(stage, tmp_path / "cut", "grpo.steps=4"))
    strip = lambda hs: [{k: v for k, v in h.items() if not k.startswith("time/")} for h in hs]  # noqa: E731
    assert strip(res["history"]) == strip(full["history"])
    a, b = params(tmp_path / "full" / "ckpt.pt"), params(tmp_path / "cut" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_reference_shares_the_wm_batch(stage, tmp_path, monkeypatch):
    from vla_rft_engine.models.world_model import WorldModel
    calls, real = [], WorldModel.rollout

    def spy(self, prompt_ids, action_ids, **kw):
        calls.append((prompt_ids.clone(), action_ids.clone(), kw))
        return real(self, prompt_ids, action_ids, **kw)
    monkeypatch.setattr(WorldModel, "rollout", spy)
    cfg = cfg_for(stage, tmp_path, "grpo.steps=2", "states_per_block=2")
    run = rft.build(cfg, rft.du.init("cpu"))
    rft.train(cfg, run)
    assert len(calls) == 2  # one call per step: 2 start states x (3 policy + 2 re-samples + 1 reference)
    prompt, acts, kw = calls[0]
    assert kw["num_samples"] == 6 and kw["top_p"] == 0.8 and kw["temperature"] == 1.0
    lay = run.world.layout
    assert prompt.shape == (2, lay.context_tokens + lay.dynamics_tokens) and acts.shape == (12, 3, 7)
    idx = run.start_states(0)[:2]
    ref = lay.bins_to_vocab(run.world.discretizer.encode(run.pool.get(idx)["ref_actions"]))  # (2, C, 7)
    own = kw["row_prompt_ids"].view(2, 6, 7)  # each rollout's prompt ends with its own a_0 (Eq. 10)
    chunks = torch.cat([own[:, :, None], acts.view(2, 6, 3, 7)], 2)  # (2, 6, C, 7): every row's whole chunk
    assert torch.equal(chunks[:, -1], ref)  # the reference rollout = the dataset chunk, a_0 included
    assert torch.equal(chunks[:, 3], chunks[:, 0]) and torch.equal(chunks[:, 4], chunks[:, 0])  # re-samples
    assert not torch.equal(own[:, :3], ref[:, None, 0].expand(2, 3, 7))  # the policy's own a_0, not the dataset's
    assert torch.equal(prompt[:, :lay.context_tokens], lay.context_to_vocab(
        run.world.tokenizer.encode_context(run.pool.get(idx)["image"])))


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_two_gloo_ranks_equal_one(stage, tmp_path, wrap):
    extra = ["grpo.task_instances=4", "grpo.minibatches=2", "states_per_block=1", "grpo.steps=2"]
    one = rft.train(cfg_for(stage, tmp_path / "w1", *extra))
    args = args_for(stage, tmp_path / "w2", f"distributed={wrap}", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "python")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "-m", "vla_rft_engine.cli", "rft", *args], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = read_jsonl(tmp_path / "w2" / "metrics.jsonl")
    assert len(two) == len(one["history"]) == 2
    for h1, h2 in zip(one["history"], two):
        for k, v in h1.items():
            if not k.startswith("time/"):
                assert v == pytest.approx(h2[k], rel=1e-4, abs=1e-6), k
    a, b = params(tmp_path / "w1" / "ckpt.pt"), params(tmp_path / "w2" / "ckpt.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_bad_inputs(stage, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="N >= 2"):
        cfg_for(stage, tmp_path, "grpo.rollouts=1")
    for key, cmd in (("policy", "vla-rft sft"), ("world_model", "vla-rft pretrain-wm"),
                     ("tokenizer", "vla-rft pretrain-tokenizer"), ("demos", "demos.pt")):
        with pytest.raises(FileNotFoundError, match=cmd):
            rft.build(cfg_for(stage, tmp_path, f"{key}={tmp_path / 'nope'}"), rft.du.init("cpu"))
    from vla_rft_engine.data.demos import load_demos, save_demos
    d = load_demos(stage["demos"])
    d["actions"] = d["actions"][..., :6]  # a 6-D dataset for a 7-D policy: refused before any step
    save_demos(d, tmp_path / "demos6.pt")
    with pytest.raises(ValueError, match="hold 6-D actions .* the policy takes 7-D"):
        rft.build(cfg_for(stage, tmp_path, f"demos={tmp_path / 'demos6.pt'}"), rft.du.init("cpu"))
    rft.train(cfg_for(stage, tmp_path, "grpo.steps=1"))
    with pytest.raises(ConfigError, match=r"grpo\.lr: checkpoint 0\.001 vs now 0\.002"):
        rft.train(cfg_for(stage, tmp_path, "grpo.steps=2", "grpo.lr=2e-3"))
    monkeypatch.setattr(rft, "verified_reward", lambda cfg, **kw: torch.full(kw["policy_frames"].shape[:2], float("nan")))
    with pytest.raises(FloatingPointError, match="NaN"):
        rft.train(cfg_for(stage, tmp_path / "nan", "grpo.steps=1"))


def test_r1_and_r2_designs(stage, tmp_path):
    for design in ("r1", "r2"):
        h = rft.train(cfg_for(stage, tmp_path / design, "grpo.steps=1", f"reward.design={design}"))["history"]
        assert torch.isfinite(torch.tensor(h[0]["reward/mean"]))
        assert (h[0]["time/wm_rollout"] == 0) == (design == "r1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: NCCL / bf16 WM path")
def test_cuda_step(stage, tmp_path):
    h = rft.train(cfg_for(stage, tmp_path, "grpo.steps=1", "device=cuda"))["history"]
    assert torch.isfinite(torch.tensor(h[0]["reward/mean"]))


def test_steps_without_reward_signal_warn_then_stop(stage, tmp_path, monkeypatch):
    real = rft.RFTRun.step

    def flat_step(self, step):  # the real step, as if every group's rollouts had come out identical
        m, viz = real(self, step)
        return {**m, "reward/group_std": 0.0}, viz
    monkeypatch.setattr(rft.RFTRun, "step", flat_step)
    with pytest.warns(UserWarning, match="same reward"):
        with pytest.raises(rft.UserError, match="rft stopped at step 2: 2 steps in a row with equal rewards"):
            rft.train(cfg_for(stage, tmp_path, "grpo.steps=4", "max_flat_steps=2"))
