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
# Paths this thread holds: taking one again would flock a second descriptor of the
# same process against the first and wait forever, so it is refused instead.
_held = threading.local()


class LockReentryError(RuntimeError):
    """The calling thread already holds this lock (a nested use would deadlock)."""


def _thread_lock(path: str) -> threading.RLock:
    with _guard:
        return _thread_locks.setdefault(path, threading.RLock())


def held_by_this_thread(path: Path) -> bool:
    """Whether the calling thread is inside `file_lock(path)`."""
    return str(Path(path).resolve()) in _held.__dict__.get("paths", ())


@contextmanager
def file_lock(path: Path | None, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or shared) lock on `path` for the duration of the block."""
    if path is None:
        yield
        return
    path = Path(path)
    key = str(path.resolve())
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:
        raise LockReentryError(f"{path} is already locked by this thread; nested use would deadlock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(key):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        held.add(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            held.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
