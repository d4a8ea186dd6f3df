"""Cross-process locks on lock files (fcntl). The OS drops them when a process dies,
so a crashed run never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# flock locks belong to the open file description, so two threads of one process
# would share it; this per-path thread lock serialises them first.
_thread_locks: dict[str, threading.RLock] = {}
_guard = threading.Lock()


def _thread_lock(path: str) -> threading.RLock:
    with _guard:
        return _thread_locks.setdefault(path, threading.RLock())


@contextmanager
def file_lock(path: Path | None, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or shared) lock on `path` for the duration of the block."""
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(str(path)):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
