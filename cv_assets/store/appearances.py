"""Asset appearances (SQLite) with their region embeddings (DuckDB), per project."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd
from sqlalchemy import delete, select

from cv_assets.analysis.appearances import Appearance
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import Asset, AssetAppearance
from cv_assets.store.warehouse import Warehouse


# Columns an Appearance and its row share under the same name.
SHARED_FIELDS = ("asset_id", "scene_index", "frame_index", "timestamp_sec", "confidence", "source")


def _shared_fields(record) -> dict:
    return {name: getattr(record, name) for name in SHARED_FIELDS}


def replace_appearances(db: AppDatabase, project_id: int, appearances: Sequence[Appearance]) -> int:
    """Replace the project's appearance rows in one transaction."""
    with db.write() as session:
        session.execute(delete(AssetAppearance).where(AssetAppearance.project_id == project_id))
        session.add_all(
            AssetAppearance(project_id=project_id, bbox=json.dumps(list(a.bbox)), **_shared_fields(a))
            for a in appearances
        )
    return len(appearances)


def replace_region_embeddings(warehouse: Warehouse, project: str, appearances: Sequence[Appearance], model_version: str) -> int:
    """The matched region's vector of each clip_match appearance, for identity consistency."""
    rows = [
        {
            "project": project,
            "scene_index": a.scene_index,
            "frame_index": a.frame_index,
            "asset_code": a.asset_code,
            "model_version": model_version,
            "confidence": a.confidence,
            "embedding": np.asarray(a.embedding, dtype=np.float32).tolist(),
        }
        for a in appearances
        if a.embedding is not None and a.source == "clip_match"
    ]
    return warehouse.replace_partition("appearance_embeddings", project, pd.DataFrame(rows))


def load_appearances(db: AppDatabase, warehouse: Warehouse, project: str, project_id: int, model_version: str) -> list[Appearance]:
    """Appearances of a project, each with its region vector when one was stored."""
    vectors = warehouse.query(
        "SELECT scene_index, frame_index, asset_code, embedding FROM appearance_embeddings WHERE project = ? AND model_version = ?",
        [project, model_version],
    )
    by_key = {
        (int(r.scene_index), int(r.frame_index), r.asset_code): np.asarray(r.embedding, dtype=np.float32)
        for r in vectors.itertuples()
    }
    with db.read() as session:
        rows = session.execute(
            select(AssetAppearance, Asset.code)
            .join(Asset, Asset.id == AssetAppearance.asset_id)
            .where(AssetAppearance.project_id == project_id)
            .order_by(AssetAppearance.scene_index, AssetAppearance.frame_index, Asset.code)
        ).all()
    return [
        Appearance(asset_code=code, bbox=tuple(json.loads(row.bbox)),
                   embedding=by_key.get((row.scene_index, row.frame_index, code)), **_shared_fields(row))
        for row, code in rows
    ]
