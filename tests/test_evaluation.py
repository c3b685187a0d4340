"""Quickstart report statistics: the paired bootstrap interval of the RFT - SFT gain."""
import numpy as np
import pytest

from vla_rft_engine.evaluation import paired_bootstrap


def _records(sft: np.ndarray, rft: np.ndarray, settings=("none",), seeds=(0,)):
    recs = []
    for i, st in enumerate(settings):
        for j, s in enumerate(seeds):
            recs.append({"policy": "sft", "setting": st, "seed": s, "outcomes": sft[i, j].tolist()})
            recs.append({"policy": f"rft_seed{s}", "setting": st, "seed": s, "outcomes": rft[i, j].tolist()})
    return recs


def test_degenerate_cases():
    rng = np.random.default_rng(0)
    x = (rng.random((2, 3, 20)) < 0.4).astype(int)
    same = paired_bootstrap(_records(x, x, ("none", "goal_major"), (0, 1, 2)), ["none", "goal_major"], [0, 1, 2])
    assert same["mean"] == 0 and same["lo"] == 0 and same["hi"] == 0 and same["episodes"] == 120
    win = paired_bootstrap(_records(np.zeros((1, 1, 10), int), np.ones((1, 1, 10), int)), ["none"], [0])
    assert win["lo"] == win["hi"] == win["mean"] == 100


def test_interval_matches_the_normal_approximation():
    """One cell of n paired episodes: the bootstrap interval ~ mean +- 1.96 sd / sqrt(n) of the differences."""
    rng = np.random.default_rng(1)
    n = 600
    sft = (rng.random((1, 1, n)) < 0.3).astype(int)
    rft = np.where(rng.random((1, 1, n)) < 0.8, sft, 1)  # RFT keeps SFT's outcome or succeeds: paired
    ci = paired_bootstrap(_records(sft, rft), ["none"], [0], n_boot=4000)
    d = (rft - sft).ravel() * 100.0
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert ci["mean"] == pytest.approx(d.mean())
    assert ci["lo"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert ci["hi"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    # pairing matters: the same marginal rates, episodes shuffled apart, give a wider interval
    unpaired = paired_bootstrap(_records(sft, rng.permutation(rft.ravel())[None, None]), ["none"], [0], n_boot=4000)
    assert unpaired["hi"] - unpaired["lo"] > ci["hi"] - ci["lo"]
