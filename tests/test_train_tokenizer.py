"""`vla-rft pretrain-tokenizer` end to end at tiny sizes: artifacts, progress logs, resume, bad input."""
import json

import numpy as np
import pytest
import torch

from vla_rft_engine.cli import main as cli
from vla_rft_engine.models.tokenizer import VisualTokenizer
from vla_rft_engine.utils import read_jsonl

TINY = ["model.image_size=32", "model.channels=[8,16,16]", "model.latent_channels=16", "batch_size=2",
        "frames_per_context=1", "eval_pairs=4", "builtin_episodes=6", "builtin_steps=4", "heldout_fraction=0.2",
        "eval_every=2", "ckpt_every=2", "l1_weight=0.5"]


def test_pretrain_tokenizer_builtin_artifacts_and_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(["pretrain-tokenizer", f"out_dir={a}", "steps=4", *TINY]) == 0
    ev = json.loads((a / "eval.json").read_text())
    assert ev["steps"] == 4 and np.isfinite(ev["psnr"]) and 0 < ev["ssim"] <= 1
    assert (a / "reconstruction.png").stat().st_size > 0 and any((a / "tb").iterdir())
    assert [r["step"] for r in read_jsonl(a / "metrics.jsonl") if "eval/psnr" in r] == [2, 4]
    # an interrupted run (2 steps) continued to 4 equals the uninterrupted one, bit for bit
    assert cli(["pretrain-tokenizer", f"out_dir={b}", "steps=2", *TINY]) == 0
    assert cli(["pretrain-tokenizer", f"out_dir={b}", "steps=4", *TINY]) == 0
    ta, tb = VisualTokenizer.load(a), VisualTokenizer.load(b)
    for (k, va), vb in zip(ta.state_dict().items(), tb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_pretrain_tokenizer_from_frames_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 3, 40, 40, 3), dtype=np.uint8)  # resized to 32
    np.save(tmp_path / "frames.npy", frames)
    assert cli(["pretrain-tokenizer", f"out_dir={tmp_path / 'o'}", "steps=1", f"data={tmp_path / 'frames.npy'}", *TINY]) == 0
    assert VisualTokenizer.load(tmp_path / "o").cfg.image_size == 32


def test_pretrain_tokenizer_bad_input(tmp_path, capsys):
    assert cli(["pretrain-tokenizer", "stepz=3"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    assert cli(["pretrain-tokenizer", f"out_dir={tmp_path}", f"data={tmp_path / 'none.npz'}", *TINY]) == 2
    assert "no such file" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    assert cli(["pretrain-tokenizer", f"out_dir={tmp_path}", f"data={tmp_path / 'bad.npy'}", *TINY]) == 2
    assert "uint8 frames" in capsys.readouterr().err
    assert cli(["pretrain-tokenizer", "model.quantizer=pq"]) == 2
    err = capsys.readouterr().err
    assert "quantizer" in err and len(err.strip().splitlines()) == 1


def test_pretrain_tokenizer_uses_lpips_when_weights_are_on_disk(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("lpips", reason="the linear heads ship in the lpips package")
    ck = tmp_path / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ck / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    out = tmp_path / "o"
    assert cli(["pretrain-tokenizer", f"out_dir={out}", "steps=2", "lpips_weight=0.1", *TINY]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["lpips_used"] is True and np.isfinite(ev["lpips"]) and ev["lpips"] >= 0


def test_motion_weights_mark_the_pixels_that_moved():
    import torch
    from vla_rft_engine.train.tokenizer import motion_weights
    ctx = torch.zeros(1, 3, 4, 4)
    frames = torch.zeros(1, 2, 3, 4, 4)
    frames[0, 1, 2, 1, 1] = 0.5  # frame 1: one pixel changed in one channel
    frames[0, 0, 0, 3, 3] = 0.05  # frame 0: a change below the threshold
    w = motion_weights(ctx, frames, 20.0)
    assert w.shape == (1, 2, 1, 4, 4) and w[0, 1, 0, 1, 1] == 21 and (w.sum() - 21) == 31  # the rest weigh 1
    assert torch.equal(motion_weights(ctx, frames, 0.0), torch.ones(1, 2, 1, 4, 4))
