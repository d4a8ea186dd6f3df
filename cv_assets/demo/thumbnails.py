"""Drawing the demo security-camera thumbnails (160x120): people, vans, cars, cats, dogs.

Recurring visitors are drawn with fixed, distinctive colours; one-off subjects take
their hues only from ranges no visitor uses, so a colour-histogram embedder has a fair
chance to tell them apart. Every figure is filled polygons, no anti-aliasing.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from cv_assets.demo.backgrounds import LINE, camera_background

THUMB_W, THUMB_H = 160, 120
JITTER_PX = 8  # each event crops the camera's view at a slightly different offset
JPEG_QUALITY = 85
ColorF = tuple[float, float, float]

# Hue ranges (degrees) left free by the visitors' blue, red, orange, green and purple.
ONE_OFF_HUES = ((55.0, 95.0), (155.0, 195.0), (305.0, 335.0))


def hsv(hue_deg: float, sat: float, val: float) -> ColorF:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, min(1.0, sat), min(1.0, val))
    return (r * 255.0, g * 255.0, b * 255.0)


def grey(level: float) -> ColorF:
    return (level, level, level)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _box(img: np.ndarray, x1: float, y1: float, x2: float, y2: float, color: ColorF) -> None:
    cv2.rectangle(img, _pt(x1, y1), _pt(x2 - 1, y2 - 1), color, -1, LINE)


def _poly(img: np.ndarray, points: list[tuple[float, float]], color: ColorF) -> None:
    cv2.fillPoly(img, [np.array([_pt(x, y) for x, y in points], dtype=np.int32)], color, LINE)


@dataclass(frozen=True)
class PersonLook:
    coat: ColorF
    trousers: ColorF
    skin: ColorF
    hat: ColorF | None = None
    bag: ColorF | None = None
    long_coat: bool = False


def draw_person(img: np.ndarray, cx: float, bottom: float, s: float, look: PersonLook) -> None:
    """A standing person about 58*s px tall, feet at `bottom`."""
    top = bottom - 58 * s
    coat_end = top + (44 if look.long_coat else 34) * s
    arm = tuple(c * 0.85 for c in look.coat)
    _box(img, cx - 7 * s, coat_end - 2 * s, cx - 1 * s, bottom, look.trousers)
    _box(img, cx + 1 * s, coat_end - 2 * s, cx + 7 * s, bottom, look.trousers)
    _box(img, cx - 12 * s, top + 12 * s, cx - 8 * s, top + 34 * s, arm)
    _box(img, cx + 8 * s, top + 12 * s, cx + 12 * s, top + 34 * s, arm)
    _poly(img, [(cx - 8 * s, top + 11 * s), (cx + 8 * s, top + 11 * s),
                (cx + (10 if look.long_coat else 8) * s, coat_end), (cx - (10 if look.long_coat else 8) * s, coat_end)],
          look.coat)
    cv2.circle(img, _pt(cx, top + 5.5 * s), max(2, int(round(5.5 * s))), look.skin, -1, LINE)
    if look.hat is not None:
        _box(img, cx - 6 * s, top - 1 * s, cx + 6 * s, top + 3 * s, look.hat)
        _box(img, cx - 8 * s, top + 2 * s, cx + 8 * s, top + 4 * s, look.hat)
    if look.bag is not None:
        _box(img, cx + 6 * s, top + 24 * s, cx + 16 * s, top + 36 * s, look.bag)


def draw_van(img: np.ndarray, cx: float, bottom: float, s: float, body: ColorF, facing: int) -> None:
    """A box van about 92*s px long; `facing` +1 drives right, -1 left."""
    x1, x2 = cx - 46 * s, cx + 46 * s
    front = x2 if facing > 0 else x1
    cab_x = front - facing * 22 * s
    back = x1 if facing > 0 else x2
    _box(img, min(back, cab_x), bottom - 50 * s, max(back, cab_x), bottom - 8 * s, body)
    _poly(img, [(cab_x, bottom - 38 * s), (front - facing * 8 * s, bottom - 38 * s),
                (front, bottom - 24 * s), (front, bottom - 8 * s), (cab_x, bottom - 8 * s)], body)
    _poly(img, [(cab_x + facing * 3 * s, bottom - 35 * s), (front - facing * 9 * s, bottom - 35 * s),
                (front - facing * 4 * s, bottom - 26 * s), (cab_x + facing * 3 * s, bottom - 26 * s)], grey(45))
    _box(img, cx - 40 * s, bottom - 30 * s, cx + 10 * s, bottom - 25 * s, grey(235))  # company stripe
    for wx in (cx - 28 * s, cx + 28 * s):
        cv2.circle(img, _pt(wx, bottom - 7 * s), max(2, int(round(7 * s))), grey(25), -1, LINE)


def draw_car(img: np.ndarray, cx: float, bottom: float, s: float, body: ColorF) -> None:
    """A low saloon car about 84*s px long."""
    _box(img, cx - 42 * s, bottom - 22 * s, cx + 42 * s, bottom - 7 * s, body)
    _poly(img, [(cx - 24 * s, bottom - 22 * s), (cx - 14 * s, bottom - 36 * s),
                (cx + 16 * s, bottom - 36 * s), (cx + 28 * s, bottom - 22 * s)], body)
    _poly(img, [(cx - 19 * s, bottom - 23 * s), (cx - 12 * s, bottom - 33 * s),
                (cx + 14 * s, bottom - 33 * s), (cx + 22 * s, bottom - 23 * s)], grey(50))
    for wx in (cx - 26 * s, cx + 26 * s):
        cv2.circle(img, _pt(wx, bottom - 6 * s), max(2, int(round(6 * s))), grey(25), -1, LINE)


def draw_cat(img: np.ndarray, cx: float, bottom: float, s: float, fur: ColorF, stripes: ColorF, facing: int) -> None:
    """A walking cat about 44*s px long with tail up and stripes."""
    for lx in (-9, -4, 5, 10):
        _box(img, cx + lx * s, bottom - 8 * s, cx + (lx + 3) * s, bottom, fur)
    cv2.ellipse(img, _pt(cx, bottom - 12 * s), (max(2, int(round(15 * s))), max(2, int(round(7 * s)))),
                0, 0, 360, fur, -1, LINE)
    for sx in (-7, -1, 5):
        _box(img, cx + sx * s, bottom - 18 * s, cx + (sx + 2) * s, bottom - 9 * s, stripes)
    hx = cx + facing * 16 * s
    cv2.circle(img, _pt(hx, bottom - 20 * s), max(2, int(round(6 * s))), fur, -1, LINE)
    for ex in (-4, 2):
        _poly(img, [(hx + ex * s, bottom - 24 * s), (hx + (ex + 2) * s, bottom - 30 * s),
                    (hx + (ex + 4) * s, bottom - 24 * s)], fur)
    tail = [_pt(cx - facing * 14 * s, bottom - 14 * s), _pt(cx - facing * 22 * s, bottom - 22 * s),
            _pt(cx - facing * 20 * s, bottom - 32 * s)]
    cv2.polylines(img, [np.array(tail, dtype=np.int32)], False, stripes, max(1, int(round(3 * s))), LINE)


def draw_dog(img: np.ndarray, cx: float, bottom: float, s: float, fur: ColorF, collar: ColorF, facing: int) -> None:
    """A dog about 50*s px long: grey-scale fur, a coloured collar."""
    for lx in (-12, -6, 6, 12):
        _box(img, cx + lx * s, bottom - 12 * s, cx + (lx + 4) * s, bottom, fur)
    cv2.ellipse(img, _pt(cx, bottom - 16 * s), (max(2, int(round(17 * s))), max(2, int(round(8 * s)))),
                0, 0, 360, fur, -1, LINE)
    hx = cx + facing * 19 * s
    cv2.circle(img, _pt(hx, bottom - 27 * s), max(2, int(round(7 * s))), fur, -1, LINE)
    _box(img, min(hx, hx + facing * 11 * s), bottom - 27 * s, max(hx, hx + facing * 11 * s), bottom - 21 * s, fur)
    _box(img, hx - 5 * s, bottom - 21 * s, hx + 5 * s, bottom - 17 * s, collar)


def render_thumbnail(camera: str, camera_seed: int, rng: np.random.Generator, lighting: float, draw) -> np.ndarray:
    """Camera view (cropped with a small jitter), the subject drawn by `draw(img)` in
    camera coordinates, then the event's lighting and sensor noise; RGB uint8 160x120."""
    gray, tint = _camera_view(camera, camera_seed)
    dx, dy = (int(v) for v in rng.integers(0, JITTER_PX + 1, size=2))
    base = gray[dy:dy + THUMB_H, dx:dx + THUMB_W, None] * np.asarray(tint, dtype=np.float32)
    img = np.ascontiguousarray(base, dtype=np.float32)
    draw(img)
    img *= lighting
    img += rng.normal(0.0, float(rng.uniform(1.5, 3.5)), (THUMB_H, THUMB_W, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=16)
def _camera_view(camera: str, seed: int):
    """The camera's fixed view, drawn once (callers only read it)."""
    return camera_background(camera, seed, THUMB_W + JITTER_PX, THUMB_H + JITTER_PX)
