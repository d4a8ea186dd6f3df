"""Embedders, preprocessing, model loading and versioning (no Dagster here).

    from cv_assets.embedding import get_embedder
    embedder = get_embedder(settings.embedder)
    vectors = embedder.embed_images(frames)            # (N, 512) float32, unit norm
    outcome = embedder.embed_sources(paths, names)     # bad files land in outcome.errors
    embedder.model_version                             # stored with every vector
"""

from importlib import import_module

from cv_assets.embedding.base import (
    EMBEDDING_DIM,
    EmbedOutcome,
    Embedder,
    EmbedderConfigError,
    ModelUnavailableError,
)
from cv_assets.embedding.images import ImageError, load_image

# torch and transformers load only when a model is needed: a run with nothing to embed,
# and every step that only reads stored vectors, never pays for importing them.
_LAZY = {
    "CLIPEmbeddingService": "cv_assets.embedding.clip",
    "ClipEmbedder": "cv_assets.embedding.clip",
    "clear_embedder_cache": "cv_assets.embedding.factory",
    "get_embedder": "cv_assets.embedding.factory",
    "ColorHistogramEmbedder": "cv_assets.embedding.histogram",
    "TextSearchUnavailableError": "cv_assets.embedding.histogram",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EMBEDDING_DIM",
    "CLIPEmbeddingService",
    "ClipEmbedder",
    "ColorHistogramEmbedder",
    "EmbedOutcome",
    "Embedder",
    "EmbedderConfigError",
    "ImageError",
    "ModelUnavailableError",
    "TextSearchUnavailableError",
    "clear_embedder_cache",
    "get_embedder",
    "load_image",
]
