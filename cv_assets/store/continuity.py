"""Continuity results: per scene in SQLite `scene_manifests` (`continuity_score`,
`cv_analysis_json`) and appended to DuckDB `continuity_history`."""

from __future__ import annotations

import json
from typing import Sequence

import pandas as pd
from sqlalchemy import select

from cv_assets.store.database import AppDatabase
from cv_assets.store.models import SceneManifest
from cv_assets.store.warehouse import Warehouse


def save_continuity(db: AppDatabase, warehouse: Warehouse, project_id: int, project: str, results: Sequence,
                    run_id: str, model_version: str) -> None:
    """Store each scene's score and details (results have `scene_index`, `score`, the
    components and `as_json()`); a scene without a result keeps no stale score."""
    by_index = {r.scene_index: r for r in results}
    with db.write() as session:
        for scene in session.scalars(select(SceneManifest).where(SceneManifest.project_id == project_id)):
            result = by_index.get(scene.scene_index)
            scene.continuity_score = None if result is None else result.score
            scene.cv_analysis_json = None if result is None else json.dumps(result.as_json())
    history = pd.DataFrame([
        {"project": project, "scene_index": r.scene_index, "run_id": run_id, "model_version": model_version,
         "score": r.score, "adherence": r.adherence, "identity": r.identity, "boundary": r.boundary,
         "intra_scene": r.intra_scene, "needs_review": r.needs_review, "details": json.dumps(r.as_json())}
        for r in results
    ])
    warehouse.append("continuity_history", history)


def load_continuity(db: AppDatabase, project_id: int) -> list[dict]:
    """The stored continuity details of each scored scene, in scene order."""
    with db.read() as session:
        rows = session.scalars(select(SceneManifest.cv_analysis_json)
                               .where(SceneManifest.project_id == project_id, SceneManifest.cv_analysis_json.is_not(None))
                               .order_by(SceneManifest.scene_index))
        return [json.loads(text) for text in rows]
