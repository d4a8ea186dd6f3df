"""Every SQL statement on security events: `events`, `event_embeddings` and the event rows
of `embedding_failures`. Plain functions over a SQLAlchemy session; the caller chooses the
transaction (`db.read()` or `db.write()`), the logic lives in `cv_assets/events/`.

`event_embeddings` rows are never updated in place: a new or re-embedded vector is a new
row with an id above every existing one, so a reader that caches vectors can pick up new
and changed rows by id alone (see `cv_assets/events/search.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import and_, delete, func, insert, or_, select, text, true
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from cv_assets.settings import EventsSettings
from cv_assets.store.failures import FAILURES, chunks, clear_failures, record_failures
from cv_assets.store.models import Event, EventEmbedding, utcnow
from cv_assets.store.vectors import vector_from_json, vector_to_json

EVENT_ITEM_KIND = "event"  # item_kind of an event's rows in embedding_failures
MODES = ("missing", "all")

EVENTS = Event.__table__
EMBEDDINGS = EventEmbedding.__table__


@dataclass(frozen=True)
class PendingEvent:
    """An event to embed: what the thumbnail loader needs."""

    id: str
    camera_id: str
    started_at: datetime
    thumbnail_base64: str | None
    thumbnail_path: str | None

    @property
    def key(self) -> tuple[datetime, str]:
        return (self.started_at, self.id)


# ---------------------------------------------------------------- which events need a vector


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


def _after_condition(after: tuple[datetime, str] | None):
    """Events after the keyset cursor (started_at, id); everything when None."""
    if after is None:
        return true()
    started, event_id = after
    return or_(EVENTS.c.started_at > started, and_(EVENTS.c.started_at == started, EVENTS.c.id > event_id))


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
    cursor `after` when given. `missing`: events with no vector for `model_version`, less
    those given up; `all`: every event."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    query = select(
        EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.thumbnail_base64, EVENTS.c.thumbnail_path
    )
    if mode == "missing":
        query = query.where(_missing_condition(model_version, max_attempts))
    if after is not None:
        query = query.where(_after_condition(after))
    query = query.order_by(EVENTS.c.started_at, EVENTS.c.id).limit(limit)
    return [PendingEvent(*row) for row in session.execute(query)]


def claim_pending_events(
    session: Session, model_version: str, *, limit: int, max_attempts: int,
    after: tuple[datetime, str] | None = None,
) -> list[PendingEvent]:
    """`missing` mode's next events, locked for this transaction so concurrent workers get
    disjoint batches (PostgreSQL `FOR NO KEY UPDATE SKIP LOCKED`: rows another worker holds
    are passed over, not waited for; new events and their foreign keys are never blocked).
    Hold the transaction (`db.claim()`) until the batch's vectors are stored in it: a worker
    that dies releases its rows with its connection, and the next worker takes them.

    The lock is taken after the statement's snapshot, so an event another worker stored and
    released in between is checked again by a second statement, which sees that commit.
    `after`: the keyset cursor of a backfill that tries each event once per call."""
    query = (
        select(EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.thumbnail_base64,
               EVENTS.c.thumbnail_path)
        .where(_missing_condition(model_version, max_attempts))
        .where(_after_condition(after))
        .order_by(EVENTS.c.started_at, EVENTS.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True, of=EVENTS)
    )
    claimed = [PendingEvent(*row) for row in session.execute(query)]
    if not claimed:
        return []
    still_missing = set(session.execute(
        select(EVENTS.c.id).where(EVENTS.c.id.in_([e.id for e in claimed]), _missing_condition(model_version, max_attempts))
    ).scalars())
    return [event for event in claimed if event.id in still_missing]


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
    """The model_version the embedding backfill wrote most recently (vector or failure)."""
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


# ---------------------------------------------------------------- writing vectors and failures


def write_event_embeddings(session: Session, model_version: str, vectors: Mapping[str, np.ndarray]) -> int:
    """Replace the vectors of these events inside the caller's write transaction; returns
    the rows written. Each row gets an id above every existing one (see the module doc);
    an event deleted since it was read is skipped; its failures for the version go."""
    if not vectors:
        return 0
    existing: set[str] = set()
    for chunk in chunks(list(vectors)):
        existing.update(session.execute(select(EVENTS.c.id).where(EVENTS.c.id.in_(chunk))).scalars())
    next_id = (session.execute(select(func.max(EMBEDDINGS.c.id))).scalar_one() or 0) + 1
    now = utcnow()
    rows = []
    for event_id, vector in vectors.items():
        if event_id in existing:
            rows.append({"id": next_id, "event_id": event_id, "embedding": vector_to_json(vector),
                         "model_version": model_version, "created_at": now})
            next_id += 1
    written = [row["event_id"] for row in rows]
    for chunk in chunks(written):
        session.execute(delete(EMBEDDINGS).where(EMBEDDINGS.c.event_id.in_(chunk)))
    clear_failures(session, EVENT_ITEM_KIND, model_version, written)
    if rows:
        session.execute(insert(EMBEDDINGS), rows)
    return len(rows)


def record_event_failures(session: Session, model_version: str, failures: Mapping[str, str]) -> dict[str, int]:
    """One more attempt per failed event (call inside `db.write()`); returns the attempts now recorded."""
    return record_failures(session, EVENT_ITEM_KIND, model_version, failures)


def event_failures(
    session: Session, *, event_id: str | None = None, model_version: str | None = None,
    min_attempts: int | None = None, limit: int | None = None,
) -> list[Row]:
    """Failure rows of events (item_id, model_version, reason, attempts, first/last_failed_at),
    most recent failure first."""
    query = select(
        FAILURES.c.item_id, FAILURES.c.model_version, FAILURES.c.reason, FAILURES.c.attempts,
        FAILURES.c.first_failed_at, FAILURES.c.last_failed_at,
    ).where(FAILURES.c.item_kind == EVENT_ITEM_KIND)
    if event_id is not None:
        query = query.where(FAILURES.c.item_id == event_id)
    if model_version is not None:
        query = query.where(FAILURES.c.model_version == model_version)
    if min_attempts is not None:
        query = query.where(FAILURES.c.attempts >= min_attempts)
    query = query.order_by(FAILURES.c.last_failed_at.desc(), FAILURES.c.item_id)
    if limit is not None:
        query = query.limit(limit)
    return session.execute(query).all()


# ---------------------------------------------------------------- single events


def get_event(session: Session, event_id: str) -> Row | None:
    """(id, camera_id, started_at, label) of one event, or None."""
    return session.execute(
        select(EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.label).where(EVENTS.c.id == event_id)
    ).first()


def get_event_embedding_info(session: Session, event_id: str) -> Row | None:
    """(model_version, created_at) of the event's vector, or None."""
    return session.execute(
        select(EMBEDDINGS.c.model_version, EMBEDDINGS.c.created_at).where(EMBEDDINGS.c.event_id == event_id)
    ).first()


def event_details(session: Session, event_ids: Sequence[str]) -> dict[str, Row]:
    """(id, camera_id, started_at, label) of the events that exist, by id."""
    details: dict[str, Row] = {}
    for chunk in chunks(list(event_ids)):
        query = select(EVENTS.c.id, EVENTS.c.camera_id, EVENTS.c.started_at, EVENTS.c.label).where(
            EVENTS.c.id.in_(chunk))
        details.update({row.id: row for row in session.execute(query)})
    return details


# ---------------------------------------------------------------- importing


def existing_event_ids(session: Session, event_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for chunk in chunks(list(event_ids)):
        found.update(session.execute(select(EVENTS.c.id).where(EVENTS.c.id.in_(chunk))).scalars())
    return found


def insert_events(session: Session, rows: Sequence[dict]) -> int:
    """Insert new events (dicts with the `events` columns); created_at is now."""
    if not rows:
        return 0
    now = utcnow()
    session.execute(insert(EVENTS), [{**row, "created_at": now} for row in rows])
    return len(rows)


# ---------------------------------------------------------------- the vector index's reads


def newest_vector_row(session: Session, model_version: str, row_id: int) -> tuple[bool, int | None, str | None,
                                                                                      datetime | None]:
    """(does row `row_id` of this version exist, the version's largest row id, that row's
    event_id and created_at) in one statement; both are index lookups."""
    newest = (
        select(func.max(EMBEDDINGS.c.id)).where(EMBEDDINGS.c.model_version == model_version).scalar_subquery()
    )
    top = (
        select(EMBEDDINGS.c.event_id, EMBEDDINGS.c.created_at)
        .where(EMBEDDINGS.c.id == row_id, EMBEDDINGS.c.model_version == model_version)
        .subquery()
    )
    row = session.execute(select(newest, top.c.event_id, top.c.created_at).select_from(top)).first()
    if row is None:
        return False, None, None, None
    return True, row[0], row[1], row[2]


def count_vectors(session: Session, model_version: str, up_to_id: int | None = None) -> int:
    query = select(func.count()).select_from(EMBEDDINGS).where(EMBEDDINGS.c.model_version == model_version)
    if up_to_id is not None:
        query = query.where(EMBEDDINGS.c.id <= up_to_id)
    return session.execute(query).scalar_one()


def vector_row_ids(session: Session, model_version: str, up_to_id: int) -> np.ndarray:
    query = select(EMBEDDINGS.c.id).where(EMBEDDINGS.c.model_version == model_version, EMBEDDINGS.c.id <= up_to_id)
    return np.fromiter(session.execute(query).scalars(), dtype=np.int64)


def iter_vector_rows(session: Session, model_version: str, after_id: int, chunk_rows: int) -> Iterator[Sequence[Row]]:
    """Chunks of (row id, event_id, embedding JSON, created_at, camera_id, started_at) of
    the version's vectors with row id > `after_id`, in row id order."""
    query = (
        select(EMBEDDINGS.c.id, EMBEDDINGS.c.event_id, EMBEDDINGS.c.embedding, EMBEDDINGS.c.created_at,
               EVENTS.c.camera_id, EVENTS.c.started_at)
        .join(EVENTS, EVENTS.c.id == EMBEDDINGS.c.event_id)
        .where(EMBEDDINGS.c.model_version == model_version, EMBEDDINGS.c.id > after_id)
        .order_by(EMBEDDINGS.c.id)
    )
    result = session.execute(query)
    while chunk := result.fetchmany(chunk_rows):
        yield chunk


# ---------------------------------------------------------------- pgvector (PostgreSQL only)


def has_vector_index(session: Session) -> bool:
    """Whether event vectors also live in pgvector's `embedding_vector` (migration 0004 on
    PostgreSQL with the extension); False on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    query = text("SELECT 1 FROM information_schema.columns WHERE table_name = 'event_embeddings' "
                 "AND column_name = 'embedding_vector' AND table_schema = current_schema()")
    return session.execute(query).first() is not None


VECTOR_INDEX_DIMENSIONS = 512  # migration 0004's vector(512): other sizes keep only their JSON form
# HNSW candidate list per search (pgvector's default 40): `events.hnsw_ef_search`'s default.
EF_SEARCH = EventsSettings.model_fields["hnsw_ef_search"].default
_MAX_EF_SEARCH = 1000  # pgvector's ceiling for hnsw.ef_search
_ITERATIVE_SCAN = (0, 8)  # the first pgvector release with iterative index scans


# Below this many rows (the planner's estimate) the vectors of a version are counted exactly;
# above it the estimate stands in (an exact count of 1M rows costs ~30 ms, more than the search).
EXACT_COUNT_BELOW = 100_000


def vector_count_estimate(session: Session, model_version: str) -> tuple[int, bool]:
    """(vectors of `model_version`, whether that is exact): the planner's row estimate from
    the table statistics (autovacuum keeps them), or an exact count where that is cheap."""
    plan = session.execute(text("EXPLAIN (FORMAT JSON) SELECT 1 FROM event_embeddings WHERE model_version = :v"),
                           {"v": model_version}).scalar()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    estimate = int(plan[0]["Plan"]["Plan Rows"])
    if estimate < EXACT_COUNT_BELOW:
        return count_vectors(session, model_version), True
    return estimate, False


def vector_extension_version(session: Session) -> tuple[int, ...] | None:
    """pgvector's installed version, e.g. (0, 8, 0); None where it is not installed."""
    version = session.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
    return None if version is None else tuple(int(part) for part in version.split(".") if part.isdigit())


def indexed_event_vector(session: Session, event_id: str) -> np.ndarray | None:
    """The event's vector when pgvector holds it too (None: no vector, or not 512-d)."""
    stored = session.execute(
        text("SELECT embedding FROM event_embeddings WHERE event_id = :id AND embedding_vector IS NOT NULL"),
        {"id": event_id},
    ).scalar()
    return None if stored is None else vector_from_json(stored)


def nearest_events(
    session: Session,
    model_version: str,
    query: np.ndarray,
    limit: int,
    *,
    camera: str | None = None,
    started_from: datetime | None = None,
    started_to: datetime | None = None,
    exclude_event_id: str | None = None,
    min_similarity: float | None = None,
    ef_search: int = EF_SEARCH,
) -> list[Row]:
    """(event_id, camera_id, started_at, label, similarity) of the `limit` events of
    `model_version` nearest to `query` (cosine) that pass the filters, best first.

    The filters sit in the HNSW query, which filters what the index yields: on pgvector
    >= 0.8 it scans on until `limit` rows pass (iterative scan), before that it stops at
    `ef_search` candidates. Where it still yields fewer than `limit` rows, all above the
    floor, an exact search over the filtered rows decides, so a short list means there are
    no more. The floor is applied last, as pgvector advises (a distance filter inside the
    scan would make it walk the whole index)."""
    _tune_hnsw(session, min(max(ef_search, limit), _MAX_EF_SEARCH))
    filters, params = _nearest_filters(model_version, query, camera, started_from, started_to, exclude_event_id)
    params["limit"] = int(limit)
    rows = session.execute(text(_nearest_sql(filters, exact=False)), params).all()
    floor = -np.inf if min_similarity is None else min_similarity
    if len(rows) < limit and all(row.similarity >= floor for row in rows):
        rows = session.execute(text(_nearest_sql(filters, exact=True)), params).all()
    return [row for row in rows if row.similarity >= floor]


def _tune_hnsw(session: Session, ef_search: int) -> None:
    """This transaction's HNSW settings: the candidate list, and on pgvector >= 0.8 iterative
    scans in relaxed order (better recall; `_nearest_sql` re-sorts)."""
    session.execute(text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(ef_search)})
    version = vector_extension_version(session)
    if version is not None and version >= _ITERATIVE_SCAN:
        session.execute(text("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"))


def _nearest_filters(
    model_version: str, query: np.ndarray, camera: str | None, started_from: datetime | None,
    started_to: datetime | None, exclude_event_id: str | None,
) -> tuple[list[str], dict]:
    """WHERE clauses (fixed strings, values bound) and their parameters."""
    filters = ["v.model_version = :version", "v.embedding_vector IS NOT NULL"]
    params: dict = {"q": vector_to_json(query), "version": model_version}
    for clause, name, value in (
        ("e.camera_id = :camera", "camera", camera),
        ("e.started_at >= :started_from", "started_from", started_from),
        ("e.started_at <= :started_to", "started_to", started_to),
        ("v.event_id <> :exclude", "exclude", exclude_event_id),
    ):
        if value is not None:
            filters.append(clause)
            params[name] = value
    return filters, params


def _nearest_sql(filters: Sequence[str], *, exact: bool) -> str:
    """The top `:limit` by cosine distance in a materialized CTE, re-sorted outside it
    (relaxed order; ties by row id). `exact`: `+ 0` keeps the HNSW index out of the order."""
    distance = "(v.embedding_vector <=> CAST(:q AS vector))"
    order = f"{distance} + 0, v.id" if exact else distance
    return (
        f"WITH nearest AS MATERIALIZED (SELECT v.id, v.event_id, e.camera_id, e.started_at, e.label, "
        f"{distance} AS distance FROM event_embeddings v JOIN events e ON e.id = v.event_id "
        f"WHERE {' AND '.join(filters)} ORDER BY {order} LIMIT :limit) "
        "SELECT event_id, camera_id, started_at, label, 1 - distance AS similarity FROM nearest "
        "ORDER BY distance + 0, id"
    )
