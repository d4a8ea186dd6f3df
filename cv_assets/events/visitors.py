"""Recurring visitors: embedded events grouped into entities by thumbnail similarity.

Incremental by default: each new event (oldest first) joins the entity whose centroid is
nearest, when that similarity reaches the threshold, or starts a new entity. A centroid is
the normalised mean of its members' vectors, recomputed from the vectors themselves (the
unit-norm centroid alone cannot be updated exactly). Leader-style assignment depends on
arrival order, so a full re-cluster (the nightly run) adds a few k-means-like passes:
every event moves to its nearest centroid when that is above the threshold, the rest are
re-seeded, until the grouping stops changing.

Only one model version's vectors are ever grouped (the current one: the version the
embedding backfill wrote last); entities of other versions are dropped, since their
events now belong to the current version's grouping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from cv_assets.events.search import vector_index
from cv_assets.store import visitors as store
from cv_assets.store.database import AppDatabase
from cv_assets.store.events import latest_event_model_version
from cv_assets.store.models import utcnow
from cv_assets.store.vectors import vector_to_json
from cv_assets.text import markdown_table
REFINE_ITERATIONS = 5  # passes after the leader pass; well-separated groups settle in 1-2
SIMILARITY_CHUNK = 8192  # rows per block when comparing all events with all centroids
WRITE_RETRIES = 3  # optimistic write: recompute when another run changed the entities meanwhile


class VisitorsConflictError(RuntimeError):
    """Another run kept changing the entities while this one computed."""


# ---------------------------------------------------------------- clustering (pure numpy)


def _normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def assign_incrementally(
    vectors: np.ndarray,
    threshold: float,
    sums: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leader assignment of `vectors` (in the given order) to existing groups (`sums` of
    member vectors, `counts`) or new ones. Returns (labels, sums, counts); labels index
    into the returned groups, existing groups keep their positions."""
    vectors = np.asarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else (sums.shape[1] if sums is not None else 0)
    k = 0 if counts is None else len(counts)
    capacity = max(k + min(len(vectors), 1024), 1)
    group_sums = np.zeros((capacity, dim), dtype=np.float64)
    group_counts = np.zeros(capacity, dtype=np.int64)
    if k:
        group_sums[:k] = sums
        group_counts[:k] = counts
    centroids = np.zeros((capacity, dim), dtype=np.float32)
    centroids[:k] = _normalised(group_sums[:k])
    labels = np.empty(len(vectors), dtype=np.int64)
    for i, vector in enumerate(vectors):
        if k:
            sims = centroids[:k] @ vector
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                group_sums[best] += vector
                group_counts[best] += 1
                centroids[best] = _normalised(group_sums[best])
                labels[i] = best
                continue
        if k == capacity:
            capacity *= 2
            group_sums = np.resize(group_sums, (capacity, dim))
            group_counts = np.resize(group_counts, capacity)
            centroids = np.resize(centroids, (capacity, dim))
        group_sums[k] = vector
        group_counts[k] = 1
        centroids[k] = vector
        labels[i] = k
        k += 1
    return labels, group_sums[:k], group_counts[:k]


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0..k-1 in order of first appearance (so two groupings compare equal
    exactly when they partition the events the same way)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]


def _group_sums(vectors: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sums = np.zeros((k, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, vectors)
    return sums, np.bincount(labels, minlength=k)


def nearest_groups(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity) of each vector's nearest centroid, in memory-bounded blocks."""
    best = np.empty(len(vectors), dtype=np.int64)
    best_sim = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), SIMILARITY_CHUNK):
        sims = vectors[start:start + SIMILARITY_CHUNK] @ centroids.T
        best[start:start + SIMILARITY_CHUNK] = np.argmax(sims, axis=1)
        best_sim[start:start + SIMILARITY_CHUNK] = sims[np.arange(len(sims)), best[start:start + SIMILARITY_CHUNK]]
    return best, best_sim


def cluster_all(vectors: np.ndarray, threshold: float, iterations: int = REFINE_ITERATIONS) -> np.ndarray:
    """Group every vector from scratch: a leader pass, then refinement passes."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors) == 0:
        return np.empty(0, dtype=np.int64)
    labels = _canonical(assign_incrementally(vectors, threshold)[0])
    for _ in range(iterations):
        sums, counts = _group_sums(vectors, labels, int(labels.max()) + 1)
        centroids = _normalised(sums[counts > 0]).astype(np.float32)
        best, best_sim = nearest_groups(vectors, centroids)
        close = best_sim >= threshold
        refined = np.where(close, best, -1)
        if not close.all():
            kept_sums, kept_counts = _group_sums(vectors[close], best[close], len(centroids))
            leftover, _, _ = assign_incrementally(vectors[~close], threshold, kept_sums, kept_counts)
            refined[~close] = leftover
        refined = _canonical(refined)
        if np.array_equal(refined, labels):
            break
        labels = refined
    return labels


# ---------------------------------------------------------------- the database side


@dataclass
class VisitorsReport:
    model_version: str | None
    mode: str  # incremental | full
    events_considered: int = 0
    new_events: int = 0
    new_entities: int = 0
    entities_total: int = 0
    entities_reported: int = 0
    events_in_reported: int = 0
    seconds: float = 0.0
    top: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Group:
    entity_id: int | None
    members: list[int]  # positions in the vector index
    stored_count: int = 0  # event_count in the database before this run


def update_recurring_visitors(
    db: AppDatabase,
    *,
    threshold: float,
    min_events: int,
    full_recluster: bool = False,
    model_version: str | None = None,
    top_limit: int = 10,
) -> VisitorsReport:
    """Fold newly embedded events into entities (or re-cluster all) and store the result."""
    started = time.perf_counter()
    with db.read() as session:
        version = model_version or latest_event_model_version(session)
    report = VisitorsReport(version, "full" if full_recluster else "incremental")
    if version is None:
        return report
    for _ in range(WRITE_RETRIES):
        with db.read() as session:
            fingerprint = store.state_fingerprint(session)
            memberships = store.memberships(session, version)
            stored_counts = store.entity_event_counts(session, version)
            index = vector_index(db, version, session)
        with index.lock:
            live = np.flatnonzero(index.live_mask)
            vectors = index.vectors[live]
            event_ids = [index.event_ids[i] for i in live]
            cameras = [index.cameras[c] for c in index.camera_of_rows[live]]
            started_us = index.started_of_rows[live]
        position = {event_id: i for i, event_id in enumerate(event_ids)}
        if full_recluster:
            groups, new_positions = _full_groups(vectors, started_us, event_ids, threshold)
        else:
            groups, new_positions = _incremental_groups(
                vectors, started_us, event_ids, position, memberships, stored_counts, threshold
            )
        with db.write() as session:
            if store.state_fingerprint(session) != fingerprint:
                continue
            new_entities = _write_groups(
                session, version, groups, vectors, event_ids, cameras, started_us, full_recluster, set(new_positions)
            )
        report.events_considered = len(event_ids)
        report.new_events = len(new_positions)
        report.new_entities = new_entities
        break
    else:
        raise VisitorsConflictError(
            f"recurring visitors of {version} changed during {WRITE_RETRIES} attempts to update them; retry the run"
        )
    top = list_recurring_visitors(db, min_events=min_events, model_version=version)
    with db.read() as session:
        report.entities_total = store.count_entities(session, version)
    report.entities_reported = len(top)
    report.events_in_reported = sum(entity["event_count"] for entity in top)
    report.top = top[:top_limit]
    report.seconds = time.perf_counter() - started
    return report


def _time_order(started_us: np.ndarray, event_ids: Sequence[str], positions: Sequence[int]) -> list[int]:
    return sorted(positions, key=lambda p: (started_us[p], event_ids[p]))


def _full_groups(vectors, started_us, event_ids, threshold) -> tuple[list[_Group], list[int]]:
    order = _time_order(started_us, event_ids, range(len(event_ids)))
    labels = cluster_all(vectors[order], threshold) if order else np.empty(0, dtype=np.int64)
    groups = [_Group(None, []) for _ in range(int(labels.max()) + 1 if len(labels) else 0)]
    for pos, label in zip(order, labels):
        groups[label].members.append(pos)
    return groups, order


def _incremental_groups(vectors, started_us, event_ids, position, memberships, stored_counts, threshold):
    members: dict[int, list[int]] = {entity_id: [] for entity_id in stored_counts}
    assigned: set[str] = set()
    for entity_id, event_id in memberships:
        assigned.add(event_id)
        if event_id in position:  # a member whose vector is gone drops out of its entity
            members[entity_id].append(position[event_id])
    groups = [_Group(entity_id, sorted(pos), stored_counts[entity_id]) for entity_id, pos in members.items()]
    new_positions = _time_order(started_us, event_ids, [p for e, p in position.items() if e not in assigned])
    live = [g for g in groups if g.members]
    sums = np.stack([vectors[g.members].sum(axis=0, dtype=np.float64) for g in live]) if live else None
    counts = np.array([len(g.members) for g in live], dtype=np.int64) if live else None
    if new_positions:
        labels, _, _ = assign_incrementally(vectors[new_positions], threshold, sums, counts)
        for pos, label in zip(new_positions, labels):
            if label < len(live):
                live[label].members.append(pos)
            else:
                while label >= len(live):
                    live.append(_Group(None, []))
                    groups.append(live[-1])
                live[label].members.append(pos)
    return groups, new_positions


def _entity_values(group: _Group, vectors, cameras, started_us) -> dict:
    centroid = _normalised(vectors[group.members].sum(axis=0, dtype=np.float64)).astype(np.float32)
    times = started_us[group.members]
    return {
        "centroid": vector_to_json(centroid),
        "event_count": len(group.members),
        "first_seen": _datetime(times.min()),
        "last_seen": _datetime(times.max()),
        "cameras": json.dumps(sorted({cameras[p] for p in group.members})),
        "updated_at": utcnow(),
        "_centroid": centroid,
    }


def _write_groups(session, version, groups, vectors, event_ids, cameras, started_us, full, new_positions) -> int:
    store.delete_entities(session, other_than_version=version, version=version if full else None)
    new_entities = 0
    for group in groups:
        if not group.members:
            if group.entity_id is not None:
                store.delete_entities(session, entity_id=group.entity_id)
            continue
        changed = (
            full
            or group.entity_id is None
            or len(group.members) != group.stored_count
            or any(p in new_positions for p in group.members)
        )
        if not changed:
            continue
        values = _entity_values(group, vectors, cameras, started_us)
        centroid = values.pop("_centroid")
        new_entities += group.entity_id is None
        similarity = vectors[group.members] @ centroid
        group.entity_id = store.save_entity(
            session, group.entity_id, version, values,
            [(event_ids[p], float(s)) for p, s in zip(group.members, similarity)],
        )
    return new_entities


def _datetime(microseconds) -> datetime:
    return np.datetime64(int(microseconds), "us").astype(datetime)


# ---------------------------------------------------------------- queries


def list_recurring_visitors(
    db: AppDatabase, *, min_events: int, model_version: str | None = None, limit: int | None = None
) -> list[dict]:
    """Entities seen at least `min_events` times, most frequent first."""
    with db.read() as session:
        version = model_version or latest_event_model_version(session)
        if version is None:
            return []
        rows = store.recurring_entities(session, version, min_events, limit)
        members = store.entity_members(session, [row.id for row in rows])
    return [
        {"entity_id": row.id, "event_count": row.event_count,
         "first_seen": row.first_seen.isoformat(timespec="seconds") if row.first_seen else None,
         "last_seen": row.last_seen.isoformat(timespec="seconds") if row.last_seen else None,
         "cameras": json.loads(row.cameras), "event_ids": members[row.id], "model_version": version}
        for row in rows
    ]


def visitors_table(entities: Sequence[dict]) -> str:
    return markdown_table(
        ["entity", "events", "first seen", "last seen", "cameras"],
        [(e["entity_id"], e["event_count"], e["first_seen"], e["last_seen"], ", ".join(e["cameras"])) for e in entities],
    )
