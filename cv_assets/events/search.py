"""Similar-event and text search over stored event vectors.

On PostgreSQL with pgvector (migration 0004) both searches run in the database through
its HNSW index (`cv_assets/store/events.py: nearest_events`): nothing is held here. Elsewhere
(SQLite, vectors pgvector does not hold) they use the in-memory index below.

Vectors live in SQLite as JSON text (the inherited contract); parsing 100k of them takes
seconds, far too slow per query. So each process keeps one in-memory index per
(database, model_version): event ids, cameras, start times and a float32 matrix. A
query refreshes it incrementally and then does one matrix-vector product and an
argpartition for the top k. After a large load the index is also saved as a snapshot
next to the database (`<db file>.cache/event_vectors/`), so the next process (a CLI call) starts
from it instead of parsing JSON again.

Incremental refresh relies on how `cv_assets/store/events.py` writes: rows are never updated in
place; a new or re-embedded vector always gets a row id above every existing one. So:
- rows with id > the last id seen are the news; a re-embedded event's older row is
  marked dead in the index when its new row arrives;
- the last row seen is checked on every refresh ((event_id, created_at) of its id): if it
  is gone or different, ids may have been reused and the index reloads from scratch;
- deletions below it (an event deleted) are found by an index-only count, done at most
  every `CONSISTENCY_CHECK_SECONDS`; the missing rows are then marked dead. Until then a
  deleted event can only cost a result slot: results are fetched from the events table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy.orm import Session

from cv_assets.events.backfill import EventNotFoundError, cache_dir
from cv_assets.store.database import AppDatabase
from cv_assets.store.events import (
    EF_SEARCH,
    VECTOR_INDEX_DIMENSIONS,
    count_vectors,
    event_details,
    get_event,
    get_event_embedding_info,
    has_vector_index,
    indexed_event_vector,
    iter_vector_rows,
    nearest_events,
    newest_vector_row,
    vector_count_estimate,
    vector_row_ids,
)

log = logging.getLogger(__name__)

FETCH_ROWS = 4096  # rows parsed per chunk while loading: bounds the transient text memory
MAX_CACHED_INDEXES = 4  # (database, model_version) pairs kept per process
CONSISTENCY_CHECK_SECONDS = 2.0  # how stale a deletion may be in a busy process
SNAPSHOT_MIN_NEW_ROWS = 2000  # parsing fewer JSON rows than this is quicker than writing a snapshot
COMPACT_DEAD_FRACTION = 0.25  # drop dead rows from memory once they are this share of the matrix
RESULT_SLACK = 16  # extra candidates fetched so deleted-but-not-yet-noticed events never shorten results
_US_PER_DAY = 86_400 * 1_000_000
_SNAPSHOT_FORMAT = 1


class NoEmbeddingError(LookupError):
    """The event exists but has no vector yet (HTTP 404 in spirit)."""

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(f"event {event_id!r} has no embedding yet; run `cv-assets events backfill` first")


class TextSearchUnavailableError(RuntimeError):
    """The configured embedder cannot embed text (the colour-histogram fallback)."""


# ---------------------------------------------------------------- the in-memory index


class _RowsView:
    """The first `n` rows of one of the index's buffers (which have spare capacity)."""

    def __init__(self, buffer: str):
        self.buffer = buffer

    def __get__(self, index, owner=None):
        return self if index is None else getattr(index, self.buffer)[: index.n]


class EventVectorIndex:
    """One model version's event vectors, kept in memory and refreshed incrementally."""

    def __init__(self, url: str, model_version: str, snapshot: Path | None = None):
        self.url = url
        self.model_version = model_version
        self.snapshot = snapshot
        self.lock = threading.RLock()
        self.dim: int | None = None
        self._reset()
        self.full_loads = 0
        self.rows_parsed = 0  # JSON rows parsed by this process
        self.loaded_from_snapshot = False
        self.last_refresh_seconds = 0.0
        if snapshot is not None and snapshot.is_file():
            self._load_snapshot(snapshot)

    def _reset(self) -> None:
        self.n = 0
        self.dead = 0
        self.matrix = np.empty((0, self.dim or 0), dtype=np.float32)
        self.row_ids = np.empty(0, dtype=np.int64)
        self.started_us = np.empty(0, dtype=np.int64)
        self.camera_codes = np.empty(0, dtype=np.int32)
        self.alive = np.empty(0, dtype=bool)
        self.event_ids: list[str] = []
        self.cameras: list[str] = []
        self._camera_code: dict[str, int] = {}
        self.position: dict[str, int] = {}
        self._top_check: tuple[str, datetime] | None = None
        self._checked_at = float("-inf")
        self._unsaved_rows = 0
        # Bounds of started_us over every row held (dead ones included, so never too narrow).
        self.started_min = np.iinfo(np.int64).max
        self.started_max = np.iinfo(np.int64).min

    # -- views of the rows held (dead rows included; mask them with `live_mask`)
    vectors = _RowsView("matrix")
    camera_of_rows = _RowsView("camera_codes")
    started_of_rows = _RowsView("started_us")
    live_mask = _RowsView("alive")

    @property
    def live_count(self) -> int:
        return self.n - self.dead

    def camera_code(self, camera: str) -> int | None:
        return self._camera_code.get(camera)

    # -- refresh
    def refresh(self, session: Session) -> int:
        """Bring the index up to date; returns the number of rows loaded."""
        with self.lock:
            started = time.perf_counter()
            newest = None
            if self.n:
                top_unchanged, newest = self._check_top_row(session)
                if not top_unchanged:
                    self.full_loads += 1
                    self._reset()
            if self.n and time.monotonic() - self._checked_at >= CONSISTENCY_CHECK_SECONDS:
                self._drop_deleted_rows(session)
            # `newest` is the version's largest row id: when it is ours, nothing was added.
            loaded = self._load_after(session, self._top_id()) if newest is None or newest > self._top_id() else 0
            if self.dead > COMPACT_DEAD_FRACTION * max(self.n, 1):
                self._compact()
            if self._unsaved_rows >= SNAPSHOT_MIN_NEW_ROWS:
                self._save_snapshot()
            self.last_refresh_seconds = time.perf_counter() - started
            return loaded

    def _top_id(self) -> int:
        return int(self.row_ids[self.n - 1]) if self.n else 0

    def _check_top_row(self, session: Session) -> tuple[bool, int | None]:
        """(is the last row seen unchanged, the version's largest row id) in one statement;
        both are index lookups."""
        exists, newest, event_id, created_at = newest_vector_row(session, self.model_version, self._top_id())
        if not exists:  # the last row seen is gone
            return False, None
        return (event_id, created_at) == self._top_check, newest

    def _drop_deleted_rows(self, session: Session) -> None:
        top = self._top_id()
        if count_vectors(session, self.model_version, top) != self.live_count:
            present = vector_row_ids(session, self.model_version, top)
            gone = self.live_mask & ~np.isin(self.row_ids[: self.n], present)
            for position in np.flatnonzero(gone):
                self._kill(int(position))
        self._checked_at = time.monotonic()

    def _kill(self, position: int) -> None:
        if self.alive[position]:
            self.alive[position] = False
            self.dead += 1
            event_id = self.event_ids[position]
            if self.position.get(event_id) == position:
                del self.position[event_id]

    def _load_after(self, session: Session, watermark: int) -> int:
        if watermark == 0:
            self._reserve(count_vectors(session, self.model_version))
            self._checked_at = time.monotonic()  # a load from scratch is as fresh as a check
        loaded = 0
        for chunk in iter_vector_rows(session, self.model_version, watermark, FETCH_ROWS):
            loaded += self._append(chunk)
        self.rows_parsed += loaded
        self._unsaved_rows += loaded
        return loaded

    def _append(self, rows: Sequence) -> int:
        matrix, good = parse_vectors([row[2] for row in rows], self.dim)
        if len(good) < len(rows):
            bad = [rows[i][1] for i in sorted(set(range(len(rows))) - set(good))]
            log.warning("skipping %d unreadable %s vectors (events %s)", len(bad), self.model_version, bad[:10])
        if not len(good):
            return 0
        if self.dim is None:
            self.dim = matrix.shape[1]
            self.matrix = np.empty((len(self.row_ids), self.dim), dtype=np.float32)  # capacity reserved so far
        rows = [rows[i] for i in good]
        count = len(rows)
        self._reserve(self.n + count)
        end = self.n + count
        self.matrix[self.n:end] = matrix
        self.row_ids[self.n:end] = [row[0] for row in rows]
        self.started_us[self.n:end] = np.array([row[5] for row in rows], dtype="datetime64[us]").astype(np.int64)
        self._widen_started_bounds(self.started_us[self.n:end])
        self.camera_codes[self.n:end] = [self._code_for(row[4]) for row in rows]
        self.alive[self.n:end] = True
        for offset, row in enumerate(rows):
            previous = self.position.get(row[1])
            if previous is not None:  # re-embedded: its older row is superseded
                self._kill(previous)
            self.position[row[1]] = self.n + offset
        self.event_ids.extend(row[1] for row in rows)
        self._top_check = (rows[-1][1], rows[-1][3])
        self.n = end
        return count

    def _widen_started_bounds(self, started: np.ndarray) -> None:
        if len(started):
            self.started_min = min(self.started_min, int(started.min()))
            self.started_max = max(self.started_max, int(started.max()))

    def _code_for(self, camera: str) -> int:
        code = self._camera_code.get(camera)
        if code is None:
            code = self._camera_code[camera] = len(self.cameras)
            self.cameras.append(camera)
        return code

    def _reserve(self, rows: int) -> None:
        """Grow the buffers geometrically so appends are amortised O(1)."""
        capacity = len(self.row_ids)
        if rows <= capacity:
            return
        capacity = max(rows, int(capacity * 1.5), 1024)
        self.row_ids = _grown(self.row_ids, capacity, self.n)
        self.started_us = _grown(self.started_us, capacity, self.n)
        self.camera_codes = _grown(self.camera_codes, capacity, self.n)
        self.alive = _grown(self.alive, capacity, self.n)
        if self.dim is not None:
            self.matrix = _grown(self.matrix, capacity, self.n)

    def _compact(self) -> None:
        keep = np.flatnonzero(self.live_mask)
        count = len(keep)
        self.matrix[:count] = self.matrix[keep]
        self.row_ids[:count] = self.row_ids[keep]
        self.started_us[:count] = self.started_us[keep]
        self.camera_codes[:count] = self.camera_codes[keep]
        self.alive[:count] = True
        self.event_ids = [self.event_ids[i] for i in keep]
        self.position = {event_id: i for i, event_id in enumerate(self.event_ids)}
        self.n, self.dead = count, 0

    # -- snapshots
    def _save_snapshot(self) -> None:
        """Write the live rows next to the database (atomically); a failure only costs speed."""
        if self.snapshot is None or self.dim is None or self._top_check is None:
            return
        self._compact()
        try:
            self.snapshot.parent.mkdir(parents=True, exist_ok=True)
            partial = self.snapshot.with_name(f"{self.snapshot.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(partial, "wb") as handle:
                np.savez(
                    handle,
                    format=np.array([_SNAPSHOT_FORMAT]),
                    header=_text_array({"model_version": self.model_version, "top_event": self._top_check[0],
                                        "top_created_at": self._top_check[1].isoformat(), "cameras": self.cameras,
                                        "event_ids": self.event_ids}),
                    matrix=self.vectors, row_ids=self.row_ids[: self.n], started_us=self.started_of_rows,
                    camera_codes=self.camera_of_rows,
                )
            os.replace(partial, self.snapshot)
            self._unsaved_rows = 0
        except OSError as exc:
            log.info("could not save the vector snapshot %s: %s", self.snapshot, exc)

    def _load_snapshot(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"][0]) != _SNAPSHOT_FORMAT:
                    return
                header = json.loads(bytes(data["header"]).decode())
                if header["model_version"] != self.model_version:
                    return
                matrix = data["matrix"]
                arrays = (data["row_ids"], data["started_us"], data["camera_codes"])
            count = len(header["event_ids"])
            if matrix.shape[0] != count or any(len(a) != count for a in arrays) or count == 0:
                return
        except (OSError, ValueError, KeyError) as exc:
            log.info("ignoring the vector snapshot %s: %s", path, exc)
            return
        self.dim = matrix.shape[1]
        self.matrix, (self.row_ids, self.started_us, self.camera_codes) = matrix, arrays
        self.alive = np.ones(count, dtype=bool)
        self.event_ids = header["event_ids"]
        self.cameras = header["cameras"]
        self._camera_code = {camera: code for code, camera in enumerate(self.cameras)}
        self.position = {event_id: i for i, event_id in enumerate(self.event_ids)}
        self._top_check = (header["top_event"], datetime.fromisoformat(header["top_created_at"]))
        self._widen_started_bounds(self.started_us)
        self.n = count
        self.loaded_from_snapshot = True


def _text_array(document: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


def parse_vectors(texts: Sequence[str], dim: int | None) -> tuple[np.ndarray, list[int]]:
    """Parse JSON float arrays into unit-norm float32 rows; returns (matrix, indices parsed).

    The fast path hands all rows to pandas' C CSV parser (about 3x faster than json.loads);
    a malformed row sends the chunk through json.loads one by one so only that row is lost.
    """
    if not texts:
        return np.empty((0, dim or 0), dtype=np.float32), []
    try:
        body = "\n".join(text.strip()[1:-1] for text in texts)
        matrix = pd.read_csv(io.StringIO(body), header=None, dtype=np.float32, engine="c").to_numpy()
        if matrix.shape[0] != len(texts) or (dim is not None and matrix.shape[1] != dim) or not np.isfinite(matrix).all():
            raise ValueError("ragged or non-finite vectors")
        good = list(range(len(texts)))
    except (ValueError, pd.errors.ParserError):
        matrix, good = _parse_one_by_one(texts, dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    keep = (norms[:, 0] > 0)
    if not keep.all():
        matrix, good = matrix[keep], [g for g, k in zip(good, keep) if k]
        norms = norms[keep]
    return (matrix / norms).astype(np.float32, copy=False), good


def _parse_one_by_one(texts: Sequence[str], dim: int | None) -> tuple[np.ndarray, list[int]]:
    vectors, good = [], []
    for index, text in enumerate(texts):
        try:
            vector = np.asarray(json.loads(text), dtype=np.float32)
        except (ValueError, TypeError):
            continue
        if vector.ndim != 1 or not np.isfinite(vector).all():
            continue
        if dim is None:
            dim = vector.shape[0]
        if vector.shape[0] == dim:
            vectors.append(vector)
            good.append(index)
    if not vectors:
        return np.empty((0, dim or 0), dtype=np.float32), []
    return np.stack(vectors), good


_INDEXES: OrderedDict[tuple[str, str], EventVectorIndex] = OrderedDict()
_INDEXES_GUARD = threading.Lock()


def snapshot_path(db: AppDatabase, model_version: str) -> Path | None:
    """Where the index of `model_version` is saved between processes (None: in-memory database)."""
    directory = cache_dir(db)
    if directory is None:
        return None
    digest = hashlib.sha256(model_version.encode()).hexdigest()[:16]
    return directory / "event_vectors" / f"{digest}.npz"


def vector_index(
    db: AppDatabase, model_version: str, session: Session | None = None, *, use_snapshot: bool = True
) -> EventVectorIndex:
    """This process's index of `model_version` vectors in `db`, refreshed now."""
    key = (db.url, model_version)
    with _INDEXES_GUARD:
        index = _INDEXES.get(key)
        if index is None:
            snapshot = snapshot_path(db, model_version) if use_snapshot else None
            index = _INDEXES[key] = EventVectorIndex(db.url, model_version, snapshot)
        _INDEXES.move_to_end(key)
        while len(_INDEXES) > MAX_CACHED_INDEXES:
            _INDEXES.popitem(last=False)
    if session is not None:
        index.refresh(session)
    else:
        with db.read() as own_session:
            index.refresh(own_session)
    return index


def clear_vector_indexes() -> None:
    """Forget every cached index (tests, benchmarks, or after restoring a database)."""
    with _INDEXES_GUARD:
        _INDEXES.clear()


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class Match:
    event_id: str
    camera_id: str
    started_at: datetime
    label: str | None
    similarity: float

    def as_dict(self) -> dict:
        return {"event_id": self.event_id, "camera_id": self.camera_id,
                "started_at": self.started_at.isoformat(timespec="seconds"), "label": self.label,
                "similarity": round(self.similarity, 4)}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores, best first."""
    if k <= 0 or scores.size == 0:
        return np.empty(0, dtype=np.int64)
    if k < scores.size:
        candidates = np.argpartition(scores, scores.size - k)[scores.size - k:]
    else:
        candidates = np.arange(scores.size)
    ordered = candidates[np.argsort(-scores[candidates], kind="stable")]
    return ordered[np.isfinite(scores[ordered])]


def _ranked(
    index: EventVectorIndex,
    query: np.ndarray,
    *,
    limit: int,
    min_similarity: float | None,
    camera: str | None,
    window_us: tuple[int, int] | None,
    exclude_position: int | None,
) -> list[tuple[str, float]]:
    """(event_id, similarity) of the best rows, a few more than `limit` (see RESULT_SLACK);
    call with `index.lock` held."""
    if index.live_count == 0:
        return []
    scores = index.vectors @ query
    if index.dead:
        np.copyto(scores, -np.inf, where=~index.live_mask)
    if exclude_position is not None:
        scores[exclude_position] = -np.inf
    if camera is not None:
        code = index.camera_code(camera)
        if code is None:
            return []
        np.copyto(scores, -np.inf, where=index.camera_of_rows != code)
    if window_us is not None:
        started = index.started_of_rows
        if index.started_min < window_us[0] or index.started_max > window_us[1]:  # skip when it holds every row
            outside = started < window_us[0]
            outside |= started > window_us[1]
            np.copyto(scores, -np.inf, where=outside)
    picked = top_k(scores, limit + RESULT_SLACK)
    if min_similarity is not None:
        picked = picked[scores[picked] >= min_similarity]
    return [(index.event_ids[i], float(scores[i])) for i in picked]


def _matches(session: Session, ranked: list[tuple[str, float]], limit: int) -> list[Match]:
    """The best `limit` candidates that still exist, with their details from `events`."""
    if not ranked:
        return []
    ids = [event_id for event_id, _ in ranked]
    details = event_details(session, ids)
    return [
        Match(event_id, details[event_id].camera_id, details[event_id].started_at, details[event_id].label, score)
        for event_id, (_, score) in zip(ids, ranked)
        if event_id in details  # deleted since the index last checked
    ][:limit]


@dataclass(frozen=True)
class SearchResult:
    """Matches of one query; `as_dict` names the query by its first field."""

    model_version: str
    matches: list[Match]
    searched: int
    # True where `searched` is PostgreSQL's estimate (large tables; an exact count would cost
    # more than the index search itself).
    searched_is_estimate: bool = False

    def as_dict(self) -> dict:
        query = {name: getattr(self, name) for name in ("event_id", "text") if hasattr(self, name)}
        return {**query, "model_version": self.model_version, "searched": self.searched,
                "searched_is_estimate": self.searched_is_estimate, "matches": [m.as_dict() for m in self.matches]}

    @property
    def searched_text(self) -> str:
        return f"{'about ' if self.searched_is_estimate else ''}{self.searched} vectors searched"


@dataclass(frozen=True)
class SimilarResult(SearchResult):
    event_id: str = ""


def similar_events(
    db: AppDatabase,
    event_id: str,
    *,
    limit: int = 10,
    min_similarity: float = 0.7,
    days: int | None = 30,
    camera: str | None = None,
    ef_search: int = EF_SEARCH,
) -> SimilarResult:
    """Events whose thumbnails look like this event's, best first.

    Only vectors of the event's own model_version are compared; the event itself is left
    out; `ef_search` is the HNSW candidate list on PostgreSQL (`events.hnsw_ef_search`);
    `days` keeps events that started within that many days of this one (None or 0:
    no window); `camera` keeps one camera. Nothing qualifying is an empty list.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    with db.read() as session:
        vector = get_event_embedding_info(session, event_id)
        if vector is None:
            raise NoEmbeddingError(event_id) if get_event(session, event_id) else EventNotFoundError(event_id)
        own = vector.model_version
        own_vector = indexed_event_vector(session, event_id) if has_vector_index(session) else None
        if own_vector is not None:
            started_from = started_to = None
            if days:
                started = get_event(session, event_id).started_at
                started_from, started_to = started - timedelta(days=days), started + timedelta(days=days)
            matches, searched, estimated = _pgvector_search(
                session, own, own_vector, limit=limit, min_similarity=min_similarity, camera=camera,
                started_from=started_from, started_to=started_to, exclude=event_id, ef_search=ef_search,
            )
            return SimilarResult(own, matches, searched, estimated, event_id=event_id)
        # One read transaction for lookup, refresh and details: a consistent view, one round of set-up.
        index = vector_index(db, own, session)
        with index.lock:
            position = index.position.get(event_id)
            if position is None:  # its vector was unreadable when loaded
                raise NoEmbeddingError(event_id)
            window = None
            if days:
                anchor = int(index.started_us[position])
                window = (anchor - days * _US_PER_DAY, anchor + days * _US_PER_DAY)
            ranked = _ranked(
                index, index.vectors[position], limit=limit, min_similarity=min_similarity, camera=camera,
                window_us=window, exclude_position=position,
            )
            searched = index.live_count
        matches = _matches(session, ranked, limit)
    return SimilarResult(own, matches, searched, event_id=event_id)


def _pgvector_search(
    session: Session,
    model_version: str,
    query: np.ndarray,
    *,
    limit: int,
    min_similarity: float | None,
    camera: str | None,
    started_from: datetime | None = None,
    started_to: datetime | None = None,
    exclude: str | None = None,
    ef_search: int = EF_SEARCH,
) -> tuple[list[Match], int, bool]:
    """(matches, vectors searched, whether that count is an estimate) from pgvector's HNSW
    index: nothing held in this process, and the filters run inside the index scan."""
    rows = nearest_events(session, model_version, query, limit, camera=camera, started_from=started_from,
                          started_to=started_to, exclude_event_id=exclude, min_similarity=min_similarity,
                          ef_search=ef_search)
    matches = [Match(row.event_id, row.camera_id, row.started_at, row.label, float(row.similarity)) for row in rows]
    searched, exact = vector_count_estimate(session, model_version)
    return matches, searched, not exact


@dataclass(frozen=True)
class TextSearchResult(SearchResult):
    text: str = ""


def search_events_by_text(
    db: AppDatabase,
    embedder,
    text: str,
    *,
    limit: int = 10,
    min_similarity: float | None = None,
    camera: str | None = None,
    since: datetime | None = None,
    ef_search: int = EF_SEARCH,
) -> TextSearchResult:
    """Event thumbnails that match a text description (CLIP text-image similarity).

    CLIP text-to-image cosines are much lower than image-to-image ones (about 0.2-0.35
    for a good match), so by default no similarity floor is applied: the best `limit`
    are returned.
    """
    if not text or not text.strip():
        raise ValueError("search text is empty")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    family = getattr(embedder, "family", None)
    if family == "color_histogram":
        raise TextSearchUnavailableError(_no_text_message(embedder))
    try:
        query = np.asarray(embedder.embed_texts([text.strip()]), dtype=np.float32)[0]
    except NotImplementedError:
        raise TextSearchUnavailableError(_no_text_message(embedder)) from None
    query = query / (np.linalg.norm(query) or 1.0)
    with db.read() as session:
        if query.shape[0] == VECTOR_INDEX_DIMENSIONS and has_vector_index(session):
            matches, searched, estimated = _pgvector_search(
                session, embedder.model_version, query, limit=limit, min_similarity=min_similarity, camera=camera,
                started_from=since, ef_search=ef_search)
            return TextSearchResult(embedder.model_version, matches, searched, estimated, text=text)
        index = vector_index(db, embedder.model_version, session)
        with index.lock:
            window = (int(np.datetime64(since, "us").astype(np.int64)), np.iinfo(np.int64).max) if since else None
            ranked = _ranked(index, query, limit=limit, min_similarity=min_similarity, camera=camera,
                             window_us=window, exclude_position=None)
            searched = index.live_count
        matches = _matches(session, ranked, limit)
    return TextSearchResult(embedder.model_version, matches, searched, text=text)


def _no_text_message(embedder) -> str:
    return (
        f"text search needs a CLIP embedder, but the configured embedder is "
        f"{getattr(embedder, 'family', type(embedder).__name__)!r} (model_version "
        f"{getattr(embedder, 'model_version', '?')}), which cannot embed text. Point embedder.model at local "
        f"CLIP weights (a directory saved with save_pretrained) and re-run the backfill with --mode all."
    )

