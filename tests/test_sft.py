"""Stage I SFT: resume == uninterrupted, checkpoint contents, logs, learning on toy data, CLI, and under torchrun
(DDP, FSDP2) 2 gloo ranks, stopped and resumed, == one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_rft_engine.config import ConfigError, load_config
from vla_rft_engine.train import sft
from vla_rft_engine.utils import read_jsonl

TINY = ["data=synthetic", "num_episodes=6", "image_size=16", "batch_size=8", "progress=false", "eval_every=4",
        "eval_max=16", "log_every=1", "warmup_steps=2", "policy.d_model=16", "policy.depth=1", "policy.heads=2",
        "policy.z_dim=16", "policy.enc_channels=8", "policy.sigma_d_model=16", "policy.sigma_depth=1",
        "policy.chunk_len=4"]


def cfg(tmp, *extra):
    return load_config(sft.SFTConfig, None, TINY + [f"out_dir={tmp}", *extra])


def test_resume_equals_uninterrupted(tmp_path):
    full = sft.train(cfg(tmp_path / "a", "steps=6", "ckpt_every=100"))
    part = sft.train(cfg(tmp_path / "b", "steps=6", "stop_at=3", "ckpt_every=100"))
    assert part["step"] == 3
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    rest = sft.train(cfg(tmp_path / "b", "steps=6", "ckpt_every=100"))
    assert rest["step"] == 6
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-6, msg=k)
    assert rest["val/flow_loss"] == pytest.approx(full["val/flow_loss"], abs=1e-6)
    # the JSONL log of the resumed run holds steps 1..6 once each (appended, not overwritten)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "train/flow_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "b" / "tb").is_dir() and (tmp_path / "b" / "config.yaml").is_file()


def test_checkpoint_has_norm_stats_and_loads(tmp_path):
    sft.train(cfg(tmp_path, "steps=2"))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert set(ck["norm_stats"]) == {"action_low", "action_high", "proprio_mean", "proprio_std"}
    assert not (tmp_path / ".ckpt.pt.tmp").exists()
    pol = sft.load_policy(tmp_path / "ckpt.pt")
    torch.testing.assert_close(pol.action_low, ck["norm_stats"]["action_low"])
    d = sft.synthetic_demos(2, image_size=16)
    a = pol.act(torch.as_tensor(d["frames"][:, 0]), d["instructions"], torch.as_tensor(d["proprio"][:, 0]))
    assert a.shape == (2, 4, 7)
    assert (a >= pol.action_low - 1e-6).all() and (a <= pol.action_high + 1e-6).all()


def test_sft_learns_toy_data(tmp_path):
    res = sft.train(cfg(tmp_path, "steps=80", "lr=3e-3", "eval_every=80", "batch_size=16", "num_episodes=10"))
    first = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/flow_loss" in r][:5]
    assert res["val/flow_loss"] < 0.5 * sum(r["train/flow_loss"] for r in first) / 5
    assert len([k for k in res if k.startswith("val/l1_dim")]) == 7


def test_chunks_pad_with_last_action():
    d = sft.synthetic_demos(3, steps=5, image_size=8)
    data = sft.ChunkData(d, [0, 2], chunk_len=4)
    img, instr, prop, act = data.batch(torch.tensor([0, len(data) - 1]))
    assert img.shape == (2, 8, 8, 3) and act.shape == (2, 4, 7) and instr[1] == d["instructions"][2]
    torch.testing.assert_close(act[0], torch.as_tensor(d["actions"][0, :4]))
    torch.testing.assert_close(act[1], torch.as_tensor(d["actions"][2, -1]).expand(4, 7))


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key"):
        cfg(tmp_path, "nope=1")
    with pytest.raises(ConfigError, match="Stage II's .* vla-rft rft"):  # one owner: rft's sigma_min/max/init
        cfg(tmp_path, "policy.sigma_init=0.1")
    with pytest.raises(ConfigError, match="logprob_reduce"):  # Stage II's too: grpo.logprob_reduce
        cfg(tmp_path, "policy.logprob_reduce=sum")
    from vla_rft_engine.cli import main
    assert main(["sft", "--help"]) == 0
    assert "tau_alpha" in capsys.readouterr().out
    assert main(["sft", "val_fraction=2"]) == 2


def test_builtin_demos_tiny(tmp_path):
    demos = pytest.importorskip("vla_rft_engine.data.demos")
    d = demos.collect_demos("reach", 2, seed=0, image_size=16, max_steps=6)
    demos.save_demos(d, tmp_path / "demos.pt")
    res = sft.train(cfg(tmp_path / "run", f"data={tmp_path / 'demos.pt'}", "steps=2", "val_fraction=0.5"))
    assert res["episodes"] == 2 and json.dumps(res)


def test_load_policy_reads_pre_enc_version_checkpoints(tmp_path):
    """Checkpoints written before PolicyConfig.enc_version existed hold the version-1 small encoder."""
    sft.train(cfg(tmp_path, "steps=1", "policy.enc_version=1"))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    del ck["policy_config"]["enc_version"]
    torch.save(ck, tmp_path / "old.pt")
    pol = sft.load_policy(tmp_path / "old.pt")
    assert pol.cfg.enc_version == 1 and pol.encoder.version == 1


def test_readout_trains_at_its_own_lr(tmp_path):
    """The v2 colour-query readout gets lr * readout_lr_mult; everything else (not the Sigma Net) gets lr."""
    sft.train(cfg(tmp_path, "steps=1", "lr=1e-3", "readout_lr_mult=7", "warmup_steps=1"))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    groups = ck["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 7e-3])
    pol = sft.load_policy(tmp_path / "ckpt.pt")
    assert len(groups[1]["params"]) == len(pol.encoder.readout_parameters())
    n_trained = len([n for n, _ in pol.named_parameters() if not n.startswith("sigma_net.")])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_trained


def test_evaluation_shares_add_up_to_one_process(tmp_path, monkeypatch):
    """Each of 3 ranks evaluates its share of 11 val samples (4, 4, 3: the last share repeats a sample at weight
    0 so every rank runs as many forwards); the shares' sums are the one-process evaluation."""
    from vla_rft_engine import distributed as du
    from vla_rft_engine.models.policy import VLAPolicy
    c = cfg(tmp_path, "eval_max=11", "batch_size=6")
    data = sft.ChunkData(sft.synthetic_demos(2, image_size=16), [0, 1], c.policy.chunk_len)
    torch.manual_seed(0)
    policy = VLAPolicy(c.policy)
    policy.set_norm_stats(data.raw_actions, data.proprio)
    one = sft.evaluate(policy, data, c, torch.device("cpu"))
    monkeypatch.setattr(du, "all_sum", lambda d, x: x)  # each fake rank's own share, not reduced
    shares = [sft.evaluate(policy, data, c, torch.device("cpu"), du.Dist(rank=r, world=3)) for r in range(3)]
    for k, v in one.items():
        assert sum(s[k] for s in shares) == pytest.approx(v, rel=1e-5), k


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m vla_rft_engine.cli sft ...` on CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "python")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vla_rft_engine.cli", "sft", *TINY, "device=cpu", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 6 uninterrupted steps, evaluated at 4 and 6."""
    out = tmp_path_factory.mktemp("sft_one")
    sft.train(cfg(out, "steps=6", "ckpt_every=100"))
    return out


@pytest.mark.parametrize("wrap,resume_ranks", [("ddp", 2), ("fsdp2", 2), ("fsdp2", 1)])
def test_two_gloo_ranks_stopped_and_resumed_equal_one_process(tmp_path, one_process, wrap, resume_ranks):
    """torchrun, DDP or FSDP2: each rank trains on half of one global batch and evaluates half of the val samples.
    Stopped after step 3 (as if killed: the checkpoint is the last thing written) and resumed by 2 ranks, or by
    one process from the sharded run's checkpoint: every logged loss, gradient norm and val metric, the weights
    and the Adam moments equal the one uninterrupted process's."""
    two = tmp_path / "two"
    p = _torchrun(f"out_dir={two}", "steps=6", "stop_at=3", "ckpt_every=100", f"distributed={wrap}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(two / "ckpt.pt", weights_only=True)["step"] == 3
    if resume_ranks == 2:
        p = _torchrun(f"out_dir={two}", "steps=6", "ckpt_every=100", f"distributed={wrap}")
        assert p.returncode == 0, p.stderr[-3000:]
    else:
        sft.train(cfg(two, "steps=6", "ckpt_every=100"))
    one_log, two_log = (read_jsonl(d / "metrics.jsonl") for d in (one_process, two))
    assert [r["step"] for r in two_log] == [r["step"] for r in one_log] == [1, 2, 3, 4, 4, 5, 6, 6]
    for a, b in zip(one_log, two_log):
        assert set(a) == set(b)
        for k in a:
            if k.startswith(("train/", "val/")):
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one_process, two))
    assert a["step"] == b["step"] == 6 and set(a["model"]) == set(b["model"])
    for k in a["model"]:  # Adam divides by sqrt of near-zero second moments: summation order shows at 1e-5
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=2e-5, msg=k)
    assert [g["params"] for g in a["optimizer"]["param_groups"]] == [g["params"] for g in b["optimizer"]["param_groups"]]
    for i, st in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer"]["state"][i][k], st[k], rtol=1e-4, atol=1e-6)
    pol = sft.load_policy(two / "policy.safetensors")
    for k, v in pol.state_dict().items():
        assert torch.equal(v, b["model"][k]), k


def test_two_gloo_ranks_stop_together_on_divergence(tmp_path):
    """lr=1e30: both ranks report the same first non-finite step, one line each, and exit; no rank waits."""
    p = _torchrun(f"out_dir={tmp_path}", "steps=20", "lr=1e30", "distributed=fsdp2")
    assert p.returncode != 0
    import re  # the ranks share stderr: one rank's message may land before the other's newline
    steps = re.findall(r"sft diverged at step (\d+):", p.stderr)
    assert len(steps) == 2 and len(set(steps)) == 1, p.stderr[-3000:]


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    from vla_rft_engine.cli import main as cli
    assert cli(["sft", f"out_dir={tmp_path}", "steps=2", *TINY]) == 0
    assert cli(["sft", f"out_dir={tmp_path}", "steps=4", *TINY, "policy.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert "policy.d_model: 16 before vs 32 now" in err and "Traceback" not in err


def test_checkpoint_carries_the_flow_tau_law(tmp_path):
    """RFT's flow-MSE term draws tau from the law the policy was trained with (the SFT config), not a constant."""
    sft.train(cfg(tmp_path, "steps=1", "tau_alpha=0.5", "tau_beta=2.0"))
    assert sft.load_policy(tmp_path / "ckpt.pt").flow_tau == (0.5, 2.0)


def test_policy_safetensors_equals_the_training_checkpoint(tmp_path):
    """policy.safetensors (no pickle) holds the same policy as ckpt.pt; a dir loads it; a corrupt one is named."""
    from safetensors import safe_open
    from vla_rft_engine.config import BadFileError
    sft.train(cfg(tmp_path, "steps=2", "tau_alpha=0.5", "tau_beta=2.0"))
    a, b, c = (sft.load_policy(p) for p in (tmp_path / "ckpt.pt", tmp_path / "policy.safetensors", tmp_path))
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v) and torch.equal(c.state_dict()[k], v), k
    assert b.flow_tau == a.flow_tau == (0.5, 2.0) and b.cfg == a.cfg
    assert a.image_size == b.image_size == 16  # the demos' frame size (vla-rft eval refuses another)
    with safe_open(str(tmp_path / "policy.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vla_rft"])["step"] == 2
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(BadFileError, match="bad.safetensors is corrupt"):
        sft.load_policy(tmp_path / "bad.safetensors")
