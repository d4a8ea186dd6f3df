"""Keep stored vectors in step with their inputs: reference images (SQLite `assets`) and
sampled frames (DuckDB `frame_embeddings`). Plain functions, no Dagster.

Both refreshes are incremental: an input whose content hash and model_version match
its stored vector is skipped, so re-running recomputes nothing, while a new model or
a changed image is re-embedded. A bad input is recorded in `embedding_failures` with
its reason and never stops the others; once it embeds, its failure row goes.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from sqlalchemy import delete, select

from cv_assets.embedding.base import EMBEDDING_DIM, Embedder
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import Asset, EmbeddingFailure, Project, utcnow
from cv_assets.store.warehouse import Warehouse

FrameSource = Any  # np.ndarray (cached pixels) or a JPEG path
# A stored vector counts as unit length within this tolerance (float32 storage, fp16 on GPU).
UNIT_NORM_TOLERANCE = 1e-3


@dataclass
class RefreshReport:
    """What one refresh did, for asset metadata and logs."""

    model_version: str
    family: str
    device: str
    total: int = 0
    embedded: int = 0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason
    embed_seconds: float = 0.0
    preview: list[list[str]] = field(default_factory=list)

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


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def blob_to_vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def resolve_reference_path(project_root: str | Path, reference: str) -> Path:
    path = Path(reference).expanduser()
    return path if path.is_absolute() else Path(project_root) / path


def _start(embedder: Embedder) -> RefreshReport:
    # model_version loads the model: a missing model fails here, before anything is written.
    return RefreshReport(model_version=embedder.model_version, family=embedder.family, device=embedder.device)


# -- reference images -> SQLite assets ------------------------------------------------------


@dataclass
class _Reference:
    asset_id: int
    code: str
    path: Path
    data: bytes | None = None
    digest: str | None = None
    error: str | None = None


def refresh_reference_embeddings(db: AppDatabase, project_key: str, embedder: Embedder) -> RefreshReport:
    """Embed every reference image of the project whose bytes or model changed."""
    report = _start(embedder)
    version = report.model_version
    with db.read() as session:
        project = session.scalar(select(Project).where(Project.key == project_key))
        if project is None:
            raise LookupError(f"project {project_key!r} is not in the application database")
        assets = list(session.scalars(select(Asset).where(Asset.project_id == project.id).order_by(Asset.code)))
        root = project.root_path
    report.total = len(assets)
    todo: list[_Reference] = []
    for asset in assets:
        ref = _read_reference(asset, root)
        if ref.error is None and _reference_is_current(asset, ref.digest, version):
            report.skipped += 1
            report.preview.append([asset.code, "skipped (unchanged)", ref.path.name])
            continue
        todo.append(ref)

    readable = [ref for ref in todo if ref.error is None]
    started = time.perf_counter()
    outcome = embedder.embed_sources([ref.data for ref in readable], names=[str(ref.path) for ref in readable])
    report.embed_seconds = time.perf_counter() - started
    vectors = outcome.by_index()
    for position, ref in enumerate(readable):
        if position in outcome.errors:
            ref.error = outcome.errors[position]

    with db.write() as session:
        for position, ref in enumerate(readable):
            if ref.error is None:
                session.execute(
                    Asset.__table__.update().where(Asset.id == ref.asset_id).values(
                        clip_embedding=vector_to_blob(vectors[position]),
                        embedding_model_version=version,
                        reference_image_hash=ref.digest,
                    ))
                report.embedded += 1
                report.preview.append([ref.code, "embedded", ref.path.name])
        failed = [ref for ref in todo if ref.error is not None]
        for ref in failed:
            # A stale vector of another image or model must not stand in for this one.
            session.execute(
                Asset.__table__.update().where(Asset.id == ref.asset_id).values(
                    clip_embedding=None, embedding_model_version=None, reference_image_hash=None))
            report.failures[f"{project_key}/{ref.code}"] = ref.error
            report.preview.append([ref.code, "failed", ref.error])
        _record_failures(session, "asset", report.failures, version)
        _clear_failures(session, "asset", [f"{project_key}/{a.code}" for a in assets
                                            if f"{project_key}/{a.code}" not in report.failures], version)
    return report


def _read_reference(asset: Asset, root: str) -> _Reference:
    path = resolve_reference_path(root, asset.reference_image_path)
    ref = _Reference(asset.id, asset.code, path)
    try:
        ref.data = path.read_bytes()
    except FileNotFoundError:
        ref.error = f"{path}: reference image not found"
    except OSError as exc:
        ref.error = f"{path}: cannot read reference image: {exc.strerror or exc}"
    else:
        ref.digest = sha256_bytes(ref.data)
    return ref


def _reference_is_current(asset: Asset, digest: str | None, version: str) -> bool:
    return (
        asset.clip_embedding is not None
        and len(asset.clip_embedding) == EMBEDDING_DIM * 4
        and asset.embedding_model_version == version
        and asset.reference_image_hash == digest
    )


# -- sampled frames -> DuckDB frame_embeddings ------------------------------------------------


def default_frame_source(project: str, row) -> FrameSource | None:
    """Pixels of a sampled frame: the video module's in-process cache when it has them
    (no JPEG round trip), else the exported JPEG's path (None when there is neither)."""
    try:
        from cv_assets.video import frame_cache
    except ImportError:
        frame_cache = None
    if frame_cache is not None and row.content_hash:
        cached = frame_cache.get(project, int(row.scene_index), int(row.frame_index), row.content_hash)
        if cached is not None:
            return cached
    image_path = row.image_path
    return image_path if isinstance(image_path, str) and image_path else None


def _frame_id(project: str, scene_index: int, frame_index: int) -> str:
    return f"{project}/{scene_index}/{frame_index}"


def _frame_hash(row) -> str | None:
    if isinstance(row.content_hash, str) and row.content_hash:
        return row.content_hash
    # No pixel hash recorded: fall back to the bytes of the exported file.
    path = row.image_path
    if isinstance(path, str) and Path(path).is_file():
        return "file-sha256:" + sha256_bytes(Path(path).read_bytes())
    return None


def refresh_frame_embeddings(
    warehouse: Warehouse,
    db: AppDatabase,
    project: str,
    embedder: Embedder,
    frame_source: Callable[[str, Any], FrameSource | None] = default_frame_source,
) -> RefreshReport:
    """Embed the project's sampled frames whose pixels or model changed, and replace the
    project's `frame_embeddings` rows in one transaction with the kept and new rows.
    Rows of frames no longer sampled go; failed frames have no row until they embed."""
    report = _start(embedder)
    version = report.model_version
    frames = warehouse.query(
        "SELECT scene_index, frame_index, image_path, content_hash FROM sampled_frames "
        "WHERE project = ? ORDER BY scene_index, frame_index", [project])
    existing = warehouse.query(
        "SELECT scene_index, frame_index, content_hash, model_version, embedding, created_at "
        "FROM frame_embeddings WHERE project = ?", [project])
    stored = {(int(r.scene_index), int(r.frame_index)): r for r in existing.itertuples(index=False)}
    report.total = len(frames)

    kept, todo, sources, names = [], [], [], []
    for row in frames.itertuples(index=False):
        key = (int(row.scene_index), int(row.frame_index))
        frame_id = _frame_id(project, *key)
        digest = _frame_hash(row)
        old = stored.get(key)
        if old is not None and digest is not None and old.content_hash == digest and old.model_version == version:
            kept.append(old)
            report.skipped += 1
            continue
        source = frame_source(project, row)
        if source is None or digest is None:
            report.failures[frame_id] = (f"scene {key[0]} frame {key[1]}: no cached pixels and no image file "
                                         f"(image_path {row.image_path!r})")
            continue
        todo.append((key, digest))
        sources.append(source)
        names.append(f"scene {key[0]} frame {key[1]} ({row.image_path})")

    started = time.perf_counter()
    outcome = embedder.embed_sources(sources, names=names)
    report.embed_seconds = time.perf_counter() - started
    for position, reason in outcome.errors.items():
        report.failures[_frame_id(project, *todo[position][0])] = reason
    now = utcnow()
    new_rows = [
        {"scene_index": todo[position][0][0], "frame_index": todo[position][0][1],
         "content_hash": todo[position][1], "model_version": version, "embedding": vector, "created_at": now}
        for position, vector in outcome.by_index().items()
    ]
    report.embedded = len(new_rows)
    rows = pd.DataFrame(
        [{"scene_index": r.scene_index, "frame_index": r.frame_index, "content_hash": r.content_hash,
          "model_version": r.model_version, "embedding": np.asarray(r.embedding, dtype=np.float32),
          "created_at": r.created_at} for r in kept] + new_rows,
        columns=["scene_index", "frame_index", "content_hash", "model_version", "embedding", "created_at"])
    rows.insert(0, "project", project)
    warehouse.replace_partition("frame_embeddings", project, rows)

    with db.write() as session:
        _record_failures(session, "frame", report.failures, version)
        done = [_frame_id(project, int(r.scene_index), int(r.frame_index)) for r in frames.itertuples(index=False)]
        _clear_failures(session, "frame", [i for i in done if i not in report.failures], version)
    report.preview = [[str(r["scene_index"]), str(r["frame_index"]), "embedded"] for r in new_rows]
    report.preview += [[item.rsplit("/", 2)[1], item.rsplit("/", 2)[2], f"failed: {why}"]
                       for item, why in report.failures.items()]
    return report


# -- failure rows ---------------------------------------------------------------------------


def _record_failures(session, kind: str, failures: dict[str, str], version: str) -> None:
    if not failures:
        return
    existing = {
        f.item_id: f
        for f in session.scalars(select(EmbeddingFailure).where(
            EmbeddingFailure.item_kind == kind, EmbeddingFailure.model_version == version,
            EmbeddingFailure.item_id.in_(list(failures))))
    }
    now = utcnow()
    for item_id, reason in failures.items():
        row = existing.get(item_id)
        if row is None:
            session.add(EmbeddingFailure(item_kind=kind, item_id=item_id, model_version=version, reason=reason,
                                         attempts=1, first_failed_at=now, last_failed_at=now))
        else:
            row.reason, row.attempts, row.last_failed_at = reason, row.attempts + 1, now


def _clear_failures(session, kind: str, item_ids: list[str], version: str) -> None:
    # Chunks keep the statement under SQLite's bound-parameter limit on large projects.
    chunk = 500
    for start in range(0, len(item_ids), chunk):
        session.execute(delete(EmbeddingFailure).where(
            EmbeddingFailure.item_kind == kind, EmbeddingFailure.model_version == version,
            EmbeddingFailure.item_id.in_(item_ids[start:start + chunk])))


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
