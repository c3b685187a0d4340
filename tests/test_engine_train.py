"""pretrain-wm on synthetic token segments (loss falls, masked loss, checkpoint resume) and, when the
tokenizer/demos modules are present, segments building + wm-eval end to end on tiny random inputs."""
import json

import numpy as np
import pytest
import torch

from vla_rft_engine.data.segments import load_segments, save_segments, segment_loss_mask
from vla_rft_engine.layout import TokenLayout
from vla_rft_engine.utils import read_jsonl


def _synthetic(path, n=32):
    lay = TokenLayout(context_tokens=8, dynamics_tokens=4)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 4375, (n, 8), generator=g)
    dyn = (ctx[:, None, :4] + torch.arange(3)[None, :, None]) % 4375  # learnable: frames follow the context
    ids = lay.build_segment(ctx, dyn, torch.randint(0, 256, (n, 2, 7), generator=g))
    mask = segment_loss_mask(lay, 3).expand_as(ids).clone()
    save_segments({"ids": ids, "loss_mask": mask}, path)
    return ids, mask


def test_loss_mask_covers_generated_frames_only():
    lay = TokenLayout(context_tokens=8, dynamics_tokens=4)
    m = segment_loss_mask(lay, 3)
    assert m.shape == (8 + 3 * 4 + 2 * 7,) and m.sum() == 8
    assert not m[:8 + 4 + 7].any() and m[19:23].all() and not m[23:30].any()


def test_pretrain_wm_learns_and_resumes(tmp_path):
    from vla_rft_engine.train.world_model import main
    _synthetic(tmp_path / "seg.pt")
    args = [f"segments={tmp_path / 'seg.pt'}", f"out_dir={tmp_path / 'run'}", "preset=tiny", "batch_size=8",
            "lr=3e-3", "log_every=5", "ckpt_every=20", "device=cpu"]
    assert main(args + ["steps=20"]) == 0
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert main(args + ["steps=40"]) == 0  # resumes at step 20
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert recs[-1]["loss"] < first[0]["loss"] - 0.5
    assert (tmp_path / "run" / "world_model" / "config.json").is_file()
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 40


def test_pretrain_wm_resume_is_bit_exact_and_refuses_other_settings(tmp_path, capsys):
    from vla_rft_engine.cli import main as cli
    from vla_rft_engine.models.world_model import WorldModel
    _synthetic(tmp_path / "seg.pt")
    args = [f"segments={tmp_path / 'seg.pt'}", "preset=tiny", "batch_size=4", "lr=3e-3", "ckpt_every=3",
            "progress=false", "device=cpu"]
    assert cli(["pretrain-wm", *args, f"out_dir={tmp_path / 'a'}", "steps=6"]) == 0
    assert cli(["pretrain-wm", *args, f"out_dir={tmp_path / 'b'}", "steps=3"]) == 0
    assert cli(["pretrain-wm", *args, f"out_dir={tmp_path / 'b'}", "steps=6"]) == 0  # resumes at 3
    wa, wb = (WorldModel.from_pretrained(tmp_path / d / "world_model").state_dict() for d in "ab")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    before = (tmp_path / "b" / "config.yaml").read_text()
    assert cli(["pretrain-wm", *args, f"out_dir={tmp_path / 'b'}", "steps=9", "lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.003 before vs 0.001 now" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "config.yaml").read_text() == before  # the record of the run is untouched


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_pretrain_wm_two_gloo_ranks_equal_one(tmp_path, wrap):
    """torchrun DDP or FSDP2: each rank trains on its share of one global batch; losses and weights match one
    process, with change_weight on (the weighted mean's denominator is the global one)."""
    import dataclasses
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vla_rft_engine.train.world_model import main
    from vla_rft_engine.models.world_model import WorldModel
    ids, mask = _synthetic(tmp_path / "seg0.pt")
    lay = TokenLayout(context_tokens=8, dynamics_tokens=4)
    save_segments({"ids": ids, "loss_mask": mask, "layout": dataclasses.asdict(lay)}, tmp_path / "seg.pt")
    args = [f"segments={tmp_path / 'seg.pt'}", "preset=tiny", "batch_size=8", "lr=3e-3", "log_every=2",
            "ckpt_every=6", "steps=6", "change_weight=5", "progress=false", "device=cpu"]
    assert main(args + [f"out_dir={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "python")}
    for steps in (3, 6):  # stopped at 3 and resumed: the sharded checkpoint round trip is in the comparison
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--standalone", "-m", "vla_rft_engine.cli", "pretrain-wm", *args,
                            f"distributed={wrap}", "ckpt_every=3", f"steps={steps}", f"out_dir={tmp_path / 'two'}"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    one, two = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert [r["step"] for r in two] == [2, 3, 4, 6]  # 3: the first run's last step
    two = {r["step"]: r for r in two}
    for a in one:
        assert a["loss"] == pytest.approx(two[a["step"]]["loss"], rel=1e-5)
    wa, wb = (WorldModel.from_pretrained(tmp_path / d / "world_model").state_dict() for d in ("one", "two"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)  # Adam: near-zero grads, summation order


def test_bad_segments_file(tmp_path):
    torch.save({"ids": torch.zeros(2, 5, dtype=torch.long)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a segments file"):
        load_segments(tmp_path / "bad.pt")


def test_segments_and_wm_eval_end_to_end(tmp_path):
    tokmod = pytest.importorskip("vla_rft_engine.models.tokenizer")
    demos_mod = pytest.importorskip("vla_rft_engine.data.demos")
    from vla_rft_engine.data.segments import build_segments
    from vla_rft_engine.layout import ActionDiscretizer
    from vla_rft_engine.models.world_model import WorldModel, WorldModelConfig, init_weights
    from vla_rft_engine.train.wm_eval import main as wm_eval
    tok = tokmod.VisualTokenizer(tokmod.TokenizerConfig(image_size=16, downsample=2, channels=[8, 16], latent_channels=8))
    tok.save(tmp_path / "tok")
    rng = np.random.default_rng(0)
    demos = {"frames": rng.integers(0, 255, (2, 5, 16, 16, 3), dtype=np.uint8),
             "actions": rng.normal(size=(2, 4, 7)).astype(np.float32), "proprio": np.zeros((2, 5, 8), np.float32),
             "success": np.zeros(2, bool), "lengths": np.full(2, 4), "seeds": np.arange(2), "instructions": ["a", "b"]}
    demos_mod.save_demos(demos, tmp_path / "demos.pt")
    seg = build_segments(demos_mod.load_demos(tmp_path / "demos.pt"), tok,
                         ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"])), frames=3, stride=1)
    lay = tok.layout
    assert seg["ids"].shape == (6, lay.context_tokens + 3 * lay.dynamics_tokens + 2 * 7)
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=lay.vocab_size, num_codes=lay.num_codes)))
    wm.save_pretrained(tmp_path / "wm")
    ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"])).save(tmp_path / "wm" / "action_ranges.json")
    assert wm_eval([f"wm={tmp_path / 'wm'}", f"tokenizer={tmp_path / 'tok'}", f"demos={tmp_path / 'demos.pt'}",
                    f"out_dir={tmp_path / 'ev'}", "frames=3", "device=cpu"]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["frames"] == 3 and res["mse"] >= 0 and np.isfinite(res["psnr"])
    assert res["own_vs_swapped_mean_abs"] > 0 and np.isfinite(res["moving_l1_ratio"])  # random WM: actions matter
    assert (tmp_path / "ev" / "rollouts.png").is_file()
    # an action-blind world model (every action token embeds alike): swapped actions change nothing
    off = lay.action_offset
    wm.tok_embeddings.weight.data[off:off + lay.num_action_bins] = wm.tok_embeddings.weight.data[off]
    wm.save_pretrained(tmp_path / "wm")
    assert wm_eval([f"wm={tmp_path / 'wm'}", f"tokenizer={tmp_path / 'tok'}", f"demos={tmp_path / 'demos.pt'}",
                    f"out_dir={tmp_path / 'ev2'}", "frames=3", "device=cpu"]) == 0
    blind = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert blind["own_vs_swapped_mean_abs"] == 0 and blind["moving_l1_ratio"] == pytest.approx(1.0)


def test_action_dropout_replaces_exactly_the_dropped_rows_action_tokens():
    from vla_rft_engine.train.world_model import drop_actions
    lay = TokenLayout(context_tokens=8, dynamics_tokens=4)
    ids, _ = _synthetic_ids(lay)
    drop = torch.tensor([True, False, True] + [False] * (ids.shape[0] - 3))
    out = drop_actions(ids, lay, drop)
    is_action = torch.zeros(ids.shape[1], dtype=torch.bool)
    is_action[12:19], is_action[23:30] = True, True  # ctx 8 + dyn 4, then 7 action tokens; again after frame 2
    assert (out[drop][:, is_action] == lay.null_action_id).all()
    assert torch.equal(out[drop][:, ~is_action], ids[drop][:, ~is_action]) and torch.equal(out[~drop], ids[~drop])
    assert lay.null_action_id not in ids and lay.null_action_id < lay.vocab_size


def _synthetic_ids(lay, n=8):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 4375, (n, 8), generator=g)
    return lay.build_segment(ctx, torch.randint(0, 4375, (n, 3, 4), generator=g),
                             torch.randint(0, 256, (n, 2, 7), generator=g)), ctx


def test_pretrain_wm_cosine_schedule_and_action_dropout_run(tmp_path):
    import math
    from vla_rft_engine.train.world_model import main
    _synthetic(tmp_path / "seg.pt")
    args = [f"segments={tmp_path / 'seg.pt'}", f"out_dir={tmp_path / 'run'}", "preset=tiny", "batch_size=8", "lr=3e-3",
            "log_every=5", "device=cpu", "steps=20", "schedule=cosine", "warmup=5", "min_lr=1e-4", "action_dropout=0.5"]
    assert main(args) == 0
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]  # lr of the step each record closes
    want = [3e-3] + [1e-4 + 0.5 * (3e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 1 - 5) / 15)) for s in (10, 15, 20)]
    assert lrs == pytest.approx(want, rel=1e-6)
