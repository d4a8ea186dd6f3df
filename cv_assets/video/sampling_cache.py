"""Hands a clip's SamplingResult from `video_clips` to `sampled_frames` within one process.

Both assets need the same decode pass; when they run in one process the second one
takes the result from here instead of decoding again. The key includes the file's
identity (path, size, mtime, inode) and every setting that affects sampling, so a
changed clip or config always misses. Bounded by the bytes of the frames it holds.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Hashable

from cv_assets.settings import CvAnalysisSettings, SamplingSettings
from cv_assets.video.sampler import SamplingResult

DEFAULT_MAX_BYTES = 512 * 1024 * 1024

_entries: OrderedDict[Hashable, SamplingResult] = OrderedDict()
_nbytes = 0
_lock = threading.Lock()
max_bytes = DEFAULT_MAX_BYTES


def sampling_key(
    project: str,
    scene_index: int,
    clip_path: str,
    project_root: str | os.PathLike | None,
    sampling: SamplingSettings,
    cv: CvAnalysisSettings,
) -> Hashable:
    """Identity of one sampling run: the file as it is now plus the settings used."""
    path = Path(clip_path)
    if project_root is not None and not path.is_absolute():
        path = Path(project_root) / path
    try:
        info = os.stat(path)
        identity = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)
    except OSError:
        identity = None
    return (
        project,
        int(scene_index),
        clip_path,
        str(project_root),
        identity,
        sampling.model_dump_json(),
        cv.model_dump_json(),
    )


def remember(key: Hashable, result: SamplingResult) -> None:
    global _nbytes
    size = result.nbytes
    if size > max_bytes:
        return
    with _lock:
        _pop(key)
        _entries[key] = result
        _nbytes += size
        while _nbytes > max_bytes:
            _pop(next(iter(_entries)))


def peek(key: Hashable) -> SamplingResult | None:
    """The remembered result, left in the cache."""
    with _lock:
        result = _entries.get(key)
        if result is not None:
            _entries.move_to_end(key)
        return result


def take(key: Hashable) -> SamplingResult | None:
    """The remembered result (removed from the cache: it is handed over once)."""
    with _lock:
        return _pop(key)


def clear() -> None:
    global _nbytes
    with _lock:
        _entries.clear()
        _nbytes = 0


def entries() -> int:
    return len(_entries)


def _pop(key: Hashable) -> SamplingResult | None:
    global _nbytes
    result = _entries.pop(key, None)
    if result is not None:
        _nbytes -= result.nbytes
    return result
