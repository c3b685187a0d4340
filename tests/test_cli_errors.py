"""The CLI on bad input and diverging settings: exit 2, one line saying what is wrong and what to do, no
traceback, and nothing non-finite written (logs stay valid JSON)."""
import json
import math

import pytest
import torch

from vla_rft_engine.cli import main as cli

TOK = ["model.image_size=32", "model.channels=[8,16,16]", "model.latent_channels=16", "batch_size=2",
       "frames_per_context=1", "eval_pairs=4", "builtin_episodes=6", "builtin_steps=4", "heldout_fraction=0.2",
       "eval_every=50", "ckpt_every=1"]
SFT = ["data=synthetic", "num_episodes=6", "image_size=16", "batch_size=8", "progress=false", "eval_every=50",
       "eval_max=16", "log_every=1", "ckpt_every=1", "warmup_steps=1", "policy.d_model=16", "policy.depth=1",
       "policy.heads=2", "policy.z_dim=16", "policy.enc_channels=8", "policy.sigma_d_model=16",
       "policy.sigma_depth=1", "policy.chunk_len=4"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _jsonl_valid(path):
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {path}"))


def _all_finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def _segments(path):
    from vla_rft_engine.data.segments import save_segments, segment_loss_mask
    from vla_rft_engine.layout import TokenLayout
    lay = TokenLayout(context_tokens=8, dynamics_tokens=4)
    g = torch.Generator().manual_seed(0)
    ids = lay.build_segment(torch.randint(0, 4375, (16, 8), generator=g), torch.randint(0, 4375, (16, 3, 4), generator=g),
                            torch.randint(0, 256, (16, 2, 7), generator=g))
    save_segments({"ids": ids, "loss_mask": segment_loss_mask(lay, 3).expand_as(ids).clone()}, path)


def test_pretrain_wm_stops_at_the_first_non_finite_step(tmp_path, capsys):
    _segments(tmp_path / "seg.pt")
    out = tmp_path / "run"
    assert cli(["pretrain-wm", f"segments={tmp_path / 'seg.pt'}", f"out_dir={out}", "preset=tiny", "batch_size=4",
                "lr=1e30", "steps=20", "log_every=1", "ckpt_every=1", "progress=false", "device=cpu"]) == 2
    _one_line_error(capsys, "pretrain-wm diverged at step", "Lower lr (now 1e+30)")
    assert not (out / "world_model").exists()
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] >= 1 and _all_finite(ck["model"])  # the last checkpoint is from before the bad step
    _jsonl_valid(out / "metrics.jsonl")


def test_sft_stops_at_the_first_non_finite_step(tmp_path, capsys):
    out = tmp_path / "sft"
    assert cli(["sft", f"out_dir={out}", "lr=1e30", "steps=20", *SFT]) == 2
    _one_line_error(capsys, "sft diverged at step")
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert _all_finite(ck["model"]) and ck["step"] < 20
    _jsonl_valid(out / "metrics.jsonl")


def test_tokenizer_stops_at_the_first_non_finite_step(tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli(["pretrain-tokenizer", f"out_dir={out}", "lr=1e30", "steps=20", *TOK]) == 2
    _one_line_error(capsys, "pretrain-tokenizer diverged at step")
    assert not (out / "tokenizer.safetensors").exists()
    if (out / "metrics.jsonl").exists():
        _jsonl_valid(out / "metrics.jsonl")


def test_logger_writes_non_finite_values_as_null(tmp_path):
    from vla_rft_engine.utils import RunLogger, read_jsonl
    log = RunLogger(tmp_path)
    log.log(1, {"loss": float("nan"), "x": math.inf, "ok": 2.0})
    log.close()
    rec = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert rec["loss"] is None and rec["x"] is None and rec["ok"] == 2.0


def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert cli(["pretrain-wm", f"segments={tmp_path / 'none.pt'}", f"out_dir={tmp_path / 'o'}"]) == 2
    _one_line_error(capsys, "none.pt")
    monkeypatch.setenv("VLA_RFT_DEBUG", "1")  # the traceback on request
    with pytest.raises((FileNotFoundError, ValueError)):
        cli(["pretrain-wm", f"segments={tmp_path / 'none.pt'}", f"out_dir={tmp_path / 'o'}"])


def test_one_writer_per_run_dir_and_stale_temp_files_go(tmp_path):
    import subprocess
    import sys
    from vla_rft_engine.config import UserError
    from vla_rft_engine.utils import RunDirLock
    (tmp_path / ".ckpt.pt.tmp99999").write_bytes(b"x" * 10)  # left by a killed writer
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vla_rft_engine.utils import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not (tmp_path / ".ckpt.pt.tmp99999").exists()
        with pytest.raises(UserError, match=f"another process \\(pid {holder.pid}\\) is writing to"):
            with RunDirLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path):  # a killed holder's lock is gone with it
        pass


def test_resumed_logs_hold_each_step_once(tmp_path):
    from vla_rft_engine.utils import RunLogger, read_jsonl
    log = RunLogger(tmp_path)
    for s in range(1, 8):  # a run killed after logging step 7, its checkpoint at step 5
        log.log(s, {"loss": float(s)})
    log.close()
    log = RunLogger(tmp_path, resume_step=5)
    for s in range(6, 9):
        log.log(s, {"loss": float(s)})
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 9))


class _Payload:  # unpickling this would run os.system; no loader may do it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_runs_no_code_through_any_loader(tmp_path, capsys):
    from vla_rft_engine.config import BadFileError
    from vla_rft_engine.data.demos import load_demos
    from vla_rft_engine.data.segments import load_segments
    from vla_rft_engine.models.tokenizer import VisualTokenizer
    from vla_rft_engine.train.sft import load_policy
    from vla_rft_engine.utils import load_checkpoint
    marker = tmp_path / "pwned"
    bad = tmp_path / "ckpt.pt"
    torch.save({"model": _Payload(marker), "format": "vla-rft-demos"}, bad)
    (tmp_path / "tok").mkdir()
    torch.save({"model": _Payload(marker)}, tmp_path / "tok" / "tokenizer.pt")
    for load in (load_checkpoint, load_demos, load_segments, load_policy,
                 lambda p: VisualTokenizer.load(tmp_path / "tok")):
        with pytest.raises(BadFileError, match="weights_only"):
            load(bad)
    assert not marker.exists()
    assert cli(["wm-eval", f"wm={tmp_path}", f"tokenizer={tmp_path / 'tok'}", f"demos={bad}"]) == 2
    _one_line_error(capsys)
    assert not marker.exists()


def test_demos_with_a_nan_action_are_refused_at_load_naming_the_episode(tmp_path):
    import numpy as np
    from vla_rft_engine.config import BadFileError
    from vla_rft_engine.data.demos import collect_demos, load_demos, save_demos
    d = collect_demos("reach", 4, seed=0, image_size=16, max_steps=6)
    d["actions"] = np.array(d["actions"], dtype=np.float32)
    d["actions"][2, 3, 1] = np.nan
    save_demos(d, tmp_path / "demos.pt")
    with pytest.raises(BadFileError, match=r"actions of episode\(s\) \[2\] hold NaN"):
        load_demos(tmp_path / "demos.pt")


def test_a_corrupt_world_model_file_is_named(tmp_path, capsys):
    """Truncated model.safetensors / garbled config.json: a one-line error naming the file, exit 2."""
    import shutil
    from vla_rft_engine.layout import ActionDiscretizer
    from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
    from vla_rft_engine.models.world import LearnedWorld
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    tok = VisualTokenizer(TokenizerConfig(image_size=16, channels=[8, 8, 8], latent_channels=8, dyn_patch=2,
                                          levels=[4, 4]))
    lay = tok.layout
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=lay.vocab_size, num_codes=lay.num_codes)))
    good = tmp_path / "good"
    LearnedWorld(tok, wm, ActionDiscretizer(-torch.ones(7), torch.ones(7))).save(good)
    for name, damage in (("model.safetensors", lambda b: b[: len(b) // 3]), ("config.json", lambda b: b[:-10])):
        bad = tmp_path / name.replace(".", "_")
        shutil.copytree(good, bad)
        (bad / name).write_bytes(damage((bad / name).read_bytes()))
        assert cli(["wm-eval", f"wm={bad}", f"demos={tmp_path / 'demos.pt'}"]) == 2
        err = _one_line_error(capsys, "is corrupt")
        assert str(bad / name) in err


@pytest.mark.parametrize("cmd,args,key,record", [
    ("pretrain-tokenizer", TOK + ["steps=2"], "lr=1e-3", "train_config.yaml"),
    ("sft", SFT + ["steps=2"], "lr=1e-3", "config.yaml")])
def test_rerun_with_other_settings_is_refused_and_overwrites_nothing(tmp_path, capsys, cmd, args, key, record):
    out = tmp_path / "run"
    assert cli([cmd, f"out_dir={out}", *args]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".yaml", ".pt", ".safetensors")}
    assert cli([cmd, f"out_dir={out}", *args, key]) == 2
    _one_line_error(capsys, "lr: ")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".yaml", ".pt", ".safetensors")}
    assert after == before and record in before
