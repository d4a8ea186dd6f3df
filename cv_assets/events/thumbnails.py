"""Event thumbnails: base64 text or a file under `storage.thumbnails_root`, turned into
encoded image bytes for the embedder (which decodes them with its hardened loader).

Everything here refuses rather than guesses: base64 is decoded with validation (a stray
character is an error, never silently dropped), sizes are checked before any decoding,
a file path must resolve to a regular file inside the thumbnails root, and the pixel
count declared in the image header is checked against `events.thumbnail_max_pixels`
before a pixel is decoded (a 250 KB PNG can declare 64 million pixels). Every error
names the event and the reason.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

_DATA_URL_PREFIX = re.compile(r"^\s*data:([^;,]*)(;[^,]*)?,", re.IGNORECASE)
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
# Base64 sent by mail-style encoders breaks lines every 76 characters (CRLF); allow for
# that and a short data-URL prefix before refusing text as too long without reading it.
_LINE_BREAK_ALLOWANCE = 78 / 76
_PREFIX_ALLOWANCE = 256
# 16 Mpx (4096 x 4096): a camera thumbnail is far smaller, and CLIP looks at 224 x 224.
DEFAULT_THUMBNAIL_MAX_PIXELS = 16_000_000


class ThumbnailError(ValueError):
    """A thumbnail that cannot be used; the message names the event and the reason."""

    def __init__(self, event_id: str, reason: str):
        self.event_id = event_id
        self.reason = reason
        super().__init__(f"event {event_id}: {reason}")


def base64_text_limit(max_bytes: int) -> int:
    """Longest base64 text (prefix and line breaks included) that may decode to `max_bytes`."""
    encoded = (max_bytes + 2) // 3 * 4
    return int(encoded * _LINE_BREAK_ALLOWANCE) + _PREFIX_ALLOWANCE


def decode_base64_thumbnail(text: str, *, event_id: str, max_bytes: int) -> bytes:
    """Decode a base64 thumbnail: data-URL prefix, whitespace, URL-safe alphabet and missing
    padding are accepted; anything else that is not base64 is an error."""
    if not isinstance(text, str):
        raise ThumbnailError(event_id, f"thumbnail_base64 must be text, got {type(text).__name__}")
    limit = base64_text_limit(max_bytes)
    if len(text) > limit:
        raise ThumbnailError(
            event_id,
            f"thumbnail_base64 is {len(text)} characters, more than the {limit} that "
            f"events.thumbnail_max_bytes={max_bytes} allows; refused before decoding",
        )
    body = _strip_data_url(text, event_id)
    body = "".join(body.split()).translate(_URLSAFE_TO_STANDARD).rstrip("=")
    if not body:
        raise ThumbnailError(event_id, "thumbnail_base64 is empty")
    if len(body) % 4 == 1:
        # No amount of padding makes 4k+1 characters valid: the text was cut short.
        raise ThumbnailError(event_id, f"thumbnail_base64 has an impossible length ({len(body)} characters): truncated?")
    decoded_size = len(body) * 3 // 4
    if decoded_size > max_bytes:
        raise ThumbnailError(
            event_id,
            f"thumbnail_base64 decodes to {decoded_size} bytes, over events.thumbnail_max_bytes={max_bytes}",
        )
    body += "=" * (-len(body) % 4)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ThumbnailError(event_id, f"thumbnail_base64 is not valid base64: {exc}") from None


def _strip_data_url(text: str, event_id: str) -> str:
    match = _DATA_URL_PREFIX.match(text)
    if not match:
        return text
    media_type, params = match.group(1).strip().lower(), (match.group(2) or "").lower()
    if media_type and not media_type.startswith("image/"):
        raise ThumbnailError(event_id, f"thumbnail_base64 is a data URL of type {media_type!r}, not an image")
    if "base64" not in params.split(";"):
        raise ThumbnailError(event_id, "thumbnail_base64 is a data URL without ';base64'")
    return text[match.end():]


def resolve_thumbnail_path(raw: str, *, event_id: str, root: Path) -> Path:
    """The real path of a thumbnail file, which must lie inside `root` (symlinks resolved)."""
    if not isinstance(raw, str) or not raw.strip():
        raise ThumbnailError(event_id, "thumbnail_path is empty")
    if "\x00" in raw:
        raise ThumbnailError(event_id, "thumbnail_path contains a NUL character")
    given = Path(raw.strip())
    if ".." in given.parts:
        raise ThumbnailError(event_id, f"thumbnail_path {raw!r} must not contain '..'")
    real_root = Path(root).resolve()
    candidate = given if given.is_absolute() else real_root / given
    real = candidate.resolve(strict=False)
    if not real.is_relative_to(real_root) or real == real_root:
        raise ThumbnailError(event_id, f"thumbnail_path {raw!r} resolves outside storage.thumbnails_root ({real_root})")
    return real


def read_thumbnail_file(raw: str, *, event_id: str, root: Path, max_bytes: int) -> bytes:
    """Read a thumbnail file under `root`: regular files only, never opening a FIFO or device."""
    path = resolve_thumbnail_path(raw, event_id=event_id, root=root)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ThumbnailError(event_id, f"thumbnail file not found: {path}") from None
    except OSError as exc:
        raise ThumbnailError(event_id, f"thumbnail file {path} cannot be read: {exc.strerror}") from None
    _require_regular(info, path, event_id, max_bytes)
    # O_NOFOLLOW/O_NONBLOCK: if the file is swapped for a symlink or FIFO after the checks
    # above, opening fails or returns at once instead of escaping the root or hanging.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ThumbnailError(event_id, f"thumbnail file {path} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise ThumbnailError(event_id, f"thumbnail file {path} changed while it was being opened")
        _require_regular(opened, path, event_id, max_bytes)
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ThumbnailError(event_id, f"thumbnail file {path} grew past events.thumbnail_max_bytes={max_bytes}")
    return data


def _require_regular(info: os.stat_result, path: Path, event_id: str, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ThumbnailError(event_id, f"thumbnail_path {path} is not a regular file ({_file_kind(info.st_mode)})")
    if info.st_size == 0:
        raise ThumbnailError(event_id, f"thumbnail file {path} is empty")
    if info.st_size > max_bytes:
        raise ThumbnailError(
            event_id, f"thumbnail file {path} is {info.st_size} bytes, over events.thumbnail_max_bytes={max_bytes}"
        )


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def load_thumbnail_bytes(
    event_id: str,
    thumbnail_base64: str | None,
    thumbnail_path: str | None,
    *,
    root: Path,
    max_bytes: int,
) -> bytes:
    """Encoded image bytes of an event's thumbnail. Inline base64 wins when both are set:
    it travels with the event, while a file may have been moved since."""
    if thumbnail_base64 is not None and thumbnail_base64.strip():
        return decode_base64_thumbnail(thumbnail_base64, event_id=event_id, max_bytes=max_bytes)
    if thumbnail_path is not None and thumbnail_path.strip():
        return read_thumbnail_file(thumbnail_path, event_id=event_id, root=root, max_bytes=max_bytes)
    raise ThumbnailError(event_id, "has no thumbnail (neither thumbnail_base64 nor thumbnail_path is set)")


def check_thumbnail_pixels(data: bytes, *, event_id: str, max_pixels: int) -> None:
    """Refuse a thumbnail whose header declares more than `max_pixels` pixels, reading the
    header only. Bytes Pillow cannot identify pass: the embedder's decoder reports them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        # Pillow's own ceiling (twice Image.MAX_IMAGE_PIXELS) is far above ours.
        raise ThumbnailError(event_id, _bomb_reason(None, max_pixels)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return
    if width * height > max_pixels:
        raise ThumbnailError(event_id, _bomb_reason((width, height), max_pixels))


def _bomb_reason(size: tuple[int, int] | None, max_pixels: int) -> str:
    declared = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else f"more than {max_pixels} pixels"
    return (f"thumbnail rejected as a decompression bomb: its header declares {declared}, over the limit of "
            f"events.thumbnail_max_pixels={max_pixels}; refused before decoding")
