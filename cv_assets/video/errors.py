"""The one error type for clips that cannot be used: it names the file and the reason."""

from __future__ import annotations

from pathlib import Path


class VideoInputError(ValueError):
    """A clip was rejected or could not be decoded. `str(err)` is "<path>: <reason>"."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
