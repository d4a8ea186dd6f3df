"""Shared helpers for the events tests: a small deterministic embedder, thumbnail makers
and event inserts."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timedelta

import numpy as np
from PIL import Image

from cv_assets.embedding.base import EmbedOutcome
from cv_assets.embedding.images import ImageError, describe_source, load_image
from cv_assets.store import AppDatabase
from cv_assets.store.models import Event

T0 = datetime(2026, 11, 1, 8, 0, 0)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


class MeanColourEmbedder:
    """Mean colour of the image -> a 512-d unit vector. Deterministic and fast, with the
    embedder contract's shape: decoding goes through the real `load_image`, bad sources
    land in `errors` with a reason naming them."""

    family = "mean_colour"
    dim = 512
    device = "cpu"

    def __init__(self, model_version: str = "mean-colour-v1"):
        self.model_version = model_version
        self.calls: list[int] = []

    @staticmethod
    def vector_for_rgb(rgb) -> np.ndarray:
        vector = np.zeros(512, dtype=np.float32)
        vector[:3] = np.asarray(rgb, dtype=np.float32) / 255.0 - 0.5
        vector[3] = 0.1  # keeps grey images away from the zero vector
        return vector / np.linalg.norm(vector)

    def embed_sources(self, sources, names=None) -> EmbedOutcome:
        self.calls.append(len(sources))
        names = list(names) if names is not None else [None] * len(sources)
        ok, errors, vectors = [], {}, []
        for index, (source, name) in enumerate(zip(sources, names)):
            try:
                image = load_image(source, describe_source(source, name))
            except ImageError as exc:
                errors[index] = str(exc)
                continue
            ok.append(index)
            vectors.append(self.vector_for_rgb(image.reshape(-1, 3).mean(axis=0)))
        matrix = np.stack(vectors) if vectors else np.zeros((0, 512), dtype=np.float32)
        return EmbedOutcome(vectors=matrix, ok=ok, errors=errors)

    def embed_texts(self, texts):
        return np.stack([self.vector_for_rgb(COLOURS[t.split()[-1]]) for t in texts])


def jpeg_bytes(rgb, size=(160, 120), noise: int = 0, seed: int = 0) -> bytes:
    image = np.empty((size[1], size[0], 3), dtype=np.int16)
    image[:] = rgb
    if noise:
        image += np.random.default_rng(seed).integers(-noise, noise + 1, image.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(rgb, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(rgb)).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def add_events(db: AppDatabase, rows: list[dict]) -> None:
    """Insert events directly (as the surrounding apps do)."""
    with db.write() as session:
        session.add_all(Event(**row) for row in rows)


def colour_events(db: AppDatabase, colours: list[str], *, camera: str = "front_door", start: datetime = T0,
                  step: timedelta = timedelta(minutes=10), prefix: str = "evt", noise: int = 6) -> list[str]:
    """One event per colour name, base64 JPEG thumbnails, `step` apart; returns the ids."""
    rows = []
    for i, colour in enumerate(colours):
        rows.append({
            "id": f"{prefix}-{i:04d}", "camera_id": camera, "started_at": start + i * step, "label": colour,
            "thumbnail_base64": b64(jpeg_bytes(COLOURS[colour], noise=noise, seed=i)),
        })
    add_events(db, rows)
    return [row["id"] for row in rows]


def new_db(tmp_path) -> AppDatabase:
    """An application database in the test's tmp_path (each test module wraps it in a `db` fixture)."""
    return AppDatabase(f"sqlite:///{tmp_path / 'events.sqlite'}")
