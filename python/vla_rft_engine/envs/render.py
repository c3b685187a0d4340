"""Top-down numpy renderer for the table-top scene.

Shapes are drawn from signed distance functions; each pixel gets the fraction of it a shape covers
(analytic anti-aliasing), so edges are smooth without supersampling. Every shape only touches the
pixels of its bounding box, which keeps a 64x64 frame well under a millisecond of numpy work.

World frame: x right, y up, both in [-1, 1] (the table fills the image); z is height above the table.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

COLOURS = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.18, 0.70, 0.22),
    "blue": (0.16, 0.36, 0.90),
    "yellow": (0.96, 0.82, 0.12),
    "purple": (0.60, 0.24, 0.78),
}
PERSPECTIVE = 0.8  # apparent size grows by (1 + PERSPECTIVE * z): the camera looks down from above
SHADOW_DIR = np.array([0.45, -0.35])  # light from the top-left: shadows fall down-right, longer when higher
# gripper marker (render option, off by default): a saturated cyan disc with a near-black rim, a colour no object,
# target or the table uses, so the gripper's motion changes whole tokenizer patches, not a few thin grey pixels
MARKER_COLOUR, MARKER_RIM = (0.0, 0.92, 0.95), (0.05, 0.05, 0.08)


# ---- signed distance functions (negative inside), on local coordinates px, py -----------------------
def sdf_circle(px, py, r):
    return np.sqrt(px * px + py * py) - r


def sdf_box(px, py, hx, hy, yaw=0.0, rounding=0.0):
    c, s = np.cos(yaw), np.sin(yaw)
    lx, ly = c * px + s * py, -s * px + c * py  # rotate into the box frame
    qx, qy = np.abs(lx) - (hx - rounding), np.abs(ly) - (hy - rounding)
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - rounding


class Canvas:
    """A float32 RGB image in [0, 1] plus the pixel-centre coordinates of the world frame."""

    def __init__(self, size: int, background: np.ndarray | None = None):
        self.size = size
        self.px = 2.0 / size  # world units per pixel
        self.xs = (-1.0 + (np.arange(size) + 0.5) * self.px).astype(np.float32)
        self.ys = self.xs[::-1].copy()  # row 0 is the top of the table (y = +1)
        self.img = (table_texture(size) if background is None else background).copy()

    def draw(self, sdf, cx, cy, radius, colour, alpha=1.0, soft=0.0):
        """Blend `colour` where sdf(dx, dy) < 0; `soft` widens the edge (world units) for shadows."""
        n, px = self.size, self.px
        c0 = max(int((cx - radius + 1.0) / px), 0)
        c1 = min(int((cx + radius + 1.0) / px) + 2, n)
        r0 = max(int((1.0 - cy - radius) / px), 0)
        r1 = min(int((1.0 - cy + radius) / px) + 2, n)
        if c0 >= c1 or r0 >= r1:
            return
        dx = self.xs[None, c0:c1] - cx
        dy = self.ys[r0:r1, None] - cy
        edge = max(px, soft)
        cov = np.clip(0.5 - sdf(dx, dy) / edge, 0.0, 1.0) * alpha
        cov = cov[..., None]
        patch = self.img[r0:r1, c0:c1]
        patch += (np.asarray(colour, np.float32) - patch) * cov

    def to_uint8(self) -> np.ndarray:
        return (np.clip(self.img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=8)
def table_texture(size: int) -> np.ndarray:
    """Wood-like table: base colour, soft lighting from the top-left and faint wavy grain (fixed, no RNG)."""
    xs = -1.0 + (np.arange(size) + 0.5) * (2.0 / size)
    x, y = np.meshgrid(xs, xs[::-1])
    grain = 0.035 * np.sin(28.0 * y + 2.5 * np.sin(3.0 * x) + 1.3 * np.sin(7.0 * x + 1.0))
    light = 1.08 - 0.10 * ((x + 0.7) ** 2 + (y - 0.7) ** 2) / 4.0
    base = np.array([0.62, 0.50, 0.38])
    img = (base[None, None, :] * (light + grain)[..., None]).astype(np.float32)
    img.setflags(write=False)  # shared by every Canvas; each copies it
    return img


def _draw_object(cv: Canvas, shape, x, y, z, yaw, colour, half):
    s = 1.0 + PERSPECTIVE * z
    h = half * s
    sx, sy = SHADOW_DIR * (0.04 + z)
    if shape == "block":
        def body(r):
            return lambda dx, dy: sdf_box(dx, dy, r, r, yaw, 0.25 * r)
    else:
        def body(r):
            return lambda dx, dy: sdf_circle(dx, dy, r)
    rad = 1.5 * h + 0.05
    cv.draw(body(h), x + sx, y + sy, rad + abs(sx) + abs(sy), (0.0, 0.0, 0.0), 0.30, soft=0.03 + 0.1 * z)
    col = np.asarray(colour)
    cv.draw(body(h), x, y, rad, col * 0.62)  # darker rim reads as the block's sides
    cv.draw(body(0.72 * h), x - 0.12 * h, y + 0.12 * h, rad, np.minimum(col * 1.08 + 0.04, 1.0))


def _draw_gripper(cv: Canvas, x, y, z, yaw, opening, shadow: bool):
    s = 1.3 * (1.0 + PERSPECTIVE * z)
    c, sn = np.cos(yaw), np.sin(yaw)
    spread = (0.035 + 0.055 * opening) * s  # finger offset from the centre along the gripper's x axis
    fx, fy = c * spread, sn * spread
    fh = (0.016 * s, 0.034 * s)
    bar = (spread + fh[0], 0.018 * s)
    r = 0.25 * s

    def bar_sdf(dx, dy):
        return sdf_box(dx, dy, bar[0], bar[1], yaw, 0.008)

    def finger_sdf(dx, dy):
        return np.minimum(sdf_box(dx - fx, dy - fy, fh[0], fh[1], yaw, 0.006),
                          sdf_box(dx + fx, dy + fy, fh[0], fh[1], yaw, 0.006))

    if shadow:  # one soft draw of the whole outline
        sx, sy = SHADOW_DIR * (0.04 + z)
        cv.draw(lambda dx, dy: np.minimum(bar_sdf(dx, dy), finger_sdf(dx, dy)), x + sx, y + sy, r,
                (0.0, 0.0, 0.0), 0.35, soft=0.03 + 0.1 * z)
        return
    cv.draw(bar_sdf, x, y, r, (0.22, 0.22, 0.25))
    cv.draw(finger_sdf, x, y, r, (0.86, 0.87, 0.90))
    cv.draw(lambda dx, dy: sdf_circle(dx, dy, 0.03 * s), x, y, r, (0.40, 0.42, 0.46))


def _draw_marker(cv: Canvas, x, y, z, radius: float):
    """The gripper marker: a filled disc of `radius` world units (x the perspective scale) centred on the gripper."""
    r = radius * (1.0 + PERSPECTIVE * z)
    rim = min(0.3 * r, cv.px)  # about a pixel of dark rim: contrast on light targets and on cyan-free table alike
    cv.draw(lambda dx, dy: sdf_circle(dx, dy, r), x, y, r + cv.px, MARKER_RIM)
    cv.draw(lambda dx, dy: sdf_circle(dx, dy, r - rim), x, y, r + cv.px, MARKER_COLOUR)


@lru_cache(maxsize=16)
def _background(size: int, targets: tuple, target_half: float) -> np.ndarray:
    """Table plus target zones: fixed for an episode, so drawn once and reused for every frame."""
    cv = Canvas(size)
    for name, tx, ty in targets:
        col = np.asarray(COLOURS[name])
        box = lambda dx, dy: sdf_box(dx, dy, target_half, target_half, 0.0, 0.02)  # noqa: E731
        cv.draw(box, tx, ty, 1.5 * target_half, col * 0.5 + 0.5 * np.array([0.9, 0.88, 0.82]), 0.55)
        ring = lambda dx, dy: np.abs(box(dx, dy)) - 0.012  # noqa: E731
        cv.draw(ring, tx, ty, 1.5 * target_half, col, 0.95)
    cv.img.setflags(write=False)
    return cv.img


def render_scene(size: int, gripper, yaw, opening, objects, targets, held: int, obj_half: float,
                 target_half: float, marker: float = 0.0) -> np.ndarray:
    """Draw one frame. objects: list of (shape, colour_name, x, y, z, yaw); targets: list of (colour_name, x, y).
    marker > 0: a bold disc of that radius (world units) under the fingers marks the gripper (_draw_marker)."""
    cv = Canvas(size, _background(size, tuple((n, float(x), float(y)) for n, x, y in targets), target_half))
    for i, (shape, name, ox, oy, oz, oyaw) in enumerate(objects):
        if i != held:
            _draw_object(cv, shape, ox, oy, oz, oyaw, COLOURS[name], obj_half)
    gx, gy, gz = gripper
    _draw_gripper(cv, gx, gy, gz, yaw, opening, shadow=True)
    if held >= 0:
        shape, name, ox, oy, oz, oyaw = objects[held]
        _draw_object(cv, shape, ox, oy, oz, oyaw, COLOURS[name], obj_half)
    if marker > 0:
        _draw_marker(cv, gx, gy, gz, marker)
    _draw_gripper(cv, gx, gy, gz, yaw, opening, shadow=False)
    return cv.to_uint8()
