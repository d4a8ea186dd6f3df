"""Checks a clip path before FFmpeg ever sees it.

FFmpeg treats its "filename" as more than a file: `http://...`, `concat:a|b`,
`pipe:0` are protocols and `img%03d.png` is an image-sequence pattern. Opening a
FIFO blocks forever and a device file never ends. So every path is checked here
first: it must be a plain local path that resolves to a regular, non-empty file
(inside the project folder when one is given), not larger than the configured limit.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from cv_assets.video.errors import VideoInputError

# "http://x", "concat:a|b", "pipe:0", "file:x" ... (a scheme of two or more letters then ':').
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
# printf-style sequence patterns understood by FFmpeg's image2 demuxer: %d, %03d.
_PRINTF_PATTERN = re.compile(r"%0?\d*d")


def validate_clip_path(
    path: str | os.PathLike,
    *,
    project_root: str | os.PathLike | None = None,
    max_file_bytes: int | None = None,
) -> Path:
    """Return the resolved path of a usable clip, or raise VideoInputError saying why not.

    Relative paths are taken relative to `project_root` (or the working directory).
    Symlinks are followed, and the target must stay inside `project_root`.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise VideoInputError(repr(path), "path must be text, not bytes")
    if not text.strip():
        raise VideoInputError(repr(text), "empty path")
    if _PROTOCOL.match(text):
        raise VideoInputError(text, "looks like a URL or FFmpeg protocol, not a local file path; download it first")
    if _PRINTF_PATTERN.search(Path(text).name):
        raise VideoInputError(text, "contains a printf pattern (e.g. %03d) that FFmpeg would expand into an image sequence")
    if "\x00" in text:
        raise VideoInputError(repr(text), "path contains a NUL byte")

    root = Path(project_root).resolve() if project_root is not None else None
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = (root or Path.cwd()) / candidate
    resolved = candidate.resolve()
    if root is not None and not resolved.is_relative_to(root):
        raise VideoInputError(text, f"resolves to {resolved}, outside the project folder {root}")
    try:
        info = os.stat(resolved)
    except FileNotFoundError:
        raise VideoInputError(text, "no such file") from None
    except OSError as exc:
        raise VideoInputError(text, f"cannot stat: {exc.strerror}") from None
    _check_file_type(text, info.st_mode)
    if info.st_size == 0:
        raise VideoInputError(text, "empty file (0 bytes)")
    if max_file_bytes is not None and info.st_size > max_file_bytes:
        raise VideoInputError(
            text, f"file is {info.st_size} bytes, above the limit sampling.max_file_bytes={max_file_bytes}"
        )
    if not os.access(resolved, os.R_OK):
        raise VideoInputError(text, "not readable (permission denied)")
    return resolved


def _check_file_type(text: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device file"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "not a regular file"
    raise VideoInputError(text, f"is {kind}, not a video file")
