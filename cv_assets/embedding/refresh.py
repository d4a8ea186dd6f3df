"""Keep vectors in step with their inputs, incrementally. Plain functions: no Dagster, no store.

The caller lists its inputs (`EmbedInput`: an id, a content hash, the image source) and
what is stored for them (`StoredVector`); `refresh_embeddings` embeds only the inputs
whose content hash or model version changed and reports kept, new and failed items.
A bad input never stops the others: it is reported with its reason.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cv_assets.embedding.base import EMBEDDING_DIM, Embedder
from cv_assets.embedding.images import ImageSource

# A stored vector counts as unit length within this tolerance (float32 storage, fp16 on GPU).
UNIT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class EmbedInput:
    """One thing to embed: `source` is an RGB array, a path or encoded bytes; an input
    that could not be read has no source and says why in `error`."""

    item_id: str
    label: str
    digest: str | None
    source: ImageSource | None = None
    error: str | None = None


@dataclass(frozen=True)
class StoredVector:
    digest: str | None
    model_version: str | None
    vector: np.ndarray | None


@dataclass
class RefreshReport:
    """What one refresh did: new vectors to store, items kept as they are, failures."""

    model_version: str
    family: str
    device: str
    backend: str = "none"  # what ran the model (torch, openvino, numpy); "none" when nothing did
    precision: str = "none"
    total: int = 0
    vectors: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # item id -> (digest, vector)
    kept: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason
    embed_seconds: float = 0.0
    preview: list[list[str]] = field(default_factory=list)  # item label, status

    @property
    def embedded(self) -> int:
        return len(self.vectors)

    @property
    def skipped(self) -> int:
        return len(self.kept)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_sec(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.embed_seconds / self.embedded if self.embedded else 0.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_reference_image(item_id: str, path: str | Path) -> EmbedInput:
    """An input for a reference image file named by the user: its bytes and sha256, or
    the reason it cannot be read (the file's path labels it in every message)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return EmbedInput(item_id, str(path), None, error=f"{path}: reference image not found")
    except OSError as exc:
        return EmbedInput(item_id, str(path), None, error=f"{path}: cannot read reference image: {exc.strerror or exc}")
    return EmbedInput(item_id, str(path), sha256_bytes(data), source=data)


def is_current(stored: StoredVector | None, digest: str | None, model_version: str) -> bool:
    return (
        stored is not None
        and digest is not None
        and stored.vector is not None
        and len(stored.vector) == EMBEDDING_DIM
        and stored.model_version == model_version
        and stored.digest == digest
    )


def unchanged_report(inputs: Sequence[EmbedInput], stored: Mapping[str, StoredVector], model_version: str) -> RefreshReport | None:
    """The report of a refresh with nothing to do (every input readable and current for
    `model_version`), made without the model; None when anything must be embedded."""
    if any(item.error is not None or not is_current(stored.get(item.item_id), item.digest, model_version)
           for item in inputs):
        return None
    return RefreshReport(model_version=model_version, family="not loaded: nothing changed", device="none",
                         total=len(inputs), kept=[item.item_id for item in inputs],
                         preview=[[item.label, "skipped (unchanged)"] for item in inputs])


def refresh_embeddings(inputs: Sequence[EmbedInput], stored: Mapping[str, StoredVector], embedder: Embedder) -> RefreshReport:
    """Embed every input whose content or model changed; keep the rest."""
    # model_version loads the model: a missing model fails here, before anything is written.
    report = RefreshReport(model_version=embedder.model_version, family=embedder.family, device=embedder.device,
                           backend=embedder.backend, precision=embedder.precision, total=len(inputs))
    todo = []
    for item in inputs:
        if item.error is not None:
            report.failures[item.item_id] = item.error
            report.preview.append([item.label, f"failed: {item.error}"])
        elif is_current(stored.get(item.item_id), item.digest, report.model_version):
            report.kept.append(item.item_id)
            report.preview.append([item.label, "skipped (unchanged)"])
        else:
            todo.append(item)
    started = time.perf_counter()
    outcome = embedder.embed_sources([item.source for item in todo], names=[item.label for item in todo])
    report.embed_seconds = time.perf_counter() - started
    vectors = outcome.by_index()
    for position, item in enumerate(todo):
        if position in vectors:
            report.vectors[item.item_id] = (item.digest, vectors[position])
            report.preview.append([item.label, "embedded"])
        else:
            reason = outcome.errors.get(position, "not embedded")
            report.failures[item.item_id] = reason
            report.preview.append([item.label, f"failed: {reason}"])
    return report


# -- checks -----------------------------------------------------------------------------------


@dataclass
class VectorCheck:
    rows: int
    bad_dimension: list[str]
    bad_norm: list[str]
    with_nan: list[str]
    model_versions: list[str]

    @property
    def passed(self) -> bool:
        return not (self.bad_dimension or self.bad_norm or self.with_nan) and len(self.model_versions) <= 1

    def summary(self) -> str:
        if self.passed:
            return f"{self.rows} vectors: 512-d, unit norm, no NaN, model {', '.join(self.model_versions) or 'none'}"
        problems = [f"{len(v)} {name}" for name, v in
                    (("of the wrong dimension", self.bad_dimension), ("not unit norm", self.bad_norm),
                     ("with NaN", self.with_nan)) if v]
        if len(self.model_versions) > 1:
            problems.append(f"{len(self.model_versions)} model versions mixed")
        return f"{self.rows} vectors: " + ", ".join(problems)


def check_vectors(items: list[tuple[str, np.ndarray | None, str | None]],
                  norm_tolerance: float = UNIT_NORM_TOLERANCE) -> VectorCheck:
    """Dimension 512, unit norm within `norm_tolerance`, no NaN, one model_version."""
    result = VectorCheck(0, [], [], [], [])
    versions = set()
    for item_id, vector, version in items:
        if vector is None:
            continue
        result.rows += 1
        versions.add(version)
        vector = np.asarray(vector, dtype=np.float32).ravel()
        if vector.shape[0] != EMBEDDING_DIM:
            result.bad_dimension.append(f"{item_id} ({vector.shape[0]})")
            continue
        if np.isnan(vector).any():
            result.with_nan.append(item_id)
            continue
        norm = float(np.linalg.norm(vector))
        if not math.isclose(norm, 1.0, abs_tol=norm_tolerance):
            result.bad_norm.append(f"{item_id} ({norm:.4f})")
    result.model_versions = sorted(v for v in versions if v is not None)
    return result
