"""The colour-histogram fallback: explicit in config, its own version, and real matching
on demo-like pictures (saturated shapes over greyish textured backgrounds)."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest

from cv_assets.demo import backgrounds, sprites
from PIL import Image

from cv_assets.embedding import (
    ClipEmbedder,
    ColorHistogramEmbedder,
    ModelUnavailableError,
    TextSearchUnavailableError,
    get_embedder,
)
from cv_assets.embedding.histogram import ACHROMATIC_VECTOR, color_histogram_vector

# Each asset: (main colour, darker parts, detail colour), like the demo's sprites.
ASSETS = {
    "red": [(225, 35, 40), (150, 18, 24), (250, 120, 120)],
    "blue": [(40, 80, 220), (22, 34, 110), (110, 160, 250)],
    "green": [(50, 170, 70), (18, 95, 32), (24, 118, 40)],
    "yellow": [(240, 205, 30), (196, 150, 18), (252, 238, 140)],
}


def draw_asset(canvas: np.ndarray, name: str, x: int, y: int, size: int) -> tuple[int, int, int, int]:
    """A figure-like shape: body, darker legs and a detail band; returns its box."""
    main, dark, detail = ASSETS[name]
    w, h = size // 2, size
    cv2.rectangle(canvas, (x, y + h // 4), (x + w, y + 3 * h // 4), main, -1)
    cv2.rectangle(canvas, (x + w // 8, y + 3 * h // 4), (x + 7 * w // 8, y + h), dark, -1)
    cv2.rectangle(canvas, (x, y + h // 2), (x + w, y + h // 2 + h // 12), detail, -1)
    cv2.circle(canvas, (x + w // 2, y + h // 8), h // 8, dark, -1)
    return x, y, x + w, y + h


def grey_background(height: int, width: int, seed: int, tint=(1.02, 1.0, 0.97)) -> np.ndarray:
    """Gradient, blotches, grey blocks and grain, times a near-neutral tint (saturation < 25)."""
    rng = np.random.default_rng(seed)
    grey = np.repeat(np.linspace(190, 120, height, dtype=np.float32)[:, None], width, axis=1)
    coarse = rng.normal(0, 8, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
    grey += cv2.resize(coarse, (width, height)) + rng.normal(0, 2, (height, width)).astype(np.float32)
    for _ in range(8):
        x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        cv2.rectangle(grey, (x, y), (x + int(rng.integers(20, 60)), y + int(rng.integers(20, 60))),
                      float(rng.uniform(70, 200)), -1)
    rgb = grey[..., None] * np.asarray(tint, dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def reference(name: str) -> np.ndarray:
    image = np.full((256, 256, 3), 128, dtype=np.uint8)
    draw_asset(image, name, 70, 18, 220)
    return image


def jpeg_round_trip(image: np.ndarray, quality: int = 80) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def crop_around(image: np.ndarray, box, margin: float) -> np.ndarray:
    x1, y1, x2, y2 = box
    mx, my = int((x2 - x1) * margin), int((y2 - y1) * margin)
    return image[max(0, y1 - my):y2 + my, max(0, x1 - mx):x2 + mx]


@pytest.fixture(scope="module")
def scene():
    """A 640x360 frame with all four assets at about 100 px, JPEG-compressed like a sampled frame."""
    frame = grey_background(360, 640, seed=1)
    boxes = {name: draw_asset(frame, name, 40 + i * 150, 120 + (i % 2) * 60, 110) for i, name in enumerate(ASSETS)}
    return jpeg_round_trip(frame), boxes


@pytest.fixture(scope="module")
def embedder() -> ColorHistogramEmbedder:
    return ColorHistogramEmbedder()


def test_interface_version_and_vectors(embedder, scene):
    frame, _ = scene
    assert (embedder.family, embedder.model_version, embedder.dim, embedder.device) == (
        "color_histogram", "color_histogram-v1", 512, "cpu")
    vectors = embedder.embed_images([frame, reference("red"), grey_background(100, 100, 3)])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (vectors >= 0).all()


@pytest.mark.parametrize("name", list(ASSETS))
@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_a_crop_dominated_by_an_asset_matches_its_reference(embedder, scene, name, margin):
    frame, boxes = scene
    crop = crop_around(frame, boxes[name], margin)
    vector = embedder.generate_embedding(crop)
    own = embedder.compute_similarity(vector, embedder.generate_embedding(reference(name)))
    assert own > 0.85, f"{name} crop vs its reference: {own:.3f}"
    for other in ASSETS:
        if other != name:
            score = embedder.compute_similarity(vector, embedder.generate_embedding(reference(other)))
            assert score < 0.5, f"{name} crop vs {other} reference: {score:.3f}"


def test_plain_background_matches_no_asset(embedder):
    for seed in range(3):
        background = jpeg_round_trip(grey_background(200, 300, seed=seed + 10))
        vector = embedder.generate_embedding(background)
        np.testing.assert_allclose(vector, ACHROMATIC_VECTOR)
        for name in ASSETS:
            assert embedder.compute_similarity(vector, embedder.generate_embedding(reference(name))) < 0.5


def test_achromatic_vector_is_a_fixed_unit_vector_in_the_lowest_saturation_bins():
    assert np.linalg.norm(ACHROMATIC_VECTOR) == pytest.approx(1.0)
    bins = ACHROMATIC_VECTOR.reshape(32, 4, 4)
    assert (bins[:, 1:, :] == 0).all() and (bins[:, 0, :] > 0).all()
    np.testing.assert_allclose(color_histogram_vector(np.zeros((10, 10, 3), np.uint8)), ACHROMATIC_VECTOR)
    np.testing.assert_allclose(color_histogram_vector(np.full((10, 10, 3), 255, np.uint8)), ACHROMATIC_VECTOR)


def test_red_matches_across_the_hue_wrap_around():
    pure = np.full((20, 20, 3), (230, 20, 20), np.uint8)  # hue 0
    bluish = np.full((20, 20, 3), (230, 20, 32), np.uint8)  # hue just below 360 degrees
    yellowish = np.full((20, 20, 3), (230, 32, 20), np.uint8)  # hue just above 0
    a, b, c = (color_histogram_vector(x) for x in (pure, bluish, yellowish))
    assert float(a @ b) > 0.9 and float(a @ c) > 0.9 and float(b @ c) > 0.8


def test_text_search_needs_clip(embedder):
    with pytest.raises(TextSearchUnavailableError, match="text search needs a CLIP model"):
        embedder.embed_texts(["a red car"])


def test_get_embedder_falls_back_only_when_configured(settings_factory, tmp_path, caplog):
    missing = str(tmp_path / "no-model-here")
    settings, _ = settings_factory(embedder={"model": missing, "fallback": "color_histogram"})
    with caplog.at_level(logging.WARNING, logger="cv_assets.embedding.factory"):
        fallback = get_embedder(settings.embedder)
    assert isinstance(fallback, ColorHistogramEmbedder)
    assert fallback.model_version == "color_histogram-v1"
    assert "embedder.fallback=color_histogram" in caplog.text and missing in caplog.text
    assert get_embedder(settings.embedder) is fallback

    strict, _ = settings_factory(embedder={"model": missing, "fallback": "none"})
    clip = get_embedder(strict.embedder)
    assert isinstance(clip, ClipEmbedder)
    with pytest.raises(ModelUnavailableError, match="no-model-here"):
        clip.embed_images([reference("red")])


def test_fallback_configured_but_clip_available_uses_clip(settings_factory):
    settings, _ = settings_factory(embedder={"fallback": "color_histogram"})
    embedder = get_embedder(settings.embedder)
    assert embedder.family == "clip" and embedder.model_version.startswith("clip:tiny-clip@")


@pytest.mark.parametrize("kind", ["street", "alley", "park", "interior"])
def test_demo_assets_match_their_references_in_demo_backgrounds(embedder, kind):
    """The demo's own sprites (small, mid-stride) on its backgrounds, JPEG-compressed."""
    frame = backgrounds.scene_background(kind, seed=4, width=640, height=360, tint=(1.02, 1.0, 0.97)).copy()
    boxes = {}
    for i, code in enumerate(sprites.DESIGNS):
        rgb, mask = sprites.render_sprite(code, 0.6, 1)
        x0, y0 = 30 + 150 * i, 150
        region = frame[y0:y0 + rgb.shape[0], x0:x0 + rgb.shape[1]]
        region[mask] = rgb[mask]
        boxes[code] = (x0, y0, x0 + rgb.shape[1], y0 + rgb.shape[0])
    frame = jpeg_round_trip(frame, quality=75)
    refs = {code: embedder.generate_embedding(sprites.reference_image(code)) for code in sprites.DESIGNS}
    background_vector = embedder.generate_embedding(frame[0:100, 0:200])
    for code, box in boxes.items():
        vector = embedder.generate_embedding(crop_around(frame, box, 0.3))
        for other, ref in refs.items():
            score = embedder.compute_similarity(vector, ref)
            assert (score > 0.85) if other == code else (score < 0.5), f"{code} crop vs {other}: {score:.3f}"
        assert embedder.compute_similarity(background_vector, refs[code]) < 0.5
