"""A deterministic pause point for crash tests.

`pause_point(name)` does nothing unless the environment variable CV_ASSETS_PAUSE_AT
equals `name`; then it creates the file named by CV_ASSETS_PAUSE_MARKER (so a test
knows the process reached that point, mid-transaction) and sleeps until the test
kills the process, or gives up after CV_ASSETS_PAUSE_MAX_SEC (default 120).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    if os.environ.get("CV_ASSETS_PAUSE_AT") != name:
        return
    marker = os.environ.get("CV_ASSETS_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get("CV_ASSETS_PAUSE_MAX_SEC", "120"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
