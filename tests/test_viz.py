"""PNG helpers: the histogram panels draw each source where its samples are, with a degenerate range widened."""
import numpy as np
from PIL import Image

from vla_rft_engine.viz import _tick, save_histograms


def test_histogram_lines_sit_over_their_samples(tmp_path):
    g = np.random.default_rng(0)
    a = np.zeros((400, 7))
    a[:, 0] = g.uniform(-1.0, -0.5, 400)  # the red source lives in the left third of dim 0
    b = np.zeros((400, 7))
    b[:, 0] = g.uniform(0.5, 1.0, 400)  # the blue one in the right third
    a[:, 6] = b[:, 6] = -1.0  # one value only: the axis must not collapse
    path = save_histograms({"expert": np.zeros((1, 7)) + [0, 0, 0, 0, 0, 0, -1.0], "SFT": b, "RFT": a},
                           ["dx", "gripper"], [0, 6], tmp_path / "h.png", panel=(300, 200))
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    panel = img[:, :300]
    red = (panel[..., 0] > 180) & (panel[..., 1] < 80) & (panel[..., 2] < 80)
    blue = (panel[..., 2] > 150) & (panel[..., 0] < 80)
    legend_x = 300 - 12 - 70  # the legend sits at the top right: look left of it
    red_cols = np.nonzero(red[:, :legend_x].any(0))[0]
    blue_cols = np.nonzero(blue[60:, :].any(0))[0]
    assert red_cols.mean() < 150 < blue_cols.mean()
    assert _tick(1.2e-8) == "0" and _tick(-1.0) == "-1.00" and _tick(0.831) == "0.83"
