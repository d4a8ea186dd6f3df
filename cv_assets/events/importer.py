"""Import security events from JSON Lines or CSV (for events recorded elsewhere).

One event per line (JSONL) or row (CSV, header line first), with the fields
`id, camera_id, started_at, label, thumbnail_base64 | thumbnail_path`. Every row is
validated on its own: a bad row is reported with its line number and the reason and the
good rows before and after it are kept; an id that already exists (in the database or
earlier in the file) is reported as a duplicate and skipped, never overwritten. An event
whose thumbnail is unusable (missing, not valid base64, outside thumbnails_root) is still
imported — the event happened — with a warning; the backfill then records why it cannot
be embedded. Only a thumbnail over `events.thumbnail_max_bytes` rejects the row, to keep
the database small.

Hostile input is bounded line by line, so memory never grows with the file or with one
line beyond its cap: a line longer than `events.import_max_line_bytes` is skipped unread
(only the cap is held), JSON nested deeper than `events.import_max_depth` is refused
before it is parsed, and fields longer than their column or `events.import_max_field_chars`
are refused. Whatever else goes wrong on one line (a 5,000-digit number, bad UTF-8, a
value of the wrong type) is that line's error, never the import's. Rows are written in
short transactions of `chunk_size`, so an import never holds the database for long.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cv_assets.events.thumbnails import (
    DEFAULT_THUMBNAIL_MAX_PIXELS,
    ThumbnailError,
    base64_text_limit,
    check_thumbnail_pixels,
    decode_base64_thumbnail,
    resolve_thumbnail_path,
)
from cv_assets.store.database import AppDatabase
from cv_assets.store.events import existing_event_ids, insert_events
from cv_assets.text import printable

FIELDS = ("id", "camera_id", "started_at", "label", "thumbnail_base64", "thumbnail_path")
REQUIRED = ("id", "camera_id", "started_at")
TEXT_LIMITS = {"id": 128, "camera_id": 128, "label": 128}  # the column widths in store/models.py
FORMATS = ("jsonl", "csv")
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_DEPTH = 8
DEFAULT_MAX_FIELD_CHARS = 4096
MAX_IGNORED_FIELDS = 50  # unknown field names remembered for the report
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A JSON string (escapes included), unrolled so that a 15 MB base64 value is one fast scan.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_SKIP_BLOCK = 1 << 20


class ImportFormatError(ValueError):
    """The file as a whole cannot be read (unknown format, missing columns, not UTF-8)."""


class RowError(ValueError):
    """One row is invalid; the message is the reason."""


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on one line or row (`events.*`)."""

    thumbnails_root: Path
    thumbnail_max_bytes: int
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS
    thumbnail_max_pixels: int = DEFAULT_THUMBNAIL_MAX_PIXELS

    @classmethod
    def from_settings(cls, settings) -> "ImportLimits":
        events = settings.events
        return cls(Path(settings.storage.thumbnails_root), events.thumbnail_max_bytes, events.import_max_line_bytes,
                   events.import_max_depth, events.import_max_field_chars, events.thumbnail_max_pixels)


@dataclass(frozen=True)
class RowProblem:
    line: int
    event_id: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"line": self.line, "event_id": self.event_id, "reason": self.reason}

    def __str__(self) -> str:
        who = f" (event {printable(self.event_id)})" if self.event_id else ""
        return f"line {self.line}{who}: {printable(self.reason)}"


@dataclass
class ImportReport:
    """What this import did: `imported` and `thumbnail_warnings` count only the rows this
    import inserted (a re-import of the same file reports 0 of each)."""

    path: str
    format: str
    rows_read: int = 0
    imported: int = 0
    duplicates: list[RowProblem] = field(default_factory=list)
    errors: list[RowProblem] = field(default_factory=list)
    thumbnail_warnings: list[RowProblem] = field(default_factory=list)
    ignored_fields: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (f"{self.rows_read} rows, {self.imported} imported, {len(self.duplicates)} duplicates skipped, "
                f"{len(self.errors)} rejected, {len(self.thumbnail_warnings)} with an unusable thumbnail")

    def as_dict(self) -> dict:
        return {
            "path": self.path, "format": self.format, "rows_read": self.rows_read, "imported": self.imported,
            "duplicates": [d.as_dict() for d in self.duplicates], "errors": [e.as_dict() for e in self.errors],
            "thumbnail_warnings": [w.as_dict() for w in self.thumbnail_warnings],
            "ignored_fields": sorted(self.ignored_fields),
        }


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImportFormatError(f"unknown import format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    found = _SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise ImportFormatError(f"{path}: cannot tell the format from the extension; name it .jsonl or .csv, or pass --format")
    return found


def count_lines(path: Path) -> int:
    """Lines in a file (for a progress bar total), read in binary blocks."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


# ---------------------------------------------------------------- reading lines and rows


class BoundedLines:
    """The physical lines of a binary file, each at most `max_bytes` long: the rest of a
    longer line is read in blocks and dropped (never held), and the line becomes a
    problem. Bad UTF-8 is a problem of its line too. Problems wait in `problems` for the
    reader to report them in line order."""

    def __init__(self, handle: BinaryIO, max_bytes: int):
        self.handle = handle
        self.max_bytes = max_bytes
        self.line_no = 0
        self.problems: list[tuple[int, RowError]] = []

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while True:
            raw = self.handle.readline(self.max_bytes + 1)
            if not raw:
                return
            self.line_no += 1
            if len(raw) > self.max_bytes and not raw.endswith(b"\n"):
                skipped = len(raw) + self._skip_rest_of_line()
                self.problems.append((self.line_no, RowError(
                    f"line is {skipped} bytes, longer than events.import_max_line_bytes={self.max_bytes}; "
                    "skipped unread")))
                continue
            try:
                text = raw.decode("utf-8-sig" if self.line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                self.problems.append((self.line_no, RowError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")))
                continue
            yield self.line_no, text

    def _skip_rest_of_line(self) -> int:
        skipped = 0
        while block := self.handle.readline(_SKIP_BLOCK):
            skipped += len(block)
            if block.endswith(b"\n"):
                break
        return skipped

    def take_problems(self) -> list[tuple[int, RowError]]:
        problems, self.problems = self.problems, []
        return problems


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in a JSON text (strings ignored), without parsing it."""
    skeleton = _JSON_STRING.sub(b'""', text.encode("utf-8", "surrogatepass"))
    opening = skeleton.count(b"[") + skeleton.count(b"{")
    if opening <= 1:  # every well-formed event line
        return opening
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = (codes == ord("[")).view(np.int8) + (codes == ord("{")).view(np.int8)
    steps -= (codes == ord("]")).view(np.int8) + (codes == ord("}")).view(np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_json_line(text: str, max_depth: int) -> dict:
    """One JSONL line as a dict, or RowError with the reason (depth checked before parsing)."""
    depth = json_depth(text)
    if depth > max_depth:
        raise RowError(f"JSON nested {depth} levels deep, deeper than events.import_max_depth={max_depth}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError(f"not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}") from None
    except RecursionError:
        raise RowError(f"JSON nested too deeply (events.import_max_depth={max_depth})") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise RowError(f"not usable JSON: {exc}") from None
    if not isinstance(record, dict):
        raise RowError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_records(path: Path, limits: ImportLimits) -> Iterator[tuple[int, dict | RowError]]:
    with open(path, "rb") as handle:
        lines = BoundedLines(handle, limits.max_line_bytes)
        for line_no, text in lines:
            yield from lines.take_problems()
            if not text.strip():
                continue
            try:
                yield line_no, parse_json_line(text, limits.max_depth)
            except RowError as exc:
                yield line_no, exc
        yield from lines.take_problems()


class _CsvLines:
    """Feeds csv.reader from `BoundedLines`, remembering where each record starts."""

    def __init__(self, lines: BoundedLines):
        self.lines = iter(lines)
        self.first_line: int | None = None
        self.last_line = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line_no, text = next(self.lines)
        if self.first_line is None:
            self.first_line = line_no
        self.last_line = line_no
        return text


def _csv_records(path: Path, limits: ImportLimits) -> Iterator[tuple[int, dict | RowError]]:
    # A base64 thumbnail is a single CSV field far above csv's default 128 KiB limit.
    csv.field_size_limit(limits.max_line_bytes)
    with open(path, "rb") as handle:
        lines = BoundedLines(handle, limits.max_line_bytes)
        source = _CsvLines(lines)
        reader = csv.reader(source)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ImportFormatError(f"{path}: malformed CSV header: {exc}") from None
        if lines.problems:
            line_no, problem = lines.problems[0]
            raise ImportFormatError(f"{path}: line {line_no} (before the header) {problem}")
        if header is None:
            return
        columns = [name.strip() for name in header]
        missing = [name for name in REQUIRED if name not in columns]
        if missing:
            raise ImportFormatError(f"{path}: CSV header lacks required column(s): {', '.join(missing)}")
        if "thumbnail_base64" not in columns and "thumbnail_path" not in columns:
            raise ImportFormatError(f"{path}: CSV header needs a thumbnail_base64 or thumbnail_path column")
        while True:
            source.first_line = None
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield from lines.take_problems()
                yield source.last_line, RowError(f"malformed CSV: {exc}")
                continue
            yield from lines.take_problems()
            line_no = source.first_line or source.last_line
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(columns):
                yield line_no, RowError(f"has {len(values)} fields, the header has {len(columns)}")
                continue
            yield line_no, dict(zip(columns, values))
        yield from lines.take_problems()


# ---------------------------------------------------------------- validating one row


def _text(record: dict, name: str, *, required: bool, max_chars: int) -> str | None:
    value = record.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and name != "label":
        if value.bit_length() > 256:  # str() of a huge int is slow and no id is that long
            raise RowError(f"{name} is a number too large to be an id")
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise RowError(f"{name} must be text, got {type(value).__name__}")
    value = value.strip()
    limit = TEXT_LIMITS.get(name)
    if limit and len(value) > limit:
        raise RowError(f"{name} is {len(value)} characters, longer than {limit}")
    if name != "thumbnail_base64" and len(value) > max_chars:
        raise RowError(f"{name} is {len(value)} characters, longer than events.import_max_field_chars={max_chars}")
    if name in TEXT_LIMITS and _CONTROL.search(value):
        raise RowError(f"{name} contains control characters")
    return value


def parse_started_at(value: str) -> datetime:
    """ISO 8601 ('Z' and offsets allowed); stored as naive UTC like every timestamp here."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise RowError(f"started_at {value!r} is not an ISO 8601 date-time (e.g. 2026-11-01T08:15:00)") from None
    if parsed.tzinfo is not None:
        try:
            parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:
            raise RowError(f"started_at {value!r} is out of range in UTC") from None
    return parsed


def validate_record(record: dict, limits: ImportLimits) -> dict:
    """The `events` row for one record, or RowError naming the reason."""
    def text(name: str, required: bool = False) -> str | None:
        return _text(record, name, required=required, max_chars=limits.max_field_chars)

    row = {
        "id": text("id", required=True),
        "camera_id": text("camera_id", required=True),
        "started_at": parse_started_at(text("started_at", required=True)),
        "label": text("label"),
        "thumbnail_base64": text("thumbnail_base64"),
        "thumbnail_path": text("thumbnail_path"),
    }
    if row["thumbnail_base64"] and row["thumbnail_path"]:
        raise RowError("give thumbnail_base64 or thumbnail_path, not both")
    if row["thumbnail_base64"] and len(row["thumbnail_base64"]) > base64_text_limit(limits.thumbnail_max_bytes):
        raise RowError(
            f"thumbnail_base64 is longer than events.thumbnail_max_bytes={limits.thumbnail_max_bytes} allows")
    return row


def thumbnail_problem(row: dict, limits: ImportLimits) -> str | None:
    """Why the event's thumbnail cannot be embedded as it stands, or None."""
    try:
        if row["thumbnail_base64"]:
            data = decode_base64_thumbnail(row["thumbnail_base64"], event_id=row["id"],
                                           max_bytes=limits.thumbnail_max_bytes)
            check_thumbnail_pixels(data, event_id=row["id"], max_pixels=limits.thumbnail_max_pixels)
        elif row["thumbnail_path"]:
            # Containment is checked now; the file itself may arrive later (its absence is
            # an embedding failure, recorded and retried, not an import error).
            resolve_thumbnail_path(row["thumbnail_path"], event_id=row["id"], root=limits.thumbnails_root)
        else:
            return "has no thumbnail (neither thumbnail_base64 nor thumbnail_path)"
    except ThumbnailError as exc:
        return exc.reason
    return None


# ---------------------------------------------------------------- the import


@dataclass
class _Pending:
    line: int
    row: dict
    thumbnail_problem: str | None


def import_events(
    db: AppDatabase,
    path: str | Path,
    *,
    thumbnails_root: Path,
    thumbnail_max_bytes: int,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS,
    thumbnail_max_pixels: int = DEFAULT_THUMBNAIL_MAX_PIXELS,
    fmt: str | None = None,
    chunk_size: int = 500,
    on_progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Validate and insert the events of a JSONL/CSV file; see the module doc for the rules.
    `on_progress(line_number)` is called after each row."""
    limits = ImportLimits(Path(thumbnails_root), thumbnail_max_bytes, max_line_bytes, max_depth, max_field_chars,
                          thumbnail_max_pixels)
    path = Path(path)
    if not path.is_file():
        raise ImportFormatError(f"{path}: no such file")
    fmt = detect_format(path, fmt)
    report = ImportReport(str(path), fmt)
    records = _jsonl_records(path, limits) if fmt == "jsonl" else _csv_records(path, limits)
    first_line: dict[str, int] = {}
    pending: list[_Pending] = []
    for line_no, record in records:
        report.rows_read += 1
        try:
            checked = _check_record(record, line_no, report, first_line, limits)
        except Exception as exc:  # noqa: BLE001 - one line's surprise is that line's error, never the import's
            report.errors.append(RowProblem(line_no, None, f"cannot be read: {type(exc).__name__}: {exc}"[:500]))
            checked = None
        if checked is not None:
            pending.append(checked)
        if len(pending) >= chunk_size:
            _insert_chunk(db, pending, report)
            pending = []
        if on_progress is not None:
            on_progress(line_no)
    if pending:
        _insert_chunk(db, pending, report)
    return report


def _check_record(record, line_no: int, report: ImportReport, first_line: dict[str, int],
                  limits: ImportLimits) -> _Pending | None:
    if isinstance(record, RowError):
        report.errors.append(RowProblem(line_no, None, str(record)))
        return None
    for key in record:
        if key not in FIELDS and len(report.ignored_fields) < MAX_IGNORED_FIELDS:
            report.ignored_fields.add(printable(key[:64]))
    raw_id = record.get("id")
    try:
        row = validate_record(record, limits)
    except RowError as exc:
        known_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= TEXT_LIMITS["id"] else None
        report.errors.append(RowProblem(line_no, known_id, str(exc)))
        return None
    if row["id"] in first_line:
        report.duplicates.append(RowProblem(line_no, row["id"], f"repeats the id of line {first_line[row['id']]}; skipped"))
        return None
    first_line[row["id"]] = line_no
    return _Pending(line_no, row, thumbnail_problem(row, limits))


def _insert_chunk(db: AppDatabase, pending: list[_Pending], report: ImportReport) -> None:
    """Insert the rows whose id is new; only those count as imported, and only their
    thumbnail warnings are reported."""
    with db.write() as session:
        existing = existing_event_ids(session, [p.row["id"] for p in pending])
        fresh = [p for p in pending if p.row["id"] not in existing]
        insert_events(session, [p.row for p in fresh])
    for p in pending:
        if p.row["id"] in existing:
            report.duplicates.append(RowProblem(p.line, p.row["id"], "an event with this id already exists; skipped"))
        elif p.thumbnail_problem:
            report.thumbnail_warnings.append(RowProblem(p.line, p.row["id"], p.thumbnail_problem))
    report.imported += len(fresh)


def import_events_file(db: AppDatabase, path: str | Path, settings, *, fmt: str | None = None,
                       on_progress: Callable[[int], None] | None = None) -> ImportReport:
    """`import_events` with the limits and thumbnails root of a `Settings`."""
    limits = ImportLimits.from_settings(settings)
    return import_events(
        db, path, thumbnails_root=limits.thumbnails_root, thumbnail_max_bytes=limits.thumbnail_max_bytes,
        max_line_bytes=limits.max_line_bytes, max_depth=limits.max_depth, max_field_chars=limits.max_field_chars,
        thumbnail_max_pixels=limits.thumbnail_max_pixels, fmt=fmt, on_progress=on_progress,
    )
