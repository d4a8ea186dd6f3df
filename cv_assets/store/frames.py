"""Sampled frames as stored: `clips` and `sampled_frames` rows in DuckDB, and each frame's
pixels as a lossless PNG under `<frames_dir>/<project>/v-<id>/scene_<NNN>/frame_<NNNNNN>.png`.

Lossless, so every later step (frame_embeddings, asset_appearances, the report) reads
exactly the pixels the sampler decoded, in whatever process or machine it runs: the
row's `content_hash` is the sha256 of those pixels and is checked on read.

A run writes its frames into a new version folder, commits the rows that point at it,
then removes the project's other folders. Killed before the commit, it leaves an unused
folder (removed by the next run) beside the previous rows and files; killed after it,
the rows already point at the new folder. A per-project lock keeps two runs of one
project from removing each other's folders.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from cv_assets.store.locks import file_lock
from cv_assets.store.warehouse import Warehouse

VERSION_PREFIX = "v-"
LOCK_NAME = ".frames.lock"
PNG_COMPRESSION = 1  # fast; still lossless
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

CLIP_COLUMNS = [
    "project", "scene_index", "path", "size_bytes", "codec", "width", "height", "fps",
    "declared_frames", "decoded_frames", "duration_sec", "status", "reason", "decode_ms", "content_hash", "cuts",
]
FRAME_COLUMNS = [
    "project", "scene_index", "frame_index", "timestamp_sec", "reasons", "motion_score",
    "image_path", "width", "height", "content_hash",
]


@dataclass(frozen=True)
class SavedFrames:
    folder: Path  # the version folder the rows point at
    frames: int
    write_ms: float


def project_frames_dir(frames_dir: str | os.PathLike, project: str) -> Path:
    """`<frames_dir>/<project>`; the key must be a plain folder name (no '/', no '..')."""
    if not _SAFE_NAME.match(project) or ".." in project:
        raise ValueError(f"project key {project!r} cannot be used as a folder name")
    return Path(frames_dir) / project


def frame_relpath(scene_index: int, frame_index: int) -> Path:
    return Path(f"scene_{int(scene_index):03d}") / f"frame_{int(frame_index):06d}.png"


def pixels_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()


def save_sampled_frames(
    warehouse: Warehouse,
    frames_dir: str | os.PathLike,
    project: str,
    clip_rows: Sequence[Mapping],
    frames_by_scene: Mapping[int, Sequence],
) -> SavedFrames:
    """Write every picked frame as PNG and replace the project's `clips` and
    `sampled_frames` rows in one transaction. `frames_by_scene` holds frame records with
    frame_index, timestamp_sec, reasons, motion_score, image (RGB) and content_hash."""
    root = project_frames_dir(frames_dir, project)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / LOCK_NAME):
        folder = root / f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        rows = [
            _frame_row(project, scene_index, frame, _write_png(frame.image, folder / frame_relpath(scene_index, frame.frame_index)))
            for scene_index, frames in frames_by_scene.items()
            for frame in frames
        ]
        write_ms = (time.perf_counter() - started) * 1000
        try:
            warehouse.replace_partitions(project, {
                "clips": pd.DataFrame(list(clip_rows), columns=CLIP_COLUMNS),
                "sampled_frames": pd.DataFrame(rows, columns=FRAME_COLUMNS),
            })
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        remove_other_versions(root, keep=folder)
    return SavedFrames(folder, len(rows), write_ms)


def remove_other_versions(root: Path, keep: Path | None) -> list[Path]:
    """Delete every entry of a project's frame folder except `keep` and the lock file:
    earlier versions, and leftovers of runs that died (any name, older layouts too)."""
    removed = []
    for entry in root.iterdir():
        if entry.name == LOCK_NAME or (keep is not None and entry == keep):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _write_png(image_rgb: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise OSError(f"{path}: PNG encoding failed for a {image_rgb.shape} frame")
    path.write_bytes(encoded.tobytes())
    return path


def _frame_row(project: str, scene_index: int, frame, image_path: Path) -> dict:
    return {
        "project": project,
        "scene_index": scene_index,
        "frame_index": frame.frame_index,
        "timestamp_sec": frame.timestamp_sec,
        "reasons": list(frame.reasons),
        "motion_score": frame.motion_score,
        "image_path": str(image_path),
        "width": int(frame.image.shape[1]),
        "height": int(frame.image.shape[0]),
        "content_hash": frame.content_hash,
    }


def sampled_frame_rows(warehouse: Warehouse, project: str) -> pd.DataFrame:
    return warehouse.query(
        "SELECT * FROM sampled_frames WHERE project = ? ORDER BY scene_index, frame_index", [project]
    )


def clip_rows(warehouse: Warehouse, project: str) -> pd.DataFrame:
    return warehouse.query("SELECT * FROM clips WHERE project = ? ORDER BY scene_index", [project])


def frame_image(row) -> np.ndarray | None:
    """RGB pixels of one sampled frame row, exactly as sampled; None when the file is
    missing, unreadable, or no longer holds the pixels the row's content_hash names."""
    path = row.image_path
    if not isinstance(path, str) or not path or not Path(path).is_file():
        return None
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    expected = getattr(row, "content_hash", None)
    if isinstance(expected, str) and expected and pixels_sha256(rgb) != expected:
        return None
    return rgb
