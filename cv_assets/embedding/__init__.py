"""Embedders, preprocessing, model loading and versioning (no Dagster here).

    from cv_assets.embedding import get_embedder
    embedder = get_embedder(settings.embedder)
    vectors = embedder.embed_images(frames)            # (N, 512) float32, unit norm
    outcome = embedder.embed_sources(paths, names)     # bad files land in outcome.errors
    embedder.model_version                             # stored with every vector
"""

from cv_assets.embedding.base import (
    EMBEDDING_DIM,
    EmbedOutcome,
    Embedder,
    EmbedderConfigError,
    ModelUnavailableError,
)
from cv_assets.embedding.clip import CLIPEmbeddingService, ClipEmbedder
from cv_assets.embedding.factory import clear_embedder_cache, get_embedder
from cv_assets.embedding.histogram import ColorHistogramEmbedder, TextSearchUnavailableError
from cv_assets.embedding.images import ImageError, load_image

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
