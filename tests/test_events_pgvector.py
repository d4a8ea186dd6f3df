"""Similar-event and text search on PostgreSQL with pgvector: both run in the database
through the HNSW index (`cv_assets.store.events.nearest_events`), with the in-memory
index's semantics (tests/test_events_similarity.py runs the shared cases on both backends)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from helpers.events import T0, add_events
from sqlalchemy import text

from cv_assets.events import search as similarity
from cv_assets.events.search import clear_vector_indexes, search_events_by_text, similar_events
from cv_assets.store import AppDatabase
from cv_assets.store.events import (
    has_vector_index,
    nearest_events,
    vector_extension_version,
    write_event_embeddings,
)
from cv_assets.store.vectors import vector_to_json

N = 200
RARE = "attic"  # one event in 20


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


def random_events(n: int = N, seed: int = 5, dim: int = 512):
    """Ids, cameras, start times and unit vectors: noise plus a cluster around the first
    vector at varied distances (similarities ~0.5-0.95), so a floor cuts it midway."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    members = np.arange(1, n, 4)
    scales = rng.uniform(0.3, 1.5, (len(members), 1)).astype(np.float32)
    vectors[members] = vectors[0] + scales * rng.standard_normal((len(members), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cameras = [RARE if i % 20 == 7 else f"cam{i % 2}" for i in range(n)]
    started = [T0 + timedelta(hours=7 * i) for i in range(n)]  # ~58 days
    return [f"r{i:04d}" for i in range(n)], cameras, started, vectors


def load(db: AppDatabase, events) -> None:
    names, cameras, started, vectors = events
    add_events(db, [{"id": name, "camera_id": camera, "started_at": start, "label": camera,
                     "thumbnail_base64": "unused"} for name, camera, start in zip(names, cameras, started)])
    with db.write() as session:
        write_event_embeddings(session, "rand", dict(zip(names, vectors)))


def exact(events, query: np.ndarray, *, limit, camera=None, window=None, floor=None, exclude=None):
    """(ids, similarities) by brute force over the same float32 vectors."""
    names, cameras, started, vectors = events
    scores = vectors @ query
    keep = [i for i in np.argsort(-scores, kind="stable")
            if names[i] != exclude and (camera is None or cameras[i] == camera)
            and (window is None or window[0] <= started[i] <= window[1])
            and (floor is None or scores[i] >= floor)][:limit]
    return [names[i] for i in keep], scores[keep]


def ids(result):
    return [m.event_id for m in result.matches]


def held_in_memory(db: AppDatabase) -> bool:
    """Whether this process loaded `db`'s vectors into an in-memory index."""
    return any(url == db.url for url, _ in similarity._INDEXES)


SIMILAR_CASES = [  # (query event, limit, camera, days, min_similarity)
    ("r0000", 10, None, 0, -1.0),
    ("r0000", 10, None, 0, 0.6),  # the floor cuts the cluster
    ("r0000", 10, "cam1", 20, -1.0),
    ("r0000", 5, RARE, 0, -1.0),  # 10 candidates in all
    ("r0101", 10, "cam1", 10, 0.4),
    ("r0100", 50, None, 30, -1.0),
]


def test_similar_search_runs_in_pgvector_and_equals_the_exact_and_sqlite_rankings(postgres_url, tmp_path):
    events = random_events()
    names, _, started, vectors = events
    postgres, sqlite = AppDatabase(postgres_url), AppDatabase(f"sqlite:///{tmp_path / 'app.sqlite'}")
    load(postgres, events)
    load(sqlite, events)
    with postgres.read() as session:
        assert has_vector_index(session)
    for query, limit, camera, days, floor in SIMILAR_CASES:
        q = names.index(query)
        window = (started[q] - timedelta(days=days), started[q] + timedelta(days=days)) if days else None
        expected, scores = exact(events, vectors[q], limit=limit, camera=camera, window=window, floor=floor,
                                 exclude=query)
        on_postgres = similar_events(postgres, query, limit=limit, min_similarity=floor, days=days, camera=camera)
        assert not held_in_memory(postgres)  # the search ran in PostgreSQL
        on_sqlite = similar_events(sqlite, query, limit=limit, min_similarity=floor, days=days, camera=camera)
        assert ids(on_postgres) == ids(on_sqlite) == expected, (query, camera, days, floor)
        assert np.allclose([m.similarity for m in on_postgres.matches], scores, atol=1e-5)
        assert on_postgres.searched == on_sqlite.searched == N
        assert [m.camera_id for m in on_postgres.matches] == [m.camera_id for m in on_sqlite.matches]
        assert [m.started_at for m in on_postgres.matches] == [m.started_at for m in on_sqlite.matches]
    assert ids(similar_events(postgres, "r0000", min_similarity=0.6, days=0))  # the cluster is found
    assert similar_events(postgres, "r0000", camera="no-such-camera").matches == []


def test_a_rare_camera_still_fills_the_limit_from_the_index(postgres_url):
    """At scale the planner reads the HNSW index and filters what it yields: with a small
    candidate list (ef_search 10) a camera holding 1 event in 20 gets about one row from
    a plain filtered query; `nearest_events` still returns `limit`, the exact ones."""
    events = random_events()
    names, _, _, vectors = events
    db = AppDatabase(postgres_url)
    load(db, events)
    expected, _ = exact(events, vectors[3], limit=8, camera=RARE)
    with db.read() as session:
        session.execute(text("SET LOCAL enable_sort = off"))  # 200 rows: make the planner pick the index, as at scale
        session.execute(text("SELECT set_config('hnsw.ef_search', '10', true)"))
        plain = "SELECT v.event_id FROM event_embeddings v JOIN events e ON e.id = v.event_id " \
                "WHERE e.camera_id = :camera ORDER BY v.embedding_vector <=> CAST(:q AS vector) LIMIT 8"
        params = {"camera": RARE, "q": vector_to_json(vectors[3])}
        plan = "\n".join(session.execute(text(f"EXPLAIN {plain}"), params).scalars())
        assert "ix_event_embeddings_vector_hnsw" in plan
        assert len(session.execute(text(plain), params).all()) < 8  # what pgvector's README warns of
        rows = nearest_events(session, "rand", vectors[3], 8, camera=RARE, ef_search=10)
    assert [row.event_id for row in rows] == expected
    result = similar_events(db, "r0003", limit=8, min_similarity=-1, days=0, camera=RARE)
    assert ids(result) == exact(events, vectors[3], limit=8, camera=RARE, exclude="r0003")[0]


def test_the_index_path_gives_the_exact_ranking_where_the_index_serves_it(postgres_url):
    """Unfiltered and filtered, the HNSW index itself (not the exact fallback) serving the
    query: on 200 vectors with ef_search 100 it finds the exact top 10."""
    events = random_events()
    names, _, started, vectors = events
    db = AppDatabase(postgres_url)
    load(db, events)
    window = (started[50] - timedelta(days=20), started[50] + timedelta(days=20))
    with db.read() as session:
        session.execute(text("SET LOCAL enable_sort = off"))
        for camera in (None, "cam0"):
            rows = nearest_events(session, "rand", vectors[50], 10, camera=camera, started_from=window[0],
                                  started_to=window[1], exclude_event_id="r0050", min_similarity=-0.05)
            expected, scores = exact(events, vectors[50], limit=10, camera=camera, window=window, floor=-0.05,
                                     exclude="r0050")
            assert [row.event_id for row in rows] == expected
            assert np.allclose([row.similarity for row in rows], scores, atol=1e-5)
        assert not nearest_events(session, "other-model", vectors[50], 10)


class FixedTextEmbedder:
    """Embeds every text as one given vector (a CLIP text tower stand-in)."""

    family = "clip"
    model_version = "rand"

    def __init__(self, vector):
        self.vector = vector

    def embed_texts(self, texts):
        return np.stack([self.vector for _ in texts])


def test_text_search_runs_in_pgvector_with_camera_and_since(postgres_url, tmp_path):
    events = random_events(seed=11)
    names, _, started, vectors = events
    postgres, sqlite = AppDatabase(postgres_url), AppDatabase(f"sqlite:///{tmp_path / 'app.sqlite'}")
    load(postgres, events)
    load(sqlite, events)
    probe = vectors[0] + 0.5 * np.random.default_rng(2).standard_normal(512).astype(np.float32)
    probe /= np.linalg.norm(probe)
    embedder = FixedTextEmbedder(probe)
    since = started[120]
    for kwargs in ({}, {"camera": "cam1"}, {"since": since}, {"camera": RARE, "since": since, "limit": 4},
                   {"min_similarity": 0.5}):
        on_postgres = search_events_by_text(postgres, embedder, "a person", **kwargs)
        assert not held_in_memory(postgres)
        on_sqlite = search_events_by_text(sqlite, embedder, "a person", **kwargs)
        expected, _ = exact(events, probe, limit=kwargs.get("limit", 10), camera=kwargs.get("camera"),
                            window=(since, started[-1]) if "since" in kwargs else None,
                            floor=kwargs.get("min_similarity"))
        assert ids(on_postgres) == ids(on_sqlite) == expected, kwargs
        assert on_postgres.searched == N and on_postgres.text == "a person"


def test_vectors_pgvector_does_not_hold_are_searched_in_memory(postgres_url):
    """A 16-d fallback embedder's vectors stay JSON only (migration 0004 indexes 512-d):
    the in-memory index serves them on PostgreSQL too."""
    events = random_events(n=40, dim=16)
    names, _, _, vectors = events
    db = AppDatabase(postgres_url)
    load(db, events)
    result = similar_events(db, "r0000", min_similarity=-1, days=0)
    assert held_in_memory(db)
    assert ids(result) == exact(events, vectors[0], limit=10, exclude="r0000")[0]


def test_pgvector_version_is_known(postgres_url):
    db = AppDatabase(postgres_url)
    with db.read() as session:
        assert has_vector_index(session)  # the session's database is migrated on first use
        assert vector_extension_version(session) >= (0, 5)


def test_searched_is_exact_on_small_tables_and_the_planner_estimate_on_large_ones(postgres_url, monkeypatch):
    """An exact count of a million vectors costs more than the search: above EXACT_COUNT_BELOW
    rows the planner's estimate stands in, and the result says so."""
    from cv_assets.store import events as store_events

    db = AppDatabase(postgres_url)
    load(db, random_events())
    exact_result = similar_events(db, "r0000", limit=3, min_similarity=-1.0, days=0)
    assert (exact_result.searched, exact_result.searched_is_estimate) == (N, False)
    assert exact_result.searched_text == f"{N} vectors searched"
    with db.write() as session:
        session.execute(text("ANALYZE event_embeddings"))
    monkeypatch.setattr(store_events, "EXACT_COUNT_BELOW", 10)
    estimated = similar_events(db, "r0000", limit=3, min_similarity=-1.0, days=0)
    assert estimated.searched_is_estimate and estimated.as_dict()["searched_is_estimate"] is True
    assert abs(estimated.searched - N) <= N // 10  # ANALYZE saw every row of this small table
    assert estimated.searched_text.startswith("about ") and ids(estimated) == ids(exact_result)


def test_ef_search_reaches_the_index_scan(postgres_url):
    """events.hnsw_ef_search is the transaction's hnsw.ef_search (at least the limit asked for)."""
    db = AppDatabase(postgres_url)
    load(db, random_events())
    query = random_events()[3][0]
    for ef, limit, expected in ((64, 10, "64"), (300, 10, "300"), (10, 50, "50")):
        with db.read() as session:
            nearest_events(session, "rand", query, limit, ef_search=ef)
            assert session.execute(text("SHOW hnsw.ef_search")).scalar() == expected
