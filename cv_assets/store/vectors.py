"""The one place vectors are (de)serialised for storage: float32 bytes (SQLite `assets`)
and JSON text (SQLite `event_embeddings`, the inherited contract)."""

from __future__ import annotations

import json

import numpy as np


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def blob_to_vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def vector_to_json(vector: np.ndarray) -> str:
    """A JSON float array that round-trips float32 exactly ('%.9g') and is ~40% shorter
    than json.dumps of the float64 values."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError("embedding contains NaN or infinity")
    return "[" + ",".join(map("%.9g".__mod__, values.tolist())) + "]"


def vector_from_json(text: str) -> np.ndarray:
    return np.asarray(json.loads(text), dtype=np.float32)
