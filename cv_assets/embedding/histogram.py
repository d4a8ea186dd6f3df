"""A colour-histogram embedder for air-gapped demos (explicit opt-in: embedder.fallback).

It is not CLIP and never pretends to be: `family = "color_histogram"`, its own
`model_version`, no text search. It is built for what the demo shows: saturated,
distinctly coloured shapes over greyish textured backgrounds.

The vector is a soft HSV histogram of the *chromatic* pixels only (saturation and
value above thresholds, and a couple of pixels inside a coloured region, away from
the rims that video and JPEG compression smear): 32 hue x 4 saturation x 4 value
bins = 512. Grey background pixels do not count, so a crop is described by the
colours of what stands on the background, not by how much background it holds. Each pixel is spread linearly over
its neighbouring bins (hue circularly), so pure red (hue 0) and a JPEG-shifted red
(hue 254/255) land in the same bins. The square root of the normalised histogram
(Hellinger embedding) is already unit length; cosine similarity is then the
Bhattacharyya coefficient of the two colour distributions.

An image with (almost) no chromatic pixels gets one fixed unit vector spread evenly
over the lowest-saturation bins: far from any saturated colour, equal for all grey
images.
"""

from __future__ import annotations

import cv2
import numpy as np

from cv_assets.embedding.base import EMBEDDING_DIM, Embedder

HUE_BINS, SAT_BINS, VAL_BINS = 32, 4, 4
# Pixels below these (0..255 scale) are grey/dark: their hue is noise.
MIN_SATURATION = 64
MIN_VALUE = 48
# Fewer chromatic pixels than this share of the image counts as "no colour at all".
MIN_CHROMATIC_FRACTION = 0.002
# Only pixels at least this far inside a coloured region count: JPEG/H.264 chroma
# subsampling smears colour edges into greyish, wrongly saturated pixels. Small
# regions that would vanish keep their edge pixels instead.
EDGE_MARGIN_PX = 2
# Larger images are area-averaged to this longer side first, and at most this many
# chromatic pixels (an even subsample) are counted: the histogram is the same.
MAX_SIDE = 1024
MAX_COUNTED_PIXELS = 65_536
MODEL_VERSION = "color_histogram-v1"

assert HUE_BINS * SAT_BINS * VAL_BINS == EMBEDDING_DIM


class TextSearchUnavailableError(RuntimeError):
    """Text-to-image search needs a CLIP model; the colour-histogram embedder has no text side."""


def _achromatic_vector() -> np.ndarray:
    histogram = np.zeros((HUE_BINS, SAT_BINS, VAL_BINS), dtype=np.float32)
    histogram[:, 0, :] = 1.0
    return (histogram / np.linalg.norm(histogram)).ravel()


ACHROMATIC_VECTOR = _achromatic_vector()


def _soft_bins(values: np.ndarray, low: float, high: float, bins: int, circular: bool):
    """Two neighbouring bin indices per value and the weight of the upper one (bin centres)."""
    position = (values - low) / (high - low) * bins - 0.5
    if not circular:
        position = np.clip(position, 0.0, bins - 1.0)
    lower = np.floor(position)
    weight = (position - lower).astype(np.float32)
    lower = lower.astype(np.int64)
    upper = lower + 1
    if circular:
        lower %= bins
        upper %= bins
    else:
        upper = np.minimum(upper, bins - 1)
    return lower, upper, weight


def chromatic_mask(hsv: np.ndarray) -> np.ndarray:
    """Pixels whose hue means something, without the smeared rims of coloured regions."""
    mask = ((hsv[:, :, 1] >= MIN_SATURATION) & (hsv[:, :, 2] >= MIN_VALUE)).astype(np.uint8)
    kernel = np.ones((2 * EDGE_MARGIN_PX + 1, 2 * EDGE_MARGIN_PX + 1), np.uint8)
    inner = cv2.erode(mask, kernel, borderType=cv2.BORDER_REPLICATE)
    minimum = max(1.0, MIN_CHROMATIC_FRACTION * mask.size)
    return (inner if inner.sum() >= minimum else mask).astype(bool)


def color_histogram_vector(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (512,) float32 unit vector (see the module docstring)."""
    height, width = image.shape[:2]
    scale = MAX_SIDE / max(height, width)
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV_FULL)
    mask = chromatic_mask(hsv)
    if mask.sum() < max(1.0, MIN_CHROMATIC_FRACTION * mask.size):
        return ACHROMATIC_VECTOR.copy()
    pixels = hsv[mask]
    if len(pixels) > MAX_COUNTED_PIXELS:
        pixels = pixels[:: -(-len(pixels) // MAX_COUNTED_PIXELS)]
    hue, sat, val = pixels.astype(np.float32).T
    h0, h1, wh = _soft_bins(hue, 0.0, 256.0, HUE_BINS, circular=True)
    s0, s1, ws = _soft_bins(sat, MIN_SATURATION, 256.0, SAT_BINS, circular=False)
    v0, v1, wv = _soft_bins(val, MIN_VALUE, 256.0, VAL_BINS, circular=False)
    histogram = np.zeros(EMBEDDING_DIM, dtype=np.float64)
    for h_idx, h_w in ((h0, 1.0 - wh), (h1, wh)):
        for s_idx, s_w in ((s0, 1.0 - ws), (s1, ws)):
            for v_idx, v_w in ((v0, 1.0 - wv), (v1, wv)):
                index = (h_idx * SAT_BINS + s_idx) * VAL_BINS + v_idx
                histogram += np.bincount(index, weights=h_w * s_w * v_w, minlength=EMBEDDING_DIM)
    vector = np.sqrt(histogram / histogram.sum())
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class ColorHistogramEmbedder(Embedder):
    """Same interface as the CLIP embedder; vectors are Hellinger colour histograms."""

    family = "color_histogram"
    device = "cpu"

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    @property
    def model_version(self) -> str:
        return MODEL_VERSION

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return color_histogram_vector(image)

    def _embed_prepared(self, prepared: list[np.ndarray]) -> np.ndarray:
        return np.stack(prepared).astype(np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise TextSearchUnavailableError(
            "text search needs a CLIP model: the configured embedder is the colour-histogram fallback "
            f"({MODEL_VERSION}). Point embedder.model at a local CLIP checkpoint to search by text.")
