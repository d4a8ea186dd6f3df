"""Security-event embeddings: embedding one batch, a whole backfill with a retry cap,
the reports, the per-event status, and which model version the configured embedder
writes (so the schedule can count what is left without loading the model).

The rules the rest of the system relies on:
- an event is never changed, blocked or lost because its thumbnail is bad: the failure is
  recorded in `embedding_failures` (reason + attempts) and the batch goes on;
- an event that failed `max_attempts` times for a model version is given up for that
  version, so a backfill in `missing` mode always terminates;
- vectors are written through `cv_assets/store/events.py`, which gives every new or
  re-embedded vector a larger row id (what `cv_assets/events/search.py` relies on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy.exc import OperationalError

from cv_assets.events.thumbnails import (
    DEFAULT_THUMBNAIL_MAX_PIXELS,
    ThumbnailError,
    check_thumbnail_pixels,
    load_thumbnail_bytes,
)
from cv_assets.store.database import AppDatabase
from cv_assets.store.embedders import record_embedder_version, recorded_embedder_version
from cv_assets.store.events import (
    MODES,
    PendingEvent,
    claim_pending_events,
    count_embedded,
    count_events,
    count_given_up,
    count_remaining,
    event_failures,
    get_event,
    get_event_embedding_info,
    latest_event_model_version,
    record_event_failures,
    select_pending_events,
    write_event_embeddings,
)
from cv_assets.text import markdown_table

log = logging.getLogger(__name__)

HARD_MAX_BATCH = 100  # inherited contract: never more than 100 events per embedding request


class BatchSizeError(ValueError):
    """A batch size over the configured limit (or below 1)."""


class EventNotFoundError(LookupError):
    """No event with that id."""

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(f"event {event_id!r} not found")


@dataclass(frozen=True)
class BackfillLimits:
    """The configured bounds of an embedding backfill (`events.*`, `storage.thumbnails_root`)."""

    max_batch: int
    max_attempts: int
    thumbnails_root: Path
    thumbnail_max_bytes: int
    thumbnail_max_pixels: int = DEFAULT_THUMBNAIL_MAX_PIXELS

    @classmethod
    def from_settings(cls, settings) -> "BackfillLimits":
        events = settings.events
        return cls(events.max_batch, events.max_attempts, Path(settings.storage.thumbnails_root),
                   events.thumbnail_max_bytes, events.thumbnail_max_pixels)


# ---------------------------------------------------------------- batch size


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


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


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
    pending: Sequence[PendingEvent], embedder, limits: BackfillLimits
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors for the events whose thumbnails embed, and a reason for each that does not.
    A bad thumbnail never fails the others. Thumbnails over the pixel cap are refused from
    their header, before any pixel is decoded."""
    failures: dict[str, str] = {}
    sources: list[bytes] = []
    source_events: list[PendingEvent] = []
    for event in pending:
        try:
            data = load_thumbnail_bytes(event.id, event.thumbnail_base64, event.thumbnail_path,
                                        root=limits.thumbnails_root, max_bytes=limits.thumbnail_max_bytes)
            check_thumbnail_pixels(data, event_id=event.id, max_pixels=limits.thumbnail_max_pixels)
            sources.append(data)
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
    limits: BackfillLimits,
    *,
    mode: str = "missing",
    batch_size: int | None = None,
    after: tuple[datetime, str] | None = None,
) -> BatchResult:
    """Embed the next batch of events and store vectors and failures in one short write.
    On PostgreSQL, `missing` mode claims the batch (see `claim_next_batch`), so any number
    of workers may run this at once."""
    check_mode(mode)
    size = resolve_batch_size(batch_size, limits.max_batch)
    model_version = embedder.model_version
    if mode == "missing" and db.supports_skip_locked:
        return claim_next_batch(db, embedder, limits, size, after=after)
    with db.read() as session:
        pending = select_pending_events(
            session, model_version, mode=mode, limit=size, max_attempts=limits.max_attempts, after=after
        )
    started = time.perf_counter()
    vectors, failures = embed_thumbnails(pending, embedder, limits)
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


def claim_next_batch(db: AppDatabase, embedder, limits: BackfillLimits, size: int, *,
                     after: tuple[datetime, str] | None = None) -> BatchResult:
    """One batch of a concurrent backfill (PostgreSQL): the events are locked (`SKIP
    LOCKED`) for the whole transaction, embedded, and their vectors and failures stored in
    the same transaction, so two workers never take the same event and each event is
    embedded once. A worker killed mid-batch stores nothing; the server releases its rows
    and another worker claims them. Only the final store waits for other writers."""
    model_version = embedder.model_version
    with db.claim() as session:
        pending = claim_pending_events(session, model_version, limit=size, max_attempts=limits.max_attempts,
                                       after=after)
        started = time.perf_counter()
        vectors, failures = embed_thumbnails(pending, embedder, limits)
        embed_seconds = time.perf_counter() - started
        db.lock_writes(session)
        write_event_embeddings(session, model_version, vectors)
        attempts = record_event_failures(session, model_version, failures)
    outcomes = [
        EventOutcome(e.id, e.camera_id, e.started_at, "embedded")
        if e.id in vectors
        else EventOutcome(e.id, e.camera_id, e.started_at, "failed", failures.get(e.id), attempts.get(e.id))
        for e in pending
    ]
    return BatchResult(model_version, "missing", outcomes, embed_seconds, pending[-1].key if pending else None)


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

    def add(self, batch: BatchResult) -> None:
        self.batches += 1 if batch.outcomes else 0
        self.embedded += batch.embedded
        self.failed += batch.failed
        self.embed_seconds += batch.embed_seconds
        self.outcomes.extend(batch.outcomes)

    def summary(self) -> str:
        return (f"{self.embedded} embedded, {self.failed} failed, {self.skipped} given up, "
                f"{self.remaining} remaining")

    def as_dict(self) -> dict:
        document = {name: getattr(self, name) for name in (
            "model_version", "mode", "batch_size", "batches", "embedded", "failed", "skipped", "remaining",
            "total_events", "embedded_events")}
        document.update(coverage_pct=round(self.coverage_pct, 2), images_per_sec=round(self.images_per_sec, 2),
                        seconds=round(self.seconds, 3), failures=self.failures)
        return document


def run_event_backfill(
    db: AppDatabase,
    embedder,
    limits: BackfillLimits,
    *,
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
    check_mode(mode)
    size = resolve_batch_size(batch_size, limits.max_batch)
    report = BackfillReport(embedder.model_version, mode, size)
    started = time.perf_counter()
    after: tuple[datetime, str] | None = None
    while max_batches is None or report.batches < max_batches:
        batch = embed_next_batch(db, embedder, limits, mode=mode, batch_size=size, after=after)
        if not batch.outcomes:
            break
        report.add(batch)
        after = batch.last_key
        if on_batch is not None:
            on_batch(batch)
    report.seconds = time.perf_counter() - started
    fill_backfill_counts(db, report, limits.max_attempts)
    return report


def run_scheduled_batch(
    db: AppDatabase, embedder, limits: BackfillLimits, *, mode: str = "missing", batch_size: int | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> BackfillReport:
    """What one `event_embeddings` materialisation does: `missing` embeds the next batch
    (the schedule asks again while events remain), `all` re-embeds every event batch by batch.
    Records which model version the embedder wrote (see `remember_embedder_version`)."""
    check_mode(mode)
    size = resolve_batch_size(batch_size, limits.max_batch)
    if mode == "missing":
        report = BackfillReport(embedder.model_version, mode, size)
        batch = embed_next_batch(db, embedder, limits, mode=mode, batch_size=size)
        report.add(batch)
        report.seconds = batch.embed_seconds
        if on_batch is not None and batch.outcomes:
            on_batch(batch)
        fill_backfill_counts(db, report, limits.max_attempts)
    else:
        report = run_event_backfill(db, embedder, limits, mode=mode, batch_size=size, on_batch=on_batch)
    return report


def fill_backfill_counts(db: AppDatabase, report: BackfillReport, max_attempts: int) -> None:
    with db.read() as session:
        report.skipped = count_given_up(session, report.model_version, max_attempts)
        report.remaining = count_remaining(session, report.model_version, max_attempts)
        report.total_events = count_events(session)
        report.embedded_events = count_embedded(session, report.model_version)


def events_left(db: AppDatabase, model_version: str | None, max_attempts: int) -> tuple[int, int | None]:
    """(events in all, events `missing` mode would still embed for `model_version`; None
    when the version is unknown)."""
    with db.read() as session:
        total = count_events(session)
        remaining = count_remaining(session, model_version, max_attempts) if model_version and total else None
    return total, remaining


# ---------------------------------------------------------------- status


def event_status(db: AppDatabase, event_id: str) -> dict:
    """Is the event embedded (model_version, created_at), and if not, why not."""
    with db.read() as session:
        event = get_event(session, event_id)
        if event is None:
            raise EventNotFoundError(event_id)
        vector = get_event_embedding_info(session, event_id)
        failures = event_failures(session, event_id=event_id)
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


def outcomes_preview(outcomes: Sequence[EventOutcome], limit: int) -> str:
    rows = [
        (o.event_id, o.camera_id, _iso(o.started_at), o.status, o.attempts or "", _reason_cell(o.event_id, o.reason, 120))
        for o in outcomes
    ]
    return markdown_table(["event", "camera", "started_at", "status", "attempts", "reason"], rows, limit=limit,
                          noun="events")


def _reason_cell(event_id: str, reason: str | None, width: int) -> str:
    """A reason for a table that has an event column: without the leading `event <id>: `."""
    reason = reason or ""
    return reason.removeprefix(f"event {event_id}: ")[:width]


@dataclass(frozen=True)
class GivenUp:
    """The events embedding gave up on for the current model version."""

    model_version: str | None
    count: int
    events: list[dict]

    def summary(self) -> str:
        if not self.count:
            return f"no thumbnail given up for {self.model_version or 'any model'}"
        first = self.events[0]
        return (f"{self.count} thumbnail{'s' if self.count != 1 else ''} given up for {self.model_version}: "
                f"{first['event_id']}: {first['reason'][:120]}" + (" …" if self.count > 1 else ""))

    def table(self) -> str:
        return markdown_table(
            ["event", "attempts", "last failed", "reason"],
            [(g["event_id"], g["attempts"], g["last_failed_at"], _reason_cell(g["event_id"], g["reason"], 160))
             for g in self.events],
        )


def given_up_events(db: AppDatabase, max_attempts: int, limit: int, model_version: str | None = None) -> GivenUp:
    """Events embedding gave up on for `model_version` (default: the current one), most
    recent failure first; at most `limit` listed, all counted."""
    with db.read() as session:
        version = model_version or latest_event_model_version(session)
        if version is None:
            return GivenUp(None, 0, [])
        count = count_given_up(session, version, max_attempts)
        rows = event_failures(session, model_version=version, min_attempts=max_attempts, limit=limit)
    return GivenUp(version, count, [
        {"event_id": r.item_id, "attempts": r.attempts, "reason": r.reason, "last_failed_at": _iso(r.last_failed_at)}
        for r in rows])


# Files of a model directory whose change changes the vectors (weights, configs).
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".bin")


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
    else:
        # A hub id: the snapshots in the local cache (weights downloaded or removed since
        # change the fingerprint, so a fallback's version is never taken for CLIP's).
        parts["snapshots"] = _hub_snapshots(settings)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _hub_snapshots(settings) -> list:
    hub = Path(settings.cache_dir) if settings.cache_dir else Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / f"models--{settings.model.replace('/', '--')}" / "snapshots"
    try:
        return sorted([entry.name, entry.stat().st_mtime_ns] for entry in snapshots.iterdir())
    except OSError:
        return []


def remember_embedder_version(db: AppDatabase, embedder_settings, model_version: str) -> None:
    """Record which model_version the configured embedder produces (in the application
    database, `embedder_versions`, on every backend), so the schedule can count what is
    left for it without loading the model. Best effort: a lost or stale record only costs
    one extra run, so a database that is briefly busy or unreachable is logged, not raised."""
    try:
        record_embedder_version(db, embedder_fingerprint(embedder_settings), model_version)
    except OperationalError as exc:
        log.warning("could not record the embedder's model_version %s: %s", model_version, getattr(exc, "orig", exc))


def known_embedder_version(db: AppDatabase, embedder_settings) -> str | None:
    """The model_version the configured embedder produced when it last ran (None: unknown)."""
    return recorded_embedder_version(db, embedder_fingerprint(embedder_settings))
