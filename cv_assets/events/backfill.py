"""Security-event embeddings: which events still need a vector, embedding one batch,
failure bookkeeping with a retry cap, and the per-event status.

The rules the rest of the system relies on:
- an event is never changed, blocked or lost because its thumbnail is bad: the failure is
  recorded in `embedding_failures` (reason + attempts) and the batch goes on;
- an event that failed `max_attempts` times for a model version is given up for that
  version, so a backfill in `missing` mode always terminates;
- every `event_embeddings` row carries its model_version and is replaced (never updated
  in place) with a fresh, larger row id, so readers that cache vectors can pick up new
  and changed rows by id alone (see `analysis/similarity.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from cv_assets.events.thumbnails import ThumbnailError, load_thumbnail_bytes
from cv_assets.store.database import AppDatabase
from cv_assets.store.models import EmbeddingFailure, Event, EventEmbedding, utcnow

HARD_MAX_BATCH = 100  # inherited contract: never more than 100 events per embedding request
MODES = ("missing", "all")
EVENT_ITEM_KIND = "event"

EVENTS = Event.__table__
EMBEDDINGS = EventEmbedding.__table__
FAILURES = EmbeddingFailure.__table__


class BatchSizeError(ValueError):
    """A batch size over the configured limit (or below 1)."""


class EventNotFoundError(LookupError):
    """No event with that id."""

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(f"event {event_id!r} not found")


# ---------------------------------------------------------------- vectors as JSON text


def vector_to_json(vector: np.ndarray) -> str:
    """A JSON float array that round-trips float32 exactly ('%.9g') and is ~40% shorter
    than json.dumps of the float64 values."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError("embedding contains NaN or infinity")
    return "[" + ",".join(map("%.9g".__mod__, values.tolist())) + "]"


def vector_from_json(text: str) -> np.ndarray:
    return np.asarray(json.loads(text), dtype=np.float32)


# ---------------------------------------------------------------- batch size and selection


def resolve_batch_size(requested: int | None, max_batch: int) -> int:
    """The batch size to use: the request, or the configured maximum; never over it."""
    limit = min(int(max_batch), HARD_MAX_BATCH)
    if requested is None:
        return limit
    if requested < 1:
        raise BatchSizeError(f"batch_size must be at least 1, got {requested}")
    if requested > limit:
        raise BatchSizeError(
            f"batch_size {requested} is over the limit of {limit} events per batch "
            f"(events.max_batch={max_batch}, ceiling {HARD_MAX_BATCH}); use {limit} or less"
        )
    return int(requested)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _embedded_ids(model_version: str):
    # event_id sits before the JSON column in the row, so this never reads overflow pages.
    return select(EMBEDDINGS.c.event_id).where(EMBEDDINGS.c.model_version == model_version)


def _given_up_ids(model_version: str, max_attempts: int):
    return select(FAILURES.c.item_id).where(
        FAILURES.c.item_kind == EVENT_ITEM_KIND,
        FAILURES.c.model_version == model_version,
        FAILURES.c.attempts >= max_attempts,
    )


def _missing_condition(model_version: str, max_attempts: int):
    return and_(
        EVENTS.c.id.not_in(_embedded_ids(model_version)),
        EVENTS.c.id.not_in(_given_up_ids(model_version, max_attempts)),
    )


@dataclass(frozen=True)
class PendingEvent:
    id: str
    camera_id: str
    started_at: datetime
    thumbnail_base64: str | None
    thumbnail_path: str | None

    @property
    def key(self) -> tuple[datetime, str]:
        return (self.started_at, self.id)


def select_pending_events(
    session: Session,
    model_version: str,
    *,
    mode: str,
    limit: int,
    max_attempts: int,
    after: tuple[datetime, str] | None = None,
) -> list[PendingEvent]:
    """The next events to embed, oldest first (started_at, then id), after the keyset
    cursor `after` when given (so a multi-batch run walks the table once, in order, and
    terminates even when some events keep failing).

    `missing`: events with no embedding for `model_version`, leaving out those given up.
    `all`: every event.
    """
    _check_mode(mode)
    query = select(
        EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.thumbnail_base64, EVENTS.c.thumbnail_path
    )
    if mode == "missing":
        query = query.where(_missing_condition(model_version, max_attempts))
    if after is not None:
        started, event_id = after
        query = query.where(or_(EVENTS.c.started_at > started, and_(EVENTS.c.started_at == started, EVENTS.c.id > event_id)))
    query = query.order_by(EVENTS.c.started_at, EVENTS.c.id).limit(limit)
    return [PendingEvent(*row) for row in session.execute(query)]


# ---------------------------------------------------------------- counts


def count_events(session: Session) -> int:
    return session.execute(select(func.count()).select_from(EVENTS)).scalar_one()


def count_embedded(session: Session, model_version: str) -> int:
    query = select(func.count()).select_from(EMBEDDINGS).where(EMBEDDINGS.c.model_version == model_version)
    return session.execute(query).scalar_one()


def count_given_up(session: Session, model_version: str, max_attempts: int) -> int:
    query = select(func.count()).select_from(_given_up_ids(model_version, max_attempts).subquery())
    return session.execute(query).scalar_one()


def count_remaining(session: Session, model_version: str | None, max_attempts: int) -> int:
    """Events that `missing` mode would still embed for `model_version` (None: no version
    written yet, so every event is remaining)."""
    if model_version is None:
        return count_events(session)
    query = select(func.count()).select_from(EVENTS).where(_missing_condition(model_version, max_attempts))
    return session.execute(query).scalar_one()


def latest_event_model_version(session: Session) -> str | None:
    """The model_version the embedding backfill wrote most recently (embedding or failure).

    The schedule uses it to count remaining events without loading the model: when the
    configured model changes, the first run under the new model makes it the latest.
    """
    newest_vector = session.execute(
        select(EMBEDDINGS.c.model_version, EMBEDDINGS.c.created_at).order_by(EMBEDDINGS.c.id.desc()).limit(1)
    ).first()
    newest_failure = session.execute(
        select(FAILURES.c.model_version, FAILURES.c.last_failed_at)
        .where(FAILURES.c.item_kind == EVENT_ITEM_KIND)
        .order_by(FAILURES.c.last_failed_at.desc())
        .limit(1)
    ).first()
    candidates = [row for row in (newest_vector, newest_failure) if row is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda row: row[1])[0]


# ---------------------------------------------------------------- writing


def _next_row_id(session: Session) -> int:
    return (session.execute(select(func.max(EMBEDDINGS.c.id))).scalar_one() or 0) + 1


def write_event_embeddings(session: Session, model_version: str, vectors: Mapping[str, np.ndarray]) -> int:
    """Upsert vectors inside the caller's write transaction; returns rows written.

    Rows are deleted and re-inserted with ids above every existing id (see module doc).
    Events deleted since they were read are skipped (their vectors have nowhere to go).
    """
    if not vectors:
        return 0
    ids = list(vectors)
    existing = set()
    for chunk in _chunks(ids, 500):
        existing.update(session.execute(select(EVENTS.c.id).where(EVENTS.c.id.in_(chunk))).scalars())
    next_id = _next_row_id(session)
    now = utcnow()
    rows = []
    for event_id in ids:
        if event_id in existing:
            rows.append(
                {"id": next_id, "event_id": event_id, "embedding": vector_to_json(vectors[event_id]),
                 "model_version": model_version, "created_at": now}
            )
            next_id += 1
    for chunk in _chunks([row["event_id"] for row in rows], 500):
        session.execute(delete(EMBEDDINGS).where(EMBEDDINGS.c.event_id.in_(chunk)))
        session.execute(
            delete(FAILURES).where(
                FAILURES.c.item_kind == EVENT_ITEM_KIND,
                FAILURES.c.model_version == model_version,
                FAILURES.c.item_id.in_(chunk),
            )
        )
    if rows:
        session.execute(insert(EMBEDDINGS), rows)
    return len(rows)


def record_event_failures(session: Session, model_version: str, failures: Mapping[str, str]) -> dict[str, int]:
    """Count one more attempt per failed event (read-then-write: call inside `db.write()`).
    Returns the attempts now recorded for each event."""
    if not failures:
        return {}
    now = utcnow()
    known: dict[str, int] = {}
    for chunk in _chunks(list(failures), 500):
        rows = session.execute(
            select(FAILURES.c.item_id, FAILURES.c.attempts).where(
                FAILURES.c.item_kind == EVENT_ITEM_KIND,
                FAILURES.c.model_version == model_version,
                FAILURES.c.item_id.in_(chunk),
            )
        )
        known.update({item_id: attempts for item_id, attempts in rows})
    attempts: dict[str, int] = {}
    new_rows = []
    for event_id, reason in failures.items():
        if event_id in known:
            attempts[event_id] = known[event_id] + 1
            session.execute(
                update(FAILURES)
                .where(
                    FAILURES.c.item_kind == EVENT_ITEM_KIND,
                    FAILURES.c.model_version == model_version,
                    FAILURES.c.item_id == event_id,
                )
                .values(attempts=attempts[event_id], reason=reason, last_failed_at=now)
            )
        else:
            attempts[event_id] = 1
            new_rows.append(
                {"item_kind": EVENT_ITEM_KIND, "item_id": event_id, "model_version": model_version, "reason": reason,
                 "attempts": 1, "first_failed_at": now, "last_failed_at": now}
            )
    if new_rows:
        session.execute(insert(FAILURES), new_rows)
    return attempts


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---------------------------------------------------------------- one batch


@dataclass
class EventOutcome:
    event_id: str
    camera_id: str
    started_at: datetime
    status: str  # embedded | failed
    reason: str | None = None
    attempts: int | None = None


@dataclass
class BatchResult:
    model_version: str
    mode: str
    outcomes: list[EventOutcome]
    embed_seconds: float
    last_key: tuple[datetime, str] | None

    @property
    def embedded(self) -> int:
        return sum(o.status == "embedded" for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(o.status == "failed" for o in self.outcomes)


def embed_thumbnails(
    pending: Sequence[PendingEvent], embedder, *, root: Path, max_bytes: int
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors for the events whose thumbnails embed, and a reason for each that does not.
    A bad thumbnail never fails the others."""
    failures: dict[str, str] = {}
    sources: list[bytes] = []
    source_events: list[PendingEvent] = []
    for event in pending:
        try:
            sources.append(
                load_thumbnail_bytes(event.id, event.thumbnail_base64, event.thumbnail_path, root=root, max_bytes=max_bytes)
            )
            source_events.append(event)
        except ThumbnailError as exc:
            failures[event.id] = str(exc)
    vectors: dict[str, np.ndarray] = {}
    if sources:
        outcome = embedder.embed_sources(sources, names=[f"event {e.id}" for e in source_events])
        for row, index in enumerate(outcome.ok):
            vectors[source_events[index].id] = np.asarray(outcome.vectors[row], dtype=np.float32)
        for index, reason in outcome.errors.items():
            event_id = source_events[index].id
            failures[event_id] = reason if event_id in reason else f"event {event_id}: {reason}"
    return vectors, failures


def embed_next_batch(
    db: AppDatabase,
    embedder,
    *,
    max_batch: int,
    max_attempts: int,
    thumbnails_root: Path,
    thumbnail_max_bytes: int,
    mode: str = "missing",
    batch_size: int | None = None,
    after: tuple[datetime, str] | None = None,
) -> BatchResult:
    """Embed the next batch of events and store vectors and failures in one short write."""
    _check_mode(mode)
    size = resolve_batch_size(batch_size, max_batch)
    model_version = embedder.model_version
    with db.read() as session:
        pending = select_pending_events(
            session, model_version, mode=mode, limit=size, max_attempts=max_attempts, after=after
        )
    started = time.perf_counter()
    vectors, failures = embed_thumbnails(pending, embedder, root=thumbnails_root, max_bytes=thumbnail_max_bytes)
    embed_seconds = time.perf_counter() - started
    with db.write() as session:
        write_event_embeddings(session, model_version, vectors)
        attempts = record_event_failures(session, model_version, failures)
    outcomes = [
        EventOutcome(e.id, e.camera_id, e.started_at, "embedded")
        if e.id in vectors
        else EventOutcome(e.id, e.camera_id, e.started_at, "failed", failures.get(e.id), attempts.get(e.id))
        for e in pending
    ]
    return BatchResult(model_version, mode, outcomes, embed_seconds, pending[-1].key if pending else None)


# ---------------------------------------------------------------- a whole backfill


@dataclass
class BackfillReport:
    model_version: str
    mode: str
    batch_size: int
    batches: int = 0
    embedded: int = 0
    failed: int = 0
    skipped: int = 0  # events given up for this model version (attempts >= max_attempts)
    remaining: int = 0
    total_events: int = 0
    embedded_events: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    outcomes: list[EventOutcome] = field(default_factory=list)

    @property
    def coverage_pct(self) -> float:
        return 100.0 * self.embedded_events / self.total_events if self.total_events else 100.0

    @property
    def images_per_sec(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def failures(self) -> dict[str, str]:
        return {o.event_id: o.reason or "" for o in self.outcomes if o.status == "failed"}

    def as_dict(self) -> dict:
        return {
            "model_version": self.model_version, "mode": self.mode, "batch_size": self.batch_size,
            "batches": self.batches, "embedded": self.embedded, "failed": self.failed, "skipped": self.skipped,
            "remaining": self.remaining, "total_events": self.total_events, "embedded_events": self.embedded_events,
            "coverage_pct": round(self.coverage_pct, 2), "images_per_sec": round(self.images_per_sec, 2),
            "seconds": round(self.seconds, 3), "failures": self.failures,
        }


def run_event_backfill(
    db: AppDatabase,
    embedder,
    *,
    max_batch: int,
    max_attempts: int,
    thumbnails_root: Path,
    thumbnail_max_bytes: int,
    mode: str = "missing",
    batch_size: int | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> BackfillReport:
    """Embed batch after batch until nothing is left (or `max_batches` ran).

    Each event is tried at most once per call (a failed one waits for the next backfill,
    so retries are spread out): `missing` walks the events without a vector, `all` every
    event, oldest first.
    """
    _check_mode(mode)
    size = resolve_batch_size(batch_size, max_batch)
    report = BackfillReport(embedder.model_version, mode, size)
    started = time.perf_counter()
    after: tuple[datetime, str] | None = None
    while max_batches is None or report.batches < max_batches:
        batch = embed_next_batch(
            db, embedder, max_batch=max_batch, max_attempts=max_attempts, thumbnails_root=thumbnails_root,
            thumbnail_max_bytes=thumbnail_max_bytes, mode=mode, batch_size=size, after=after,
        )
        if not batch.outcomes:
            break
        report.batches += 1
        report.embedded += batch.embedded
        report.failed += batch.failed
        report.embed_seconds += batch.embed_seconds
        report.outcomes.extend(batch.outcomes)
        after = batch.last_key
        if on_batch is not None:
            on_batch(batch)
    report.seconds = time.perf_counter() - started
    fill_backfill_counts(db, report, max_attempts)
    return report


def fill_backfill_counts(db: AppDatabase, report: BackfillReport, max_attempts: int) -> None:
    with db.read() as session:
        report.skipped = count_given_up(session, report.model_version, max_attempts)
        report.remaining = count_remaining(session, report.model_version, max_attempts)
        report.total_events = count_events(session)
        report.embedded_events = count_embedded(session, report.model_version)


def batch_report(db: AppDatabase, batch: BatchResult, batch_size: int, max_attempts: int) -> BackfillReport:
    """A one-batch run described like a backfill (what the scheduled asset returns)."""
    report = BackfillReport(
        batch.model_version, batch.mode, batch_size, batches=1 if batch.outcomes else 0, embedded=batch.embedded,
        failed=batch.failed, embed_seconds=batch.embed_seconds, seconds=batch.embed_seconds, outcomes=batch.outcomes,
    )
    fill_backfill_counts(db, report, max_attempts)
    return report


# ---------------------------------------------------------------- status


def event_status(db: AppDatabase, event_id: str) -> dict:
    """Is the event embedded (model_version, created_at), and if not, why not."""
    with db.read() as session:
        event = session.execute(
            select(EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.label).where(EVENTS.c.id == event_id)
        ).first()
        if event is None:
            raise EventNotFoundError(event_id)
        vector = session.execute(
            select(EMBEDDINGS.c.model_version, EMBEDDINGS.c.created_at).where(EMBEDDINGS.c.event_id == event_id)
        ).first()
        failures = session.execute(
            select(FAILURES.c.model_version, FAILURES.c.reason, FAILURES.c.attempts, FAILURES.c.first_failed_at,
                   FAILURES.c.last_failed_at)
            .where(FAILURES.c.item_kind == EVENT_ITEM_KIND, FAILURES.c.item_id == event_id)
            .order_by(FAILURES.c.last_failed_at.desc())
        ).all()
        latest = latest_event_model_version(session)
    return {
        "event_id": event.id,
        "camera_id": event.camera_id,
        "started_at": _iso(event.started_at),
        "label": event.label,
        "embedded": vector is not None,
        "model_version": vector.model_version if vector else None,
        "created_at": _iso(vector.created_at) if vector else None,
        "current_model_version": latest,
        "stale": bool(vector and latest and vector.model_version != latest),
        "failures": [
            {"model_version": f.model_version, "reason": f.reason, "attempts": f.attempts,
             "first_failed_at": _iso(f.first_failed_at), "last_failed_at": _iso(f.last_failed_at)}
            for f in failures
        ],
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


# ---------------------------------------------------------------- presentation


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A small markdown table for Dagster metadata (pipes in cells escaped)."""
    def cell(value) -> str:
        if isinstance(value, float):
            value = f"{value:.3f}" if math.isfinite(value) else str(value)
        return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def outcomes_preview(outcomes: Sequence[EventOutcome], limit: int) -> str:
    rows = [
        (o.event_id, o.camera_id, _iso(o.started_at), o.status, o.attempts or "", (o.reason or "")[:120])
        for o in outcomes[:limit]
    ]
    return markdown_table(["event", "camera", "started_at", "status", "attempts", "reason"], rows)


def given_up_events(db: AppDatabase, model_version: str, max_attempts: int, limit: int) -> list[dict]:
    """Events embedding gave up on for `model_version`, most recent failure first."""
    with db.read() as session:
        rows = session.execute(
            select(FAILURES.c.item_id, FAILURES.c.attempts, FAILURES.c.reason, FAILURES.c.last_failed_at)
            .where(FAILURES.c.item_kind == EVENT_ITEM_KIND, FAILURES.c.model_version == model_version,
                   FAILURES.c.attempts >= max_attempts)
            .order_by(FAILURES.c.last_failed_at.desc())
            .limit(limit)
        ).all()
    return [{"event_id": r.item_id, "attempts": r.attempts, "reason": r.reason, "last_failed_at": _iso(r.last_failed_at)}
            for r in rows]


# Files of a model directory whose change changes the vectors (weights, configs).
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".bin")
EMBEDDERS_FILE = "embedders.json"


def cache_dir(db: AppDatabase) -> Path | None:
    """Derived data kept next to the database file (`<db file>.cache/`): losing it costs
    time, never correctness. None for an in-memory database."""
    return db.path.parent / f"{db.path.name}.cache" if db.path is not None else None


def embedder_fingerprint(settings) -> str:
    """A cheap fingerprint of the embedder configuration (no model load, no hashing of
    weights): model name or directory, revision and fallback, plus the name, size and
    mtime of each weight/config file of a local model directory."""
    parts: dict = {"model": settings.model, "revision": settings.revision, "fallback": settings.fallback,
                   "cache_dir": str(settings.cache_dir) if settings.cache_dir else None}
    directory = Path(settings.model).expanduser()
    if directory.is_dir():
        files = []
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in _MODEL_FILE_SUFFIXES:
                info = path.stat()
                files.append([path.name, info.st_size, info.st_mtime_ns])
        parts["files"] = files
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def remember_embedder_version(db: AppDatabase, embedder_settings, model_version: str) -> None:
    """Record which model_version the configured embedder produces, so the schedule can
    count what is left for it without loading the model. Best effort (a lost or stale
    record only costs one extra run)."""
    directory = cache_dir(db)
    if directory is None:
        return
    path = directory / EMBEDDERS_FILE
    known = _read_embedder_versions(path)
    fingerprint = embedder_fingerprint(embedder_settings)
    if known.get(fingerprint) == model_version:
        return
    known[fingerprint] = model_version
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError:
        pass


def known_embedder_version(db: AppDatabase, embedder_settings) -> str | None:
    """The model_version the configured embedder produced when it last ran (None: unknown)."""
    directory = cache_dir(db)
    if directory is None:
        return None
    return _read_embedder_versions(directory / EMBEDDERS_FILE).get(embedder_fingerprint(embedder_settings))


def _read_embedder_versions(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
