"""Import security events from JSON Lines or CSV (for events recorded elsewhere).

One event per line (JSONL) or row (CSV, header line first), with the fields
`id, camera_id, started_at, label, thumbnail_base64 | thumbnail_path`. Every row is
validated on its own: a bad row is reported with its line number and the reason and the
good rows are kept; an id that already exists (in the database or earlier in the file)
is reported as a duplicate and skipped, never overwritten. An event whose thumbnail is
unusable (missing, not valid base64, outside thumbnails_root) is still imported — the
event happened — with a warning; the backfill then records why it cannot be embedded.
Only a thumbnail over `events.thumbnail_max_bytes` rejects the row, to keep the database small. Rows are written in short
transactions of `chunk_size`, so an import never holds the database for long.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import insert, select

from cv_assets.events.backfill import EVENTS
from cv_assets.events.thumbnails import ThumbnailError, base64_text_limit, decode_base64_thumbnail, resolve_thumbnail_path
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import utcnow

FIELDS = ("id", "camera_id", "started_at", "label", "thumbnail_base64", "thumbnail_path")
REQUIRED = ("id", "camera_id", "started_at")
TEXT_LIMITS = {"id": 128, "camera_id": 128, "label": 128}  # the column widths in store/models.py
FORMATS = ("jsonl", "csv")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ImportFormatError(ValueError):
    """The file as a whole cannot be read (unknown format, missing columns, not UTF-8)."""


class RowError(ValueError):
    """One row is invalid; the message is the reason."""


@dataclass(frozen=True)
class RowProblem:
    line: int
    event_id: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"line": self.line, "event_id": self.event_id, "reason": self.reason}

    def __str__(self) -> str:
        who = f" (event {self.event_id})" if self.event_id else ""
        return f"line {self.line}{who}: {self.reason}"


@dataclass
class ImportReport:
    path: str
    format: str
    rows_read: int = 0
    imported: int = 0
    duplicates: list[RowProblem] = field(default_factory=list)
    errors: list[RowProblem] = field(default_factory=list)
    thumbnail_warnings: list[RowProblem] = field(default_factory=list)
    ignored_fields: set[str] = field(default_factory=set)

    def summary(self) -> str:
        text = (f"{self.rows_read} rows, {self.imported} imported, {len(self.duplicates)} duplicates skipped, "
                f"{len(self.errors)} rejected")
        if self.thumbnail_warnings:
            text += f"; {len(self.thumbnail_warnings)} imported with an unusable thumbnail"
        return text

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


# ---------------------------------------------------------------- reading rows


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | RowError]]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, RowError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, RowError(f"not valid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(record, dict):
                yield line_no, RowError(f"expected a JSON object, got {type(record).__name__}")
                continue
            yield line_no, record


def _csv_records(path: Path, max_bytes: int) -> Iterator[tuple[int, dict | RowError]]:
    # A base64 thumbnail is a single CSV field far above csv's default 128 KiB limit.
    csv.field_size_limit(max(csv.field_size_limit(), base64_text_limit(max_bytes) + 1024))
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = [name.strip() for name in header]
            missing = [name for name in REQUIRED if name not in columns]
            if missing:
                raise ImportFormatError(f"{path}: CSV header lacks required column(s): {', '.join(missing)}")
            if "thumbnail_base64" not in columns and "thumbnail_path" not in columns:
                raise ImportFormatError(f"{path}: CSV header needs a thumbnail_base64 or thumbnail_path column")
            start = reader.line_num + 1
            for values in reader:
                line_no, start = start, reader.line_num + 1
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(columns):
                    yield line_no, RowError(f"has {len(values)} fields, the header has {len(columns)}")
                    continue
                yield line_no, dict(zip(columns, values))
        except UnicodeDecodeError as exc:
            raise ImportFormatError(f"{path}: not UTF-8 text near line {reader.line_num + 1} ({exc.reason})") from None
        except csv.Error as exc:
            raise ImportFormatError(f"{path}: malformed CSV at line {reader.line_num}: {exc}") from None


# ---------------------------------------------------------------- validating one row


def _text(record: dict, name: str, *, required: bool) -> str | None:
    value = record.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and name != "label":
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
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def validate_record(record: dict, *, thumbnails_root: Path, thumbnail_max_bytes: int) -> dict:
    """The `events` row for one record, or RowError naming the reason."""
    event_id = _text(record, "id", required=True)
    row = {
        "id": event_id,
        "camera_id": _text(record, "camera_id", required=True),
        "started_at": parse_started_at(_text(record, "started_at", required=True)),
        "label": _text(record, "label", required=False),
        "thumbnail_base64": _text(record, "thumbnail_base64", required=False),
        "thumbnail_path": _text(record, "thumbnail_path", required=False),
    }
    if row["thumbnail_base64"] and row["thumbnail_path"]:
        raise RowError("give thumbnail_base64 or thumbnail_path, not both")
    if row["thumbnail_base64"] and len(row["thumbnail_base64"]) > base64_text_limit(thumbnail_max_bytes):
        raise RowError(f"thumbnail_base64 is longer than events.thumbnail_max_bytes={thumbnail_max_bytes} allows")
    return row


def thumbnail_problem(row: dict, *, thumbnails_root: Path, thumbnail_max_bytes: int) -> str | None:
    """Why the event's thumbnail cannot be embedded as it stands, or None."""
    try:
        if row["thumbnail_base64"]:
            decode_base64_thumbnail(row["thumbnail_base64"], event_id=row["id"], max_bytes=thumbnail_max_bytes)
        elif row["thumbnail_path"]:
            # Containment is checked now; the file itself may arrive later (its absence is
            # an embedding failure, recorded and retried, not an import error).
            resolve_thumbnail_path(row["thumbnail_path"], event_id=row["id"], root=thumbnails_root)
        else:
            return "has no thumbnail (neither thumbnail_base64 nor thumbnail_path)"
    except ThumbnailError as exc:
        return exc.reason
    return None


# ---------------------------------------------------------------- the import


def import_events(
    db: AppDatabase,
    path: str | Path,
    *,
    thumbnails_root: Path,
    thumbnail_max_bytes: int,
    fmt: str | None = None,
    chunk_size: int = 500,
    on_progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Validate and insert the events of a JSONL/CSV file; see the module doc for the rules.
    `on_progress(line_number)` is called after each row."""
    path = Path(path)
    if not path.is_file():
        raise ImportFormatError(f"{path}: no such file")
    fmt = detect_format(path, fmt)
    report = ImportReport(str(path), fmt)
    records = _jsonl_records(path) if fmt == "jsonl" else _csv_records(path, thumbnail_max_bytes)
    first_line: dict[str, int] = {}
    pending: list[tuple[int, dict]] = []
    for line_no, record in records:
        report.rows_read += 1
        _check_record(record, line_no, report, first_line, pending, thumbnails_root, thumbnail_max_bytes)
        if len(pending) >= chunk_size:
            _insert_chunk(db, pending, report)
            pending = []
        if on_progress is not None:
            on_progress(line_no)
    if pending:
        _insert_chunk(db, pending, report)
    return report


def _check_record(record, line_no, report, first_line, pending, thumbnails_root, thumbnail_max_bytes) -> None:
    if isinstance(record, RowError):
        report.errors.append(RowProblem(line_no, None, str(record)))
        return
    report.ignored_fields.update(key for key in record if key not in FIELDS)
    raw_id = record.get("id")
    try:
        row = validate_record(record, thumbnails_root=thumbnails_root, thumbnail_max_bytes=thumbnail_max_bytes)
    except RowError as exc:
        report.errors.append(RowProblem(line_no, raw_id if isinstance(raw_id, str) else None, str(exc)))
        return
    if row["id"] in first_line:
        report.duplicates.append(RowProblem(line_no, row["id"], f"repeats the id of line {first_line[row['id']]}; skipped"))
        return
    problem = thumbnail_problem(row, thumbnails_root=thumbnails_root, thumbnail_max_bytes=thumbnail_max_bytes)
    if problem:
        report.thumbnail_warnings.append(RowProblem(line_no, row["id"], problem))
    first_line[row["id"]] = line_no
    pending.append((line_no, row))


def _insert_chunk(db: AppDatabase, pending: list[tuple[int, dict]], report: ImportReport) -> None:
    now = utcnow()
    with db.write() as session:
        ids = [row["id"] for _, row in pending]
        existing = set(session.execute(select(EVENTS.c.id).where(EVENTS.c.id.in_(ids))).scalars())
        fresh = []
        for line_no, row in pending:
            if row["id"] in existing:
                report.duplicates.append(RowProblem(line_no, row["id"], "an event with this id already exists; skipped"))
            else:
                fresh.append({**row, "created_at": now})
        if fresh:
            session.execute(insert(EVENTS), fresh)
    report.imported += len(fresh)


def import_events_file(db: AppDatabase, path: str | Path, settings, *, fmt: str | None = None,
                       on_progress: Callable[[int], None] | None = None) -> ImportReport:
    """`import_events` with the limits and thumbnails root of a `Settings`."""
    return import_events(
        db, path, thumbnails_root=settings.storage.thumbnails_root,
        thumbnail_max_bytes=settings.events.thumbnail_max_bytes, fmt=fmt, on_progress=on_progress,
    )
