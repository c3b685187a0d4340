"""PNG strips of frames for reports: render_strip(frames).save("strip.png")."""
from __future__ import annotations

import numpy as np
from PIL import Image


def render_strip(frames, every: int = 1, scale: int = 2, pad: int = 2) -> Image.Image:
    """frames: uint8 (T, H, W, 3) or (N, T, H, W, 3) (one row per episode); every k-th frame, upscaled by `scale`."""
    arr = np.asarray(frames)
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (N, T, H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    arr = arr[:, ::every]
    n, t, h, w, _ = arr.shape
    canvas = np.full((n * (h + pad) + pad, t * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = arr[i, j]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale != 1 else img
