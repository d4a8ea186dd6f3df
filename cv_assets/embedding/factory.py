"""`get_embedder`: one embedder per process per configuration, with the explicit fallback."""

from __future__ import annotations

import logging
import threading

from cv_assets.embedding.base import Embedder, ModelUnavailableError
from cv_assets.embedding.histogram import MODEL_VERSION as HISTOGRAM_VERSION
from cv_assets.embedding.histogram import ColorHistogramEmbedder
from cv_assets.embedding.locate import missing_model_reason, unavailable_message
from cv_assets.settings import EmbedderSettings, Settings

log = logging.getLogger(__name__)

# Keyed by the full embedder settings, so two configurations never share a model.
_embedders: dict[str, Embedder] = {}
_guard = threading.Lock()


def get_embedder(settings: EmbedderSettings | Settings | None = None) -> Embedder:
    """The embedder for `settings`, created once per process and shared by every caller.

    The CLIP model loads lazily at first use, and a missing model raises
    `ModelUnavailableError` there. With `fallback: color_histogram` the model is
    loaded here instead, and if it is unavailable the colour-histogram embedder is
    returned (with a warning) for the rest of the process.
    """
    if isinstance(settings, Settings):
        settings = settings.embedder
    settings = settings or EmbedderSettings()
    key = settings.model_dump_json()
    with _guard:
        embedder = _embedders.get(key)
        if embedder is None:
            embedder = _create(settings)
            _embedders[key] = embedder
        return embedder


def _create(settings: EmbedderSettings) -> Embedder:
    if settings.fallback != "color_histogram":
        return _clip(settings)
    # A model that certainly is not there (checked on disk) costs no torch import at all.
    reason = missing_model_reason(settings)
    try:
        if reason is not None:
            raise ModelUnavailableError(unavailable_message(settings, reason))
        clip = _clip(settings)
        clip.ensure_ready()
        return clip
    except ModelUnavailableError as exc:
        log.warning(
            "CLIP is unavailable, so embedder.fallback=color_histogram is in use: vectors are colour "
            "histograms (model_version %s), not CLIP, and text search is off. Reason: %s",
            HISTOGRAM_VERSION, exc)
        return ColorHistogramEmbedder(batch_size=settings.batch_size)


def _clip(settings: EmbedderSettings) -> Embedder:
    from cv_assets.embedding.clip import ClipEmbedder  # imports torch

    return ClipEmbedder(settings)


def clear_embedder_cache() -> None:
    """Forget every cached embedder (tests; or after replacing a model directory in place)."""
    with _guard:
        _embedders.clear()
    import sys

    openvino_backend = sys.modules.get("cv_assets.embedding.openvino_backend")
    if openvino_backend is not None:  # never import OpenVINO just to clear nothing
        openvino_backend.forget_compiled()
