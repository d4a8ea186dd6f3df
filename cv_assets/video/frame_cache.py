"""A small process-wide cache of decoded key frames, bounded by bytes.

`sampled_frames` puts every frame it exports here; `frame_embeddings`, when it runs
in the same process, gets the RGB pixels from here instead of decoding the JPEG
again (which would also embed slightly different, re-compressed pixels). Entries
are keyed by (project, scene, frame) and only returned when the content hash
matches, so a re-sampled clip never serves stale pixels. Least recently used
entries go first once the byte budget is spent. Cached arrays are read-only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

DEFAULT_MAX_BYTES = 512 * 1024 * 1024

_Key = tuple[str, int, int]


class FrameCache:
    """LRU cache of RGB frames, bounded by the total bytes of the arrays it holds."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_Key, tuple[str, np.ndarray]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def put(self, project: str, scene_index: int, frame_index: int, content_hash: str, image: np.ndarray) -> bool:
        """Store a frame; False when it alone is larger than the whole budget."""
        if image.nbytes > self.max_bytes:
            return False
        image = image.view()
        image.flags.writeable = False
        key = (project, int(scene_index), int(frame_index))
        with self._lock:
            self._drop(key)
            self._entries[key] = (content_hash, image)
            self._nbytes += image.nbytes
            while self._nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return True

    def get(self, project: str, scene_index: int, frame_index: int, content_hash: str) -> np.ndarray | None:
        """The cached pixels, or None when absent or cached under another content hash."""
        key = (project, int(scene_index), int(frame_index))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != content_hash:
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def discard_project(self, project: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == project]:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: _Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry[1].nbytes


_cache = FrameCache()


def put(project: str, scene_index: int, frame_index: int, content_hash: str, image: np.ndarray) -> bool:
    return _cache.put(project, scene_index, frame_index, content_hash, image)


def get(project: str, scene_index: int, frame_index: int, content_hash: str) -> np.ndarray | None:
    return _cache.get(project, scene_index, frame_index, content_hash)


def discard_project(project: str) -> None:
    _cache.discard_project(project)


def clear() -> None:
    _cache.clear()


def configure(max_bytes: int) -> None:
    """Change the byte budget (evicting at once if needed)."""
    with _cache._lock:
        _cache.max_bytes = max_bytes
        while _cache._nbytes > max_bytes and _cache._entries:
            _cache._drop(next(iter(_cache._entries)))


def stats() -> dict[str, int]:
    return {"entries": len(_cache), "bytes": _cache.nbytes, "max_bytes": _cache.max_bytes}
