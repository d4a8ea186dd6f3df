"""Sampled frames as stored: rows in DuckDB `sampled_frames`, pixels in the in-process
frame cache (when the sampler ran in this process) or in the exported JPEG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cv_assets.store.warehouse import Warehouse


def sampled_frame_rows(warehouse: Warehouse, project: str) -> pd.DataFrame:
    return warehouse.query(
        "SELECT * FROM sampled_frames WHERE project = ? ORDER BY scene_index, frame_index", [project]
    )


def frame_image(project: str, row) -> np.ndarray | None:
    """RGB pixels of one sampled frame: the cache first (no JPEG round trip), else the file."""
    from cv_assets.video import frame_cache

    cached = frame_cache.get(project, int(row.scene_index), int(row.frame_index), row.content_hash)
    if cached is not None:
        return cached
    if not row.image_path or not Path(row.image_path).is_file():
        return None
    bgr = cv2.imread(str(row.image_path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
