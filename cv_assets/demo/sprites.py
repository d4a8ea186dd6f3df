"""The demo project's reference assets: saturated, distinct-hue shapes with inner detail.

Each asset is a list of drawing parts in its own coordinate box (scale 1.0, about
60-125 px); `render_sprite` draws it at any scale with OpenCV (no anti-aliasing) and
returns the colours plus the exact mask, so ground-truth boxes and visible fractions
are counted from the pixels actually drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from cv_assets.demo.backgrounds import LINE

RGB = tuple[int, int, int]
REFERENCE_SIZE = 256
REFERENCE_FILL = 0.86  # share of the reference image's side the asset spans (a tight crop)
REFERENCE_GREY = (128, 128, 128)


@dataclass(frozen=True)
class Part:
    """One filled primitive. rect: (x1, y1, x2, y2) exclusive end; circle: (cx, cy, r);
    ellipse: (cx, cy, ax, ay); poly: (x1, y1, x2, y2, ...); line: (x1, y1, x2, y2, thickness)."""

    shape: str
    coords: tuple[float, ...]
    color: RGB


@dataclass(frozen=True)
class AssetDesign:
    code: str
    kind: str
    name: str
    size: tuple[int, int]  # (width, height) at scale 1.0
    poses: tuple[tuple[Part, ...], ...]  # a character has a standing and a striding pose


def _rect(x1, y1, x2, y2, color) -> Part:
    return Part("rect", (x1, y1, x2, y2), color)


def _poly(points, color) -> Part:
    return Part("poly", tuple(v for p in points for v in p), color)


def _figure(
    body: RGB, limbs: RGB, legs: RGB, head: RGB, accent: RGB, width: int, height: int
) -> tuple[tuple[Part, ...], ...]:
    """A person-like figure: head, torso with an accent band, arms and legs in two poses."""
    cx = width / 2
    torso = _rect(cx - 16, 30, cx + 16, 82, body)
    band = _rect(cx - 16, 60, cx + 16, 67, accent)
    head_part = Part("circle", (cx, 16, 13), head)
    standing = (
        _rect(cx - 12, 80, cx - 2, height - 2, legs),
        _rect(cx + 2, 80, cx + 12, height - 2, legs),
        _rect(cx - 24, 32, cx - 16, 74, limbs),
        _rect(cx + 16, 32, cx + 24, 74, limbs),
        torso, band, head_part,
    )
    striding = (
        _poly([(cx - 12, 80), (cx - 2, 80), (cx - 14, height - 2), (cx - 25, height - 2)], legs),
        _poly([(cx + 2, 80), (cx + 12, 80), (cx + 25, height - 2), (cx + 14, height - 2)], legs),
        _poly([(cx - 16, 32), (cx - 10, 38), (cx - 26, 70), (cx - 31, 64)], limbs),
        _poly([(cx + 16, 32), (cx + 10, 38), (cx + 26, 70), (cx + 31, 64)], limbs),
        torso, band, head_part,
    )
    return standing, striding


def _crate() -> tuple[tuple[Part, ...], ...]:
    green, dark, plank = (50, 170, 70), (18, 95, 32), (24, 118, 40)
    parts = (
        _rect(0, 0, 92, 92, dark),
        _rect(6, 6, 86, 86, green),
        _rect(6, 29, 86, 34, plank),
        _rect(6, 58, 86, 63, plank),
        Part("line", (10, 82, 82, 10, 6), plank),
    )
    return (parts,)


def _ball() -> tuple[tuple[Part, ...], ...]:
    parts = (
        Part("circle", (36, 36, 35), (240, 205, 30)),
        Part("ellipse", (36, 38, 34, 9), (196, 150, 18)),
        Part("circle", (24, 21, 7), (252, 238, 140)),
    )
    return (parts,)


# The red sits at a hue of about 4 degrees, not 0: hue wraps at red, and a colour
# histogram would split a pure red between its first and last bins.
DESIGNS: dict[str, AssetDesign] = {
    d.code: d
    for d in (
        AssetDesign("CHAR_01", "character", "Red runner", (64, 124),
                    _figure((225, 45, 30), (200, 38, 26), (150, 26, 18), (128, 22, 14), (250, 125, 115), 64, 124)),
        AssetDesign("CHAR_02", "character", "Blue walker", (64, 128),
                    _figure((40, 80, 220), (32, 62, 190), (22, 34, 110), (24, 36, 140), (110, 160, 250), 64, 128)),
        AssetDesign("PROP_01", "prop", "Green crate", (92, 92), _crate()),
        AssetDesign("PROP_02", "prop", "Yellow ball", (72, 72), _ball()),
    )
}


def _draw(canvas: np.ndarray, part: Part, scale: float, value) -> None:
    c = part.coords
    s = lambda v: int(round(v * scale))  # noqa: E731
    if part.shape == "rect":
        cv2.rectangle(canvas, (s(c[0]), s(c[1])), (s(c[2]) - 1, s(c[3]) - 1), value, -1, LINE)
    elif part.shape == "circle":
        cv2.circle(canvas, (s(c[0]), s(c[1])), max(1, s(c[2])), value, -1, LINE)
    elif part.shape == "ellipse":
        cv2.ellipse(canvas, (s(c[0]), s(c[1])), (max(1, s(c[2])), max(1, s(c[3]))), 0, 0, 360, value, -1, LINE)
    elif part.shape == "poly":
        points = np.array([[s(c[i]), s(c[i + 1])] for i in range(0, len(c), 2)], dtype=np.int32)
        cv2.fillPoly(canvas, [points], value, LINE)
    elif part.shape == "line":
        cv2.line(canvas, (s(c[0]), s(c[1])), (s(c[2]), s(c[3])), value, max(1, s(c[4])), LINE)
    else:
        raise ValueError(f"unknown part shape {part.shape!r}")


@lru_cache(maxsize=256)
def render_sprite(code: str, scale: float, pose: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 HxWx3, mask bool HxW) of an asset, cropped to the pixels drawn.

    Cached: the returned arrays are shared, so callers must not modify them."""
    design = DESIGNS[code]
    parts = design.poses[pose % len(design.poses)]
    # Striding legs and arms reach past the standing box; leave room, then crop.
    pad = int(round(12 * scale))
    w, h = (int(round(v * scale)) + 2 * pad for v in design.size)
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    shifted = [Part(p.shape, _shift(p, pad / scale), p.color) for p in parts]
    for part in shifted:
        _draw(rgb, part, scale, tuple(int(v) for v in part.color))
        _draw(mask, part, scale, 255)
    ys, xs = np.nonzero(mask)
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgb, mask = rgb[y1:y2, x1:x2].copy(), mask[y1:y2, x1:x2] > 0
    rgb.flags.writeable = mask.flags.writeable = False
    return rgb, mask


def _shift(part: Part, offset: float) -> tuple[float, ...]:
    c = part.coords
    if part.shape in ("rect", "poly"):
        return tuple(v + offset for v in c)
    if part.shape in ("circle", "ellipse"):
        return (c[0] + offset, c[1] + offset) + tuple(c[2:])
    return (c[0] + offset, c[1] + offset, c[2] + offset, c[3] + offset, c[4])


def reference_image(code: str) -> np.ndarray:
    """The asset filling most of a square neutral-grey image (what a reference sheet shows)."""
    w, h = DESIGNS[code].size
    scale = REFERENCE_SIZE * REFERENCE_FILL / max(w, h)
    rgb, mask = render_sprite(code, round(scale, 3), 0)
    image = np.empty((REFERENCE_SIZE, REFERENCE_SIZE, 3), dtype=np.uint8)
    image[:] = REFERENCE_GREY
    y0 = (REFERENCE_SIZE - rgb.shape[0]) // 2
    x0 = (REFERENCE_SIZE - rgb.shape[1]) // 2
    region = image[y0:y0 + rgb.shape[0], x0:x0 + rgb.shape[1]]
    region[mask] = rgb[mask]
    return image
