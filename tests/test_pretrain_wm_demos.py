"""pretrain-wm straight from demos + tokenizer: segments built here, action ranges saved beside the model."""
import pytest
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


def test_pretrain_wm_from_demos(tmp_path, capsys):
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
    # ... unless they were made from other inputs: new demos under the same file name rebuild the cache
    save_demos(collect_demos("reach", num_episodes=3, seed=1, image_size=32, max_steps=12), tmp_path / "demos.pt")
    assert cli([*args[:-4], "steps=4", "batch_size=2", "segment_frames=4", "segment_stride=4"]) == 0
    assert "rebuilding it" in capsys.readouterr().out
    assert not torch.equal(load_segments(out / "segments.pt")["ids"], seg["ids"])


def test_segments_skip_the_idle_tail_after_success():
    """No segment starts after the step an episode was solved, unless idle_tail=True."""
    from vla_rft_engine.data.segments import build_segments
    demos = collect_demos("reach", num_episodes=2, seed=0, image_size=32, max_steps=30)
    demos["lengths"] = torch.tensor([5, 30]).numpy()
    tok = VisualTokenizer(TokenizerConfig(image_size=32, channels=[8, 16, 16], latent_channels=16)).eval()
    disc = ActionDiscretizer.from_dataset(torch.as_tensor(demos["actions"]))
    short = build_segments(demos, tok, disc, frames=4, stride=2)
    full = build_segments(demos, tok, disc, frames=4, stride=2, idle_tail=True)
    per_episode = len(range(0, 31 - 4 + 1, 2))  # 14 starts in 31 frames
    assert full["ids"].shape[0] == 2 * per_episode
    assert short["ids"].shape[0] == len([s for s in range(0, 28, 2) if s <= 5]) + per_episode
    torch.testing.assert_close(short["ids"][:3], full["ids"][:3])  # starts 0, 2, 4 of episode 0 are kept


def test_masked_nll_equals_full_logits_reference():
    """The loss projects to the vocabulary only at masked targets; it equals cross-entropy on full logits."""
    import torch.nn.functional as F
    from vla_rft_engine.models.world_model import WorldModelConfig, init_weights
    from vla_rft_engine.train.world_model import masked_nll
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=300, num_codes=20)), seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 40), generator=g)
    mask = torch.rand(3, 40, generator=g) > 0.4
    logits = wm.forward_logits(ids[:, :-1])
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ref = (nll * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
    torch.testing.assert_close(masked_nll(wm, ids, mask), ref, rtol=1e-5, atol=1e-6)


def test_change_weighted_nll_by_hand():
    """change_weight: targets that differ from the token one frame back weigh 1 + w (a loop over positions)."""
    import torch.nn.functional as F
    from vla_rft_engine.models.world_model import WorldModelConfig, init_weights
    from vla_rft_engine.train.world_model import masked_nll
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=300, num_codes=20)), seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4, (2, 30), generator=g)  # few values: many unchanged tokens
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[:, 12:] = True  # targets from position 12 on; frame_step 5 looks back into the sequence
    logits = wm.forward_logits(ids[:, :-1])
    num = den = 0.0
    for b in range(2):
        for i in range(1, 30):
            if mask[b, i]:
                w = 1.0 + 3.0 * float(ids[b, i] != ids[b, i - 5])
                num += w * float(F.cross_entropy(logits[b, i - 1][None], ids[b, i][None]))
                den += w
    got = masked_nll(wm, ids, mask, change_weight=3.0, frame_step=5)
    assert float(got) == pytest.approx(num / den, rel=1e-5)
    assert not torch.isclose(got, masked_nll(wm, ids, mask))  # the weighting changes the loss


def test_structured_token_init_follows_digits_and_bins():
    from vla_rft_engine.models.world_model import WorldModelConfig, init_weights
    from vla_rft_engine.train.world_model import structured_token_init
    lay = TokenizerConfig(levels=[8, 6, 5]).layout()
    wm = init_weights(WorldModel(WorldModelConfig.preset("tiny", vocab_size=lay.vocab_size, num_codes=lay.num_codes)))
    structured_token_init(wm, lay, [8, 6, 5])
    e = wm.tok_embeddings.weight
    act = e[lay.action_offset:lay.action_offset + 256]
    near = (act[100] - act[101]).norm()
    far = (act[10] - act[245]).norm()
    assert far > 5 * near  # neighbouring bins start close, opposite ends far apart
    dyn = e[lay.dynamics_offset:lay.dynamics_offset + lay.num_codes]
    one_digit = (dyn[0] - dyn[1]).norm()  # ids 0 and 1 differ in the first digit by one level
    all_digits = (dyn[0] - dyn[lay.num_codes - 1]).norm()
    assert all_digits > 2 * one_digit
