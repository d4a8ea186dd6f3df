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


def replace_appearances(db: AppDatabase, project_id: int, appearances: Sequence[Appearance]) -> int:
    """Replace the project's appearance rows in one transaction."""
    with db.write() as session:
        session.execute(delete(AssetAppearance).where(AssetAppearance.project_id == project_id))
        session.add_all(
            AssetAppearance(
                asset_id=a.asset_id,
                project_id=project_id,
                scene_index=a.scene_index,
                frame_index=a.frame_index,
                timestamp_sec=a.timestamp_sec,
                bbox=json.dumps(list(a.bbox)),
                confidence=a.confidence,
                source=a.source,
            )
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
        Appearance(
            asset_id=row.asset_id,
            asset_code=code,
            scene_index=row.scene_index,
            frame_index=row.frame_index,
            timestamp_sec=row.timestamp_sec,
            bbox=tuple(json.loads(row.bbox)),
            confidence=row.confidence,
            source=row.source,
            embedding=by_key.get((row.scene_index, row.frame_index, code)),
        )
        for row, code in rows
    ]
