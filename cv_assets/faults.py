"""Deterministic fault points for crash and retry tests.

`pause_point(name)` marks a spot inside a write (between DELETE and INSERT of one
transaction). It does nothing in normal use. Two ways to make it act:

- across processes, by environment: when CV_ASSETS_PAUSE_AT equals `name`, it creates
  the file named by CV_ASSETS_PAUSE_MARKER (holding the pid, so a test knows the process
  is mid-transaction) and sleeps until the test kills the process, or gives up after
  CV_ASSETS_PAUSE_MAX_SEC (default 120) and lets the write finish;
- in this process, by `fail_next(name, error)`: the next pass through the point raises
  `error` (a transient store error at an exact spot, for retry tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

PAUSE_AT_ENV = "CV_ASSETS_PAUSE_AT"
PAUSE_MARKER_ENV = "CV_ASSETS_PAUSE_MARKER"
PAUSE_MAX_SEC_ENV = "CV_ASSETS_PAUSE_MAX_SEC"

_planned: defaultdict[str, deque[BaseException]] = defaultdict(deque)
_planned_guard = threading.Lock()


def pause_point(name: str) -> None:
    """Raise a planned failure for `name`, or pause here when the environment asks to."""
    _raise_planned(name)
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        # Written to a temp name and renamed, so a reader never sees an empty marker.
        tmp = Path(marker).with_name(Path(marker).name + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(marker)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_MAX_SEC_ENV, "120"))
    while time.monotonic() < deadline:
        time.sleep(0.05)


def fail_next(name: str, *errors: BaseException) -> None:
    """In this process, make the next passes through `pause_point(name)` raise `errors`,
    one each, in order (then the point is harmless again)."""
    with _planned_guard:
        _planned[name].extend(errors)


def planned_failures(name: str) -> int:
    """How many planned failures for `name` have not fired yet."""
    with _planned_guard:
        return len(_planned.get(name, ()))


def clear_planned_failures() -> None:
    with _planned_guard:
        _planned.clear()


def _raise_planned(name: str) -> None:
    if not _planned:  # the common case: no test planned anything
        return
    with _planned_guard:
        queue = _planned.get(name)
        error = queue.popleft() if queue else None
    if error is not None:
        raise error
