"""Stored vectors of a project: reference images (SQLite `assets.clip_embedding`, float32
bytes) and sampled frames (DuckDB `frame_embeddings`), with their failure rows."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cv_assets.store.database import AppDatabase
from cv_assets.store.failures import clear_failures, record_failures
from cv_assets.store.models import Asset, utcnow
from cv_assets.store.vectors import blob_to_vector, vector_to_blob
from cv_assets.store.warehouse import Warehouse

FRAME_VECTOR_COLUMNS = ["project", "scene_index", "frame_index", "content_hash", "model_version", "embedding", "created_at"]


def asset_item_id(project: str, code: str) -> str:
    return f"{project}/{code}"


def frame_item_id(project: str, scene_index: int, frame_index: int) -> str:
    return f"{project}/{int(scene_index)}/{int(frame_index)}"


def stored_reference_vectors(assets: Sequence[Asset], project: str) -> dict[str, tuple[str | None, str | None, np.ndarray | None]]:
    """(image sha256, model_version, vector) of each asset, by item id."""
    return {asset_item_id(project, a.code): (a.reference_image_hash, a.embedding_model_version, blob_to_vector(a.clip_embedding))
            for a in assets}


def save_reference_vectors(db: AppDatabase, project: str, assets: Sequence[Asset], model_version: str,
                           vectors: dict[str, tuple[str, np.ndarray]], failures: dict[str, str]) -> None:
    """Store new reference vectors; clear the vector of a failed asset (a stale vector of
    another image or model must not stand in for it); keep the failure rows in step."""
    ids = {asset_item_id(project, a.code): a.id for a in assets}
    with db.write() as session:
        for item_id, (digest, vector) in vectors.items():
            session.execute(Asset.__table__.update().where(Asset.id == ids[item_id]).values(
                clip_embedding=vector_to_blob(vector), embedding_model_version=model_version, reference_image_hash=digest))
        for item_id in failures:
            session.execute(Asset.__table__.update().where(Asset.id == ids[item_id]).values(
                clip_embedding=None, embedding_model_version=None, reference_image_hash=None))
        record_failures(session, "asset", model_version, failures)
        clear_failures(session, "asset", model_version, [i for i in ids if i not in failures])


def stored_frame_vectors(warehouse: Warehouse, project: str) -> pd.DataFrame:
    return warehouse.query(
        "SELECT scene_index, frame_index, content_hash, model_version, embedding, created_at "
        "FROM frame_embeddings WHERE project = ?", [project])


def frame_vectors(warehouse: Warehouse, project: str, model_version: str, scene_index: int | None = None) -> pd.DataFrame:
    """The project's frame vectors of one model version (optionally one scene), in frame order."""
    sql = ("SELECT scene_index, frame_index, embedding, model_version FROM frame_embeddings "
           "WHERE project = ? AND model_version = ?")
    params: list = [project, model_version]
    if scene_index is not None:
        sql += " AND scene_index = ?"
        params.append(int(scene_index))
    return warehouse.query(sql + " ORDER BY scene_index, frame_index", params)


def all_frame_vectors(warehouse: Warehouse, project: str) -> pd.DataFrame:
    return warehouse.query(
        "SELECT scene_index, frame_index, embedding, model_version FROM frame_embeddings WHERE project = ?", [project])


def save_frame_vectors(warehouse: Warehouse, db: AppDatabase, project: str, model_version: str,
                       stored: pd.DataFrame, kept: Sequence[str], vectors: dict[str, tuple[str, np.ndarray]],
                       failures: dict[str, str], all_item_ids: Sequence[str]) -> int:
    """Replace the project's `frame_embeddings` rows with the kept and the new ones in one
    transaction (frames no longer sampled, and failed frames, have no row); keep the
    failure rows in step. Item ids are `frame_item_id`s. Returns the rows written."""
    now = utcnow()
    kept = set(kept)
    rows = [{"project": project, "scene_index": int(r.scene_index), "frame_index": int(r.frame_index),
             "content_hash": r.content_hash, "model_version": r.model_version,
             "embedding": np.asarray(r.embedding, np.float32), "created_at": r.created_at}
            for r in stored.itertuples(index=False) if frame_item_id(project, r.scene_index, r.frame_index) in kept]
    for item_id, (digest, vector) in vectors.items():
        scene_index, frame_index = (int(part) for part in item_id.rsplit("/", 2)[1:])
        rows.append({"project": project, "scene_index": scene_index, "frame_index": frame_index, "content_hash": digest,
                     "model_version": model_version, "embedding": np.asarray(vector, np.float32), "created_at": now})
    written = warehouse.replace_partition("frame_embeddings", project, pd.DataFrame(rows, columns=FRAME_VECTOR_COLUMNS))
    with db.write() as session:
        record_failures(session, "frame", model_version, failures)
        clear_failures(session, "frame", model_version, [i for i in all_item_ids if i not in failures])
    return written
