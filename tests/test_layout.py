"""Token layout and action discretisation against REFERENCE.md's formulas."""
import json
import math

import pytest
import torch

from vla_rft_engine.layout import PAPER_LAYOUT, ActionDiscretizer, TokenLayout


def test_paper_vocabulary():
    L = PAPER_LAYOUT
    assert (L.dynamics_offset, L.context_offset, L.action_offset) == (0, 4375, 8750)
    assert (L.bos_id, L.eos_id, L.pad_id, L.vocab_size) == (9006, 9007, 9007, 9008)
    assert L.prompt_tokens == 1024 + 64 + 7 == 1095
    assert L.frame_step_tokens == 71


def _formula(a, lo, hi, bins=256):
    """REFERENCE.md: clip to [min, max], scale to [0, 1], floor(x * 256) clipped to [0, 255]."""
    x = (min(max(a, lo), hi) - lo) / (hi - lo)
    return min(max(math.floor(x * bins), 0), bins - 1)


def test_action_bins_match_formula_on_edges():
    lo = [-1.0, -0.5, 0.0, -2.0, -1.0, -1.0, -1.0]
    hi = [1.0, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0]
    d = ActionDiscretizer(lo, hi)
    rows = [lo, hi, [(a + b) / 2 for a, b in zip(lo, hi)], [a - 5 for a in lo], [b + 5 for b in hi],
            [a + (b - a) * 255.5 / 256 for a, b in zip(lo, hi)], [a + 1e-9 for a in lo]]
    acts = torch.tensor(rows, dtype=torch.float64)
    bins = d.encode(acts)
    for r, row in enumerate(rows):
        for j in range(7):
            assert bins[r, j].item() == _formula(row[j], lo[j], hi[j]), (r, j)
    assert bins[0].tolist() == [0] * 7 and bins[1].tolist() == [255] * 7  # min -> 0, max -> 255 (clipped)
    tokens = PAPER_LAYOUT.bins_to_vocab(bins)
    assert tokens.min() >= 8750 and tokens.max() <= 9005


def test_action_random_matches_formula_and_roundtrip():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 7, generator=g, dtype=torch.float64)
    d = ActionDiscretizer.from_dataset(a)
    bins = d.encode(a)
    ref = torch.tensor([[_formula(a[i, j].item(), d.low[j].item(), d.high[j].item()) for j in range(7)] for i in range(500)])
    assert torch.equal(bins, ref)
    back = d.decode(bins, dtype=torch.float64)
    width = (d.high - d.low) / 256
    assert torch.all((back - a).abs() <= width / 2 + 1e-12)


def test_action_nan_and_shape_errors(tmp_path):
    d = ActionDiscretizer([-1] * 7, [1] * 7)
    with pytest.raises(ValueError, match="NaN"):
        d.encode(torch.tensor([[0.0, float("nan"), 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="7"):
        d.encode(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="high < low"):
        ActionDiscretizer([1.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        ActionDiscretizer.from_dataset(torch.tensor([[float("inf")] * 7]))
    with pytest.raises(ValueError, match="action bin"):
        d.decode(torch.tensor([[256] * 7]))
    d.save(tmp_path / "ranges.json")
    d2 = ActionDiscretizer.load(tmp_path / "ranges.json")
    assert torch.equal(d2.low, d.low) and torch.equal(d2.high, d.high)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ActionDiscretizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        ActionDiscretizer.load(tmp_path / "missing.json")
    assert json.loads((tmp_path / "ranges.json").read_text())["num_bins"] == 256


def test_build_segment_order_and_checks():
    L = TokenLayout(context_tokens=4, dynamics_tokens=3, action_dim=2)
    ctx = torch.tensor([0, 1, 2, 3])
    dyn = torch.tensor([[10, 11, 12], [20, 21, 22]])
    act = torch.tensor([[1, 2], [3, 4]])
    seq = L.build_segment(ctx, dyn, act)
    o = L.action_offset
    expected = [4375, 4376, 4377, 4378, 10, 11, 12, o + 1, o + 2, 20, 21, 22, o + 3, o + 4]
    assert seq.tolist() == expected
    assert L.build_segment(ctx, dyn, act[:1]).tolist() == expected[:-2]  # last frame without its action
    batch = L.build_segment(ctx.expand(3, 4), dyn.expand(3, 2, 3), act.expand(3, 2, 2))
    assert batch.shape == (3, 14) and torch.equal(batch[1], seq)
    with pytest.raises(ValueError, match="out of range"):
        L.build_segment(ctx, dyn + 5000, act)
    with pytest.raises(ValueError, match="tokens per frame"):
        L.build_segment(ctx[:3], dyn, act)
    with pytest.raises(ValueError, match="actions"):
        L.build_segment(ctx, dyn, act[:0])
    assert torch.equal(L.vocab_to_context(L.context_to_vocab(ctx)), ctx)
    with pytest.raises(ValueError):
        L.vocab_to_dynamics(torch.tensor([4375]))
