"""Recurring visitors: grouping similar events into entities, incrementally and from scratch."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import delete, func, select
from helpers.events import T0, add_events, new_db

from cv_assets.events.search import clear_vector_indexes
from cv_assets.events.visitors import (
    assign_incrementally,
    cluster_all,
    list_recurring_visitors,
    update_recurring_visitors,
)
from cv_assets.store.events import write_event_embeddings
from cv_assets.store.models import EntityEvent, Event, RecognizedEntity

THRESHOLD = 0.75


@pytest.fixture
def db(tmp_path):
    return new_db(tmp_path)


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


def synthetic_clusters(sizes, seed=0, spread=0.35):
    """Well-separated groups: random directions in 512-d (nearly orthogonal) plus noise
    whose norm is `spread`; members of one group have cosine ~0.9, of two groups ~0."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), 512))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors, labels = [], []
    for label, size in enumerate(sizes):
        noise = rng.standard_normal((size, 512))
        noise *= spread / np.linalg.norm(noise, axis=1, keepdims=True)
        members = centres[label] + noise
        vectors.append(members / np.linalg.norm(members, axis=1, keepdims=True))
        labels += [label] * size
    return np.concatenate(vectors).astype(np.float32), np.array(labels)


def same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------- pure clustering


def test_cluster_all_recovers_well_separated_groups_in_any_order():
    vectors, truth = synthetic_clusters([12, 7, 5, 2, 1])
    labels = cluster_all(vectors, THRESHOLD)
    assert same_partition(labels, truth)
    order = np.random.default_rng(3).permutation(len(vectors))
    assert same_partition(cluster_all(vectors[order], THRESHOLD), truth[order])


def test_assign_incrementally_joins_existing_groups_or_starts_new_ones():
    vectors, truth = synthetic_clusters([6, 6, 3], seed=1)
    first = truth < 2
    labels, sums, counts = assign_incrementally(vectors[first], THRESHOLD)
    assert same_partition(labels, truth[first]) and counts.tolist() == [6, 6]
    later, later_sums, later_counts = assign_incrementally(vectors[~first], THRESHOLD, sums, counts)
    assert set(later.tolist()) == {2} and later_counts.tolist() == [6, 6, 3]
    again, _, again_counts = assign_incrementally(vectors[:2], THRESHOLD, later_sums, later_counts)
    assert again.tolist() == [labels[0], labels[1]] and again_counts.tolist() == [8, 6, 3]


def test_empty_input():
    assert cluster_all(np.zeros((0, 512), dtype=np.float32), THRESHOLD).size == 0
    labels, sums, counts = assign_incrementally(np.zeros((0, 512), dtype=np.float32), THRESHOLD)
    assert labels.size == 0 and counts.size == 0


# ---------------------------------------------------------------- stored entities


def store(db, vectors, truth, *, version="v1", prefix="e", start=0, cameras=("front_door", "garage")):
    rows, by_id = [], {}
    for i, (vector, label) in enumerate(zip(vectors, truth), start=start):
        event_id = f"{prefix}{i:04d}"
        rows.append({"id": event_id, "camera_id": cameras[i % len(cameras)],
                     "started_at": T0 + timedelta(hours=i), "label": f"group{label}", "thumbnail_base64": "x"})
        by_id[event_id] = vector
    add_events(db, rows)
    with db.write() as session:
        write_event_embeddings(session, version, by_id)
    return list(by_id)


def groups_in_db(db) -> dict[int, set[str]]:
    with db.read() as session:
        groups: dict[int, set[str]] = {}
        for entity_id, event_id in session.execute(select(EntityEvent.entity_id, EntityEvent.event_id)):
            groups.setdefault(entity_id, set()).add(event_id)
    return groups


def expected_groups(ids, truth) -> set[frozenset]:
    found: dict[int, set] = {}
    for event_id, label in zip(ids, truth):
        found.setdefault(int(label), set()).add(event_id)
    return {frozenset(g) for g in found.values()}


def test_first_run_groups_events_and_reports_recurring_ones(db):
    vectors, truth = synthetic_clusters([5, 4, 3, 2, 1])
    ids = store(db, vectors, truth)
    report = update_recurring_visitors(db, threshold=THRESHOLD, min_events=3)
    assert {frozenset(g) for g in groups_in_db(db).values()} == expected_groups(ids, truth)
    assert report.model_version == "v1" and report.mode == "incremental"
    assert report.events_considered == 15 and report.new_events == 15
    assert report.new_entities == 5 and report.entities_total == 5
    assert report.entities_reported == 3 and report.events_in_reported == 12
    top = report.top
    assert [e["event_count"] for e in top] == [5, 4, 3]
    biggest = top[0]
    members = sorted(i for i, label in zip(ids, truth) if label == 0)
    assert biggest["event_ids"] == members
    assert biggest["first_seen"] == (T0 + timedelta(hours=ids.index(members[0]))).isoformat()
    assert biggest["last_seen"] == (T0 + timedelta(hours=ids.index(members[-1]))).isoformat()
    assert biggest["cameras"] == ["front_door", "garage"]
    with db.read() as session:
        entity = session.get(RecognizedEntity, biggest["entity_id"])
        centroid = np.asarray(json.loads(entity.centroid), dtype=np.float32)
        sims = session.execute(select(EntityEvent.event_id, EntityEvent.similarity)
                               .where(EntityEvent.entity_id == entity.id)).all()
    assert abs(np.linalg.norm(centroid) - 1) < 1e-5
    expected_centroid = vectors[truth == 0].sum(axis=0)
    expected_centroid /= np.linalg.norm(expected_centroid)
    assert np.allclose(centroid, expected_centroid, atol=1e-5)
    for event_id, similarity in sims:
        assert abs(similarity - float(vectors[ids.index(event_id)] @ centroid)) < 1e-4
    assert list_recurring_visitors(db, min_events=5) == [top[0]]


def test_new_events_join_existing_entities_or_form_new_ones(db):
    vectors, truth = synthetic_clusters([6, 6, 6], seed=2)
    first = np.isin(np.arange(len(truth)), np.concatenate([np.arange(0, 4), np.arange(6, 10)]))
    ids_first = store(db, vectors[first], truth[first])
    update_recurring_visitors(db, threshold=THRESHOLD, min_events=3)
    before = groups_in_db(db)
    assert len(before) == 2
    ids_later = store(db, vectors[~first], truth[~first], prefix="n", start=100)
    report = update_recurring_visitors(db, threshold=THRESHOLD, min_events=3)
    assert report.new_events == 10 and report.new_entities == 1 and report.entities_total == 3
    after = groups_in_db(db)
    for entity_id, members in before.items():
        assert members < after[entity_id]  # same entity, grown
    all_ids = ids_first + ids_later
    all_truth = np.concatenate([truth[first], truth[~first]])
    assert {frozenset(g) for g in after.values()} == expected_groups(all_ids, all_truth)
    quiet = update_recurring_visitors(db, threshold=THRESHOLD, min_events=3)
    assert quiet.new_events == 0 and groups_in_db(db) == after


def test_full_recluster_rebuilds_the_same_grouping(db):
    vectors, truth = synthetic_clusters([4, 4, 4], seed=3)
    ids = store(db, vectors, truth)
    update_recurring_visitors(db, threshold=THRESHOLD, min_events=2)
    report = update_recurring_visitors(db, threshold=THRESHOLD, min_events=2, full_recluster=True)
    assert report.mode == "full" and report.new_entities == 3 and report.entities_total == 3
    assert {frozenset(g) for g in groups_in_db(db).values()} == expected_groups(ids, truth)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(EntityEvent)) == len(ids)


def test_deleted_events_leave_their_entities(db):
    vectors, truth = synthetic_clusters([4, 1], seed=4)
    ids = store(db, vectors, truth)
    update_recurring_visitors(db, threshold=THRESHOLD, min_events=1)
    lone = next(i for i, label in zip(ids, truth) if label == 1)
    gone = next(i for i, label in zip(ids, truth) if label == 0)
    with db.write() as session:
        session.execute(delete(Event).where(Event.id.in_([lone, gone])))
    update_recurring_visitors(db, threshold=THRESHOLD, min_events=1)
    visitors = list_recurring_visitors(db, min_events=1)
    assert [v["event_count"] for v in visitors] == [3]
    assert gone not in visitors[0]["event_ids"]


def test_only_the_current_model_versions_vectors_are_grouped(db):
    vectors, truth = synthetic_clusters([3, 3], seed=5)
    store(db, vectors, truth, version="v1")
    update_recurring_visitors(db, threshold=THRESHOLD, min_events=2)
    other, other_truth = synthetic_clusters([2, 2, 2], seed=6)
    new_ids = store(db, other, other_truth, version="v2", prefix="w")
    report = update_recurring_visitors(db, threshold=THRESHOLD, min_events=2)
    assert report.model_version == "v2" and report.events_considered == 6 and report.entities_total == 3
    with db.read() as session:
        versions = session.execute(select(RecognizedEntity.model_version).distinct()).scalars().all()
    assert versions == ["v2"]
    assert {frozenset(g) for g in groups_in_db(db).values()} == expected_groups(new_ids, other_truth)


def test_nothing_embedded_yet(db):
    report = update_recurring_visitors(db, threshold=THRESHOLD, min_events=3)
    assert report.model_version is None and report.entities_total == 0
    assert list_recurring_visitors(db, min_events=1) == []
