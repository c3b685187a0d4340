"""PNG output for results people look at: frame grids and curves (no matplotlib needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [0, 1] -> uint8 (..., H, W, 3)."""
    x = frames.detach().float().clamp(0, 1).mul(255).round().byte().cpu()
    return x.movedim(-3, -1).numpy()


def save_frame_grid(rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None,
                    scale: int = 2, pad: int = 2, title: str | None = None,
                    col_labels: list[str] | None = None) -> Path:
    """rows: each (N, 3, H, W) float in [0, 1]; one row of N frames each, optional label on the left,
    an optional title on top and a label over each column (e.g. the time step)."""
    arrs = [to_uint8(r) for r in rows]
    n = max(r.shape[0] for r in arrs)
    H, W = arrs[0].shape[1:3]
    lw = 8 + 6 * max(len(s) for s in labels) if labels else 0
    width = lw + n * (W * scale + pad) + pad
    import textwrap
    title_lines = textwrap.wrap(title, max(20, (width - 8) // 6)) if title else []  # the default font: ~6 px/char
    top = 12 * len(title_lines) + (2 if title_lines else 0) + (12 if col_labels else 0)
    canvas = Image.new("RGB", (width, top + len(arrs) * (H * scale + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((4, 2 + 12 * i), line, fill=(0, 0, 0))
    for j, c in enumerate(col_labels or []):
        draw.text((lw + pad + j * (W * scale + pad) + 2, top - 12), c, fill=(60, 60, 60))
    for i, r in enumerate(arrs):
        y = top + pad + i * (H * scale + pad)
        if labels:
            draw.text((4, y + H * scale // 2 - 5), labels[i], fill=(0, 0, 0))
        for j in range(r.shape[0]):
            img = Image.fromarray(r[j]).resize((W * scale, H * scale), Image.Resampling.NEAREST)
            canvas.paste(img, (lw + pad + j * (W * scale + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_curve(xs, ys_by_name: dict[str, list[float]], path: str | Path, title: str = "",
               size: tuple[int, int] = (640, 360)) -> Path:
    """A plain line plot (one line per series) drawn with PIL."""
    W, H = size
    m = 45
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    allv = [v for ys in ys_by_name.values() for v in ys if np.isfinite(v)]
    if not allv or len(xs) == 0:
        img.save(path)
        return Path(path)
    lo, hi = min(allv), max(allv)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    def px(x, y):
        return m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (y - lo) / (hi - lo) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline=(0, 0, 0))
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for k, (name, ys) in enumerate(ys_by_name.items()):
        pts = [px(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        c = colors[k % len(colors)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.text((m + 5, m + 5 + 12 * k), name, fill=c)
    d.text((m, 10), title, fill=(0, 0, 0))
    d.text((4, m), f"{hi:.3g}", fill=(0, 0, 0))
    d.text((4, H - m - 10), f"{lo:.3g}", fill=(0, 0, 0))
    d.text((m, H - m + 5), f"{x0:g}", fill=(0, 0, 0))
    d.text((W - m - 30, H - m + 5), f"{x1:g}", fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _font(size: int):
    """PIL's bundled font at a readable size (Pillow >= 10.1); the tiny bitmap default otherwise."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _tick(v: float) -> str:
    return "0" if abs(v) < 5e-4 else f"{v:+.2f}".replace("+", "")


def save_histograms(samples: dict[str, np.ndarray], dim_names: list[str], dims: list[int], path: str | Path,
                    bins: int = 30, title: str = "", panel: tuple[int, int] = (340, 260)) -> Path:
    """One panel per action dim; in each, a histogram line per source (samples[name]: (n, D)) as the fraction
    of that source's samples per bin, with x ticks at both ends and the middle and the y scale in %."""
    W, H = panel
    left, bottom, top = 52, 46, 34
    img = Image.new("RGB", (W * len(dims), H + top), (255, 255, 255))
    d = ImageDraw.Draw(img)
    small, big = _font(12), _font(16)
    d.text((8, 6), title, fill=(0, 0, 0), font=big)
    colors = [(0, 0, 0), (31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for j, (dim, dname) in enumerate(zip(dims, dim_names)):
        x0 = j * W
        vals = np.concatenate([np.asarray(s)[:, dim] for s in samples.values()])
        lo, hi = float(vals.min()), float(vals.max())
        if hi - lo < 1e-6:  # one value (e.g. a gripper that never closes): centre it in a unit-wide axis
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        hists = {k: np.histogram(np.asarray(s)[:, dim], edges)[0] / max(1, len(s)) for k, s in samples.items()}
        ymax = max(float(h.max()) for h in hists.values()) or 1.0
        box = (x0 + left, top + 8, x0 + W - 12, top + H - bottom)
        d.rectangle(box, outline=(0, 0, 0))
        for k, (name, h) in enumerate(hists.items()):
            xs = box[0] + (np.arange(bins) + 0.5) / bins * (box[2] - box[0])
            ys = box[3] - h / ymax * (box[3] - box[1] - 6)
            c = colors[k % len(colors)]
            d.line(list(zip(xs.tolist(), ys.tolist())), fill=c, width=2)
            d.line([(box[2] - 70, box[1] + 10 + 15 * k), (box[2] - 52, box[1] + 10 + 15 * k)], fill=c, width=2)
            d.text((box[2] - 48, box[1] + 3 + 15 * k), name, fill=c, font=small)
        for frac in (0.0, 0.5, 1.0):  # x ticks
            x = box[0] + frac * (box[2] - box[0])
            d.line([(x, box[3]), (x, box[3] + 4)], fill=(0, 0, 0))
            d.text((x - 14, box[3] + 6), _tick(lo + frac * (hi - lo)), fill=(0, 0, 0), font=small)
        d.text(((box[0] + box[2]) // 2 - 4 * len(dname), box[3] + 24), dname, fill=(0, 0, 0), font=big)
        d.text((x0 + 4, box[1] - 2), f"{100 * ymax:.0f}%", fill=(0, 0, 0), font=small)  # y scale: top = ymax
        d.text((x0 + 4, box[3] - 12), "0%", fill=(0, 0, 0), font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
