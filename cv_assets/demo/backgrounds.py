"""Low-saturation, textured backgrounds for the demo clips and camera thumbnails.

Why low saturation: without CLIP weights the pipeline matches with a colour-histogram
embedder that only counts chromatic pixels, so the backgrounds must stay nearly grey
(the saturated assets are then the only colour in a frame) while still carrying
texture (gradients, soft noise, grey shapes) so cuts and camera pans are visible.

Every builder draws grey levels (float32) and ends with `tinted`, which multiplies by
a near-neutral tint: saturation stays below ~25/255 at any brightness.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Tint = tuple[float, float, float]
NEUTRAL: Tint = (1.0, 1.0, 1.0)
LINE = cv2.LINE_8  # no anti-aliasing: identical pixels on every run


def tinted(gray: np.ndarray, tint: Tint = NEUTRAL) -> np.ndarray:
    """Grey levels (H, W) times an RGB tint, as uint8 RGB."""
    rgb = gray[..., None].astype(np.float32) * np.asarray(tint, dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def vertical_gradient(height: int, width: int, top: float, bottom: float) -> np.ndarray:
    column = np.linspace(top, bottom, height, dtype=np.float32)
    return np.repeat(column[:, None], width, axis=1)


def soft_noise(rng: np.random.Generator, height: int, width: int, cell: int, sigma: float) -> np.ndarray:
    """Smooth blotches: coarse Gaussian noise upsampled, like uneven light or dirt."""
    coarse = rng.normal(0.0, sigma, (height // cell + 2, width // cell + 2)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def grain(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, (height, width)).astype(np.float32)


def _rect(gray: np.ndarray, x1: int, y1: int, x2: int, y2: int, level: float, thickness: int = -1) -> None:
    cv2.rectangle(gray, (int(x1), int(y1)), (int(x2) - 1, int(y2) - 1), float(level), thickness, LINE)


# --- scene backgrounds (video, 640x360 or wider for a pan) -------------------------------


def street(rng: np.random.Generator, width: int, height: int, brightness: float = 1.0) -> np.ndarray:
    """Grey buildings with dark windows above a pavement with a kerb line."""
    gray = vertical_gradient(height, width, 185, 150)
    horizon = int(height * 0.62)
    x = -int(rng.integers(0, 40))
    while x < width:
        w = int(rng.integers(90, 170))
        top = int(rng.integers(int(height * 0.08), int(height * 0.35)))
        level = float(rng.uniform(95, 150))
        _rect(gray, x, top, x + w - 6, horizon, level)
        for wy in range(top + 14, horizon - 24, 34):
            for wx in range(x + 12, x + w - 30, 30):
                _rect(gray, wx, wy, wx + 14, wy + 18, level - float(rng.uniform(30, 50)))
        x += w
    gray[horizon:] = vertical_gradient(height - horizon, width, 128, 112)
    _rect(gray, 0, horizon, width, horizon + 6, 170)
    gray += soft_noise(rng, height, width, 24, 6.0) + grain(rng, height, width, 2.0)
    return gray * brightness


def alley(rng: np.random.Generator, width: int, height: int, brightness: float = 1.0) -> np.ndarray:
    """A brick wall with pipes: dense edges everywhere, so a camera pan moves many pixels."""
    gray = np.full((height, width), 195.0, dtype=np.float32)  # mortar
    brick_h, brick_w, mortar = 24, 58, 4
    ground = int(height * 0.8)
    for row, y in enumerate(range(0, ground, brick_h)):
        offset = 0 if row % 2 == 0 else -brick_w // 2
        for x in range(offset, width, brick_w):
            _rect(gray, x + mortar, y + mortar, x + brick_w, y + brick_h, float(rng.uniform(70, 150)))
    for px in range(int(rng.integers(60, 200)), width, int(rng.integers(260, 420))):
        _rect(gray, px, 0, px + 14, ground, 60)
    gray[ground:] = vertical_gradient(height - ground, width, 105, 90)
    gray += soft_noise(rng, height, width, 32, 8.0) + grain(rng, height, width, 2.0)
    return gray * brightness


def park(rng: np.random.Generator, width: int, height: int, brightness: float = 1.0) -> np.ndarray:
    """Light sky, a horizon, round grey trees and a bench."""
    gray = vertical_gradient(height, width, 215, 185)
    horizon = int(height * 0.58)
    gray[horizon:] = vertical_gradient(height - horizon, width, 160, 140)
    for cx in range(int(rng.integers(20, 80)), width, int(rng.integers(120, 180))):
        radius = int(rng.integers(35, 60))
        _rect(gray, cx - 6, horizon - 40, cx + 6, horizon + 8, 90)
        cv2.circle(gray, (cx, horizon - 40 - radius // 2), radius, float(rng.uniform(110, 150)), -1, LINE)
    _rect(gray, int(width * 0.35), horizon + 30, int(width * 0.6), horizon + 40, 100)
    gray += soft_noise(rng, height, width, 20, 7.0) + grain(rng, height, width, 2.0)
    return gray * brightness


def interior(rng: np.random.Generator, width: int, height: int, brightness: float = 1.0) -> np.ndarray:
    """A dark room: wall panels, a bright window, a lighter floor with boards."""
    gray = vertical_gradient(height, width, 70, 85)
    floor = int(height * 0.7)
    for x in range(0, width, 80):
        _rect(gray, x + 6, 30, x + 74, floor - 20, float(rng.uniform(55, 80)))
    _rect(gray, int(width * 0.4), 50, int(width * 0.62), 170, 200)
    gray[floor:] = vertical_gradient(height - floor, width, 120, 140)
    for y in range(floor + 10, height, 16):
        _rect(gray, 0, y, width, y + 2, 100)
    gray += soft_noise(rng, height, width, 28, 5.0) + grain(rng, height, width, 2.0)
    return gray * brightness


SCENE_BACKGROUNDS: dict[str, Callable[..., np.ndarray]] = {
    "street": street,
    "alley": alley,
    "park": park,
    "interior": interior,
}


def scene_background(kind: str, seed: int, width: int, height: int, tint: Tint, brightness: float = 1.0) -> np.ndarray:
    """A uint8 RGB background; the same (kind, seed) always gives the same pixels."""
    gray = SCENE_BACKGROUNDS[kind](np.random.default_rng(seed), width, height, brightness)
    return tinted(gray, tint)


# --- camera backgrounds (event thumbnails, drawn a little larger than 160x120 so each
# --- event can crop a slightly different window: a camera that shakes a bit) -------------


def front_door(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    gray = vertical_gradient(height, width, 180, 165)
    _rect(gray, 58, 22, 98, int(height * 0.86), 95)  # door
    _rect(gray, 90, 60, 94, 66, 170)  # handle
    _rect(gray, 118, 30, 156, 62, 205)  # window
    _rect(gray, 0, int(height * 0.86), width, height, 130)  # step
    gray += soft_noise(rng, height, width, 12, 5.0)
    return gray


def driveway(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    gray = vertical_gradient(height, width, 160, 145)
    ground = int(height * 0.45)
    for y in range(12, ground - 4, 8):
        _rect(gray, 20, y, 130, y + 2, 120)  # garage door slats
    gray[ground:] = vertical_gradient(height - ground, width, 95, 80)
    gray[ground:] += grain(rng, height - ground, width, 6.0)  # asphalt
    gray += soft_noise(rng, height, width, 14, 5.0)
    return gray


def backyard(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    gray = vertical_gradient(height, width, 200, 185)
    lawn = int(height * 0.5)
    for x in range(0, width, 12):
        _rect(gray, x, 10, x + 10, lawn, 140 if (x // 12) % 2 else 150)  # fence planks
    gray[lawn:] = vertical_gradient(height - lawn, width, 125, 110)
    gray[lawn:] += soft_noise(rng, height - lawn, width, 4, 6.0)
    return gray


def garage(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    gray = vertical_gradient(height, width, 62, 78)
    for y in (20, 45, 70):
        _rect(gray, 6, y, 50, y + 4, 105)  # shelves
    cv2.ellipse(gray, (110, 82), (42, 20), 0, 180, 360, 95.0, -1, LINE)  # parked car roof
    _rect(gray, 68, 80, 152, 100, 95)
    gray[int(height * 0.82):] += 12
    gray += soft_noise(rng, height, width, 12, 4.0)
    return gray


CAMERA_BACKGROUNDS: dict[str, tuple[Callable[..., np.ndarray], Tint]] = {
    "front_door": (front_door, (1.02, 1.0, 0.97)),
    "driveway": (driveway, (0.99, 1.0, 1.02)),
    "backyard": (backyard, (0.98, 1.02, 0.975)),
    "garage": (garage, (1.015, 1.0, 0.98)),
}


def camera_background(camera: str, seed: int, width: int, height: int) -> tuple[np.ndarray, Tint]:
    """Grey levels (float32) of a camera's fixed view and the tint to apply at the end."""
    builder, tint = CAMERA_BACKGROUNDS[camera]
    return builder(np.random.default_rng(seed), width, height), tint
