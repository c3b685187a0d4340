"""pretrain-wm straight from demos + tokenizer: segments built here, action ranges saved beside the model."""
import torch

from vla_rft_engine.cli import main as cli
from vla_rft_engine.data.demos import collect_demos, save_demos
from vla_rft_engine.data.segments import load_segments
from vla_rft_engine.layout import ActionDiscretizer
from vla_rft_engine.models.tokenizer import TokenizerConfig, VisualTokenizer
from vla_rft_engine.models.world_model import WorldModel


def test_pretrain_wm_vocab_follows_tokenizer(tmp_path):
    """A tokenizer with other FSQ levels gets a world model with a matching vocabulary."""
    demos = collect_demos("reach", num_episodes=2, seed=1, image_size=32, max_steps=8)
    save_demos(demos, tmp_path / "demos.pt")
    tok = VisualTokenizer(TokenizerConfig(image_size=32, channels=[8, 16, 16], latent_channels=16, levels=[4, 4, 4]))
    tok.save(tmp_path / "tok")
    assert cli(["pretrain-wm", f"out_dir={tmp_path / 'wm'}", f"demos={tmp_path / 'demos.pt'}", f"tokenizer={tmp_path / 'tok'}",
                "preset=tiny", "steps=1", "batch_size=1", "segment_frames=3"]) == 0
    cfg = WorldModel.from_pretrained(tmp_path / "wm" / "world_model").config
    assert (cfg.num_codes, cfg.vocab_size) == (64, tok.layout.vocab_size) == (64, 64 * 2 + 256 + 2)


def test_pretrain_wm_from_demos(tmp_path):
    demos = collect_demos("reach", num_episodes=3, seed=0, image_size=32, max_steps=12)
    save_demos(demos, tmp_path / "demos.pt")
    tok = VisualTokenizer(TokenizerConfig(image_size=32, channels=[8, 16, 16], latent_channels=16))
    tok.save(tmp_path / "tok")
    out = tmp_path / "wm"
    args = ["pretrain-wm", f"out_dir={out}", f"demos={tmp_path / 'demos.pt'}", f"tokenizer={tmp_path / 'tok'}",
            "preset=tiny", "steps=2", "batch_size=2", "segment_frames=4", "segment_stride=4"]
    assert cli(args) == 0
    seg = load_segments(out / "segments.pt")
    L = tok.layout
    assert seg["ids"].shape[1] == L.context_tokens + 4 * L.dynamics_tokens + 3 * L.action_dim
    # the ranges the model was trained with are the demos' own, saved beside the HF weights
    saved = ActionDiscretizer.load(out / "world_model" / "action_ranges.json")
    ref = ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"]))
    assert torch.equal(saved.low, ref.low) and torch.equal(saved.high, ref.high)
    wm = WorldModel.from_pretrained(out / "world_model")
    assert wm.forward_logits(seg["ids"][:1, :16]).shape == (1, 16, L.vocab_size)
    # segments are cached: a resumed call does not re-tokenize (the file is left untouched)
    mtime = (out / "segments.pt").stat().st_mtime_ns
    assert cli([*args[:-4], "steps=3", "batch_size=2", "segment_frames=4", "segment_stride=4"]) == 0
    assert (out / "segments.pt").stat().st_mtime_ns == mtime
