"""Faults injected into store writes by the tests; nothing in the package knows of them.

A fault point names a table:
- `duckdb:<table>` fires inside the DuckDB transaction that replaces a project's rows of
  `<table>`, after its DELETE and before its INSERT;
- `sqlite:<table>` fires inside a SQLite transaction, right before an INSERT into `<table>`
  (after the DELETE of the rows it replaces).

In this process, `fail_next(point, *errors)` makes the next passes raise those errors (a
transient store error at an exact spot). In a child process, `pause_from_environment()`
pauses at `$TEST_PAUSE_AT`: it writes its pid to `$TEST_PAUSE_MARKER` and sleeps until the
test kills it (a crash mid-transaction), or `$TEST_PAUSE_MAX_SEC` passes.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine

from cv_assets.store.warehouse import Warehouse

PAUSE_AT_ENV = "TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "TEST_PAUSE_MARKER"
PAUSE_MAX_SEC_ENV = "TEST_PAUSE_MAX_SEC"

_planned: defaultdict[str, deque[BaseException]] = defaultdict(deque)
_installed = False


def fail_next(point: str, *errors: BaseException) -> None:
    install()
    _planned[point].extend(errors)


def planned_failures(point: str) -> int:
    return len(_planned.get(point, ()))


def clear() -> None:
    _planned.clear()


def pause_from_environment() -> None:
    if os.environ.get(PAUSE_AT_ENV):
        install()


def install() -> None:
    """Hook both stores' write paths once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    insert = Warehouse._insert

    def insert_with_faults(con, table, rows):
        _fire(f"duckdb:{table}")
        return insert(con, table, rows)

    Warehouse._insert = staticmethod(insert_with_faults)

    @event.listens_for(Engine, "before_cursor_execute")
    def before_insert(conn, cursor, statement, parameters, context, executemany):
        words = statement.split(None, 3)
        if len(words) > 2 and words[0].upper() == "INSERT" and words[1].upper() == "INTO":
            _fire(f"sqlite:{words[2].strip(chr(34))}")


def _fire(point: str) -> None:
    queue = _planned.get(point)
    if queue:
        raise queue.popleft()
    if os.environ.get(PAUSE_AT_ENV) != point:
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
