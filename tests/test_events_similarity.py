"""Similar-event and text search over stored event vectors, and the in-memory index."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import delete, update
from helpers.events import (
    COLOURS,
    T0,
    MeanColourEmbedder,
    add_events,
    b64,
    colour_events,
    new_db,
    jpeg_bytes,
)

from cv_assets.store import AppDatabase
from cv_assets.events.backfill import BackfillLimits, EventNotFoundError, run_event_backfill
from cv_assets.events import search as similarity
from cv_assets.events.search import (
    NoEmbeddingError,
    TextSearchUnavailableError,
    clear_vector_indexes,
    parse_vectors,
    search_events_by_text,
    similar_events,
    top_k,
    vector_index,
)
from cv_assets.store.events import write_event_embeddings
from cv_assets.store.models import Event, EventEmbedding
from cv_assets.store.vectors import vector_from_json


@pytest.fixture
def file_db(tmp_path):
    return new_db(tmp_path)


@pytest.fixture
def db(app_db_url):
    """Each test runs on SQLite and on PostgreSQL."""
    return AppDatabase(app_db_url)


@pytest.fixture
def in_memory_index(monkeypatch):
    """Searches on the in-memory index on both backends, as on SQLite or PostgreSQL without
    pgvector (with pgvector they run in the database: tests/test_events_pgvector.py)."""
    monkeypatch.setattr(similarity, "has_vector_index", lambda session: False)


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


def backfill(db, tmp_path, embedder=None, mode="missing"):
    return run_event_backfill(
        db, embedder or MeanColourEmbedder(), BackfillLimits(100, 3, tmp_path / "thumbs", 1_000_000), mode=mode,
    )


def ids(result):
    return [m.event_id for m in result.matches]


# ---------------------------------------------------------------- similar


def test_similar_finds_same_colour_events_and_leaves_out_the_event(db, tmp_path):
    colour_events(db, ["red", "blue", "red", "green", "red", "blue"])
    backfill(db, tmp_path)
    result = similar_events(db, "evt-0000", limit=10, min_similarity=0.9, days=30)
    assert sorted(ids(result)) == ["evt-0002", "evt-0004"]
    assert "evt-0000" not in ids(result)
    assert all(m.similarity >= 0.9 for m in result.matches)
    assert [m.similarity for m in result.matches] == sorted((m.similarity for m in result.matches), reverse=True)
    assert result.matches[0].label == "red" and result.matches[0].camera_id == "front_door"
    assert result.model_version == "mean-colour-v1" and result.searched == 6
    everything = similar_events(db, "evt-0000", limit=10, min_similarity=-1.0, days=0)
    assert len(everything.matches) == 5
    assert ids(similar_events(db, "evt-0000", limit=1, min_similarity=-1.0, days=0)) == ids(everything)[:1]


def test_nothing_qualifying_is_an_empty_list(db, tmp_path):
    colour_events(db, ["red", "blue"])
    backfill(db, tmp_path)
    assert similar_events(db, "evt-0000", min_similarity=0.9).matches == []
    colour_events(db, ["green"], prefix="solo", start=T0 + timedelta(days=400))
    backfill(db, tmp_path)
    assert similar_events(db, "solo-0000", min_similarity=-1.0, days=30).matches == []  # nothing that close in time
    assert similar_events(db, "evt-0000", camera="no-such-camera", min_similarity=-1).matches == []


def test_unknown_event_and_event_without_embedding(db, tmp_path):
    colour_events(db, ["red"])
    with pytest.raises(NoEmbeddingError, match="evt-0000.*no embedding yet"):
        similar_events(db, "evt-0000")
    with pytest.raises(EventNotFoundError, match="'ghost' not found"):
        similar_events(db, "ghost")
    with pytest.raises(ValueError, match="limit"):
        similar_events(db, "evt-0000", limit=0)


def test_camera_and_days_filters(db, tmp_path):
    colour_events(db, ["red"] * 3, camera="front_door", step=timedelta(days=1))
    colour_events(db, ["red"] * 3, camera="garage", step=timedelta(days=1), prefix="gar")
    colour_events(db, ["red"] * 2, camera="front_door", start=T0 + timedelta(days=60), prefix="late")
    backfill(db, tmp_path)
    garage = similar_events(db, "evt-0000", camera="garage", min_similarity=0.5, days=0)
    assert sorted(ids(garage)) == ["gar-0000", "gar-0001", "gar-0002"]
    recent = similar_events(db, "evt-0000", min_similarity=0.5, days=30)
    assert sorted(ids(recent)) == ["evt-0001", "evt-0002", "gar-0000", "gar-0001", "gar-0002"]
    one_day = similar_events(db, "evt-0000", min_similarity=0.5, days=1)
    assert sorted(ids(one_day)) == ["evt-0001", "gar-0000", "gar-0001"]
    anytime = similar_events(db, "evt-0000", min_similarity=0.5, days=0)
    assert len(anytime.matches) == 7
    # The window is around the event itself, so old events find their own neighbours.
    assert sorted(ids(similar_events(db, "late-0000", min_similarity=0.5, days=30))) == ["late-0001"]


def test_only_vectors_of_the_same_model_version_are_compared(db, tmp_path):
    colour_events(db, ["red", "red", "red", "red"])
    backfill(db, tmp_path, MeanColourEmbedder("v1"))
    with db.write() as session:  # two events re-embedded by another model
        session.execute(update(EventEmbedding).where(EventEmbedding.event_id.in_(["evt-0002", "evt-0003"]))
                        .values(model_version="v2"))
    clear_vector_indexes()
    v1 = similar_events(db, "evt-0000", min_similarity=-1)
    assert ids(v1) == ["evt-0001"] and v1.model_version == "v1" and v1.searched == 2
    v2 = similar_events(db, "evt-0002", min_similarity=-1)
    assert ids(v2) == ["evt-0003"] and v2.model_version == "v2"


def test_results_match_brute_force_over_random_vectors(db):
    rng = np.random.default_rng(7)
    n = 600
    add_events(db, [{"id": f"r{i:04d}", "camera_id": f"cam{i % 3}", "started_at": T0 + timedelta(minutes=i),
                     "thumbnail_base64": "unused"} for i in range(n)])
    vectors = rng.standard_normal((n, 512)).astype(np.float32)
    vectors[1::7] = vectors[0] + 0.3 * rng.standard_normal((len(vectors[1::7]), 512))  # a cluster around r0000
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with db.write() as session:
        write_event_embeddings(session, "rand", {f"r{i:04d}": vectors[i] for i in range(n)})
    with db.read() as session:
        stored = {row.event_id: vector_from_json(row.embedding) for row in session.query(EventEmbedding)}
    names = sorted(stored)
    matrix = np.stack([stored[name] for name in names])
    for query, camera in (("r0000", None), ("r0000", "cam1"), ("r0301", None)):
        q = names.index(query)
        scores = matrix @ matrix[q]
        order = [i for i in np.argsort(-scores) if i != q and (camera is None or int(names[i][1:]) % 3 == int(camera[-1]))]
        expected = [names[i] for i in order[:10]]
        result = similar_events(db, query, limit=10, min_similarity=-1, days=0, camera=camera)
        assert ids(result) == expected
        assert np.allclose([m.similarity for m in result.matches], scores[order[:10]], atol=1e-5)


# ---------------------------------------------------------------- the index stays current


@pytest.mark.usefixtures("in_memory_index")
def test_index_picks_up_new_vectors_incrementally(db, tmp_path):
    colour_events(db, ["red", "red", "blue"])
    backfill(db, tmp_path)
    assert ids(similar_events(db, "evt-0000", min_similarity=0.9)) == ["evt-0001"]
    index = vector_index(db, "mean-colour-v1")
    assert index.full_loads == 0 and index.n == 3
    colour_events(db, ["red", "red"], prefix="new", start=T0 + timedelta(hours=1))
    backfill(db, tmp_path)
    assert sorted(ids(similar_events(db, "evt-0000", min_similarity=0.9))) == ["evt-0001", "new-0000", "new-0001"]
    assert index.full_loads == 0 and index.n == 5  # appended, not reloaded


@pytest.mark.usefixtures("in_memory_index")
def test_re_embedded_events_replace_their_old_rows_without_a_reload(db, tmp_path):
    colour_events(db, ["red", "red", "blue", "blue"])
    backfill(db, tmp_path)
    similar_events(db, "evt-0000", min_similarity=-1)
    index = vector_index(db, "mean-colour-v1")
    # A new picture for one event, re-embedded by the same model: its vector must change.
    with db.write() as session:
        session.execute(update(Event).where(Event.id == "evt-0001")
                        .values(thumbnail_base64=b64(jpeg_bytes(COLOURS["blue"]))))
        session.execute(delete(EventEmbedding).where(EventEmbedding.event_id == "evt-0001"))
    backfill(db, tmp_path)
    assert sorted(ids(similar_events(db, "evt-0002", min_similarity=0.9))) == ["evt-0001", "evt-0003"]
    assert ids(similar_events(db, "evt-0000", min_similarity=0.9)) == []
    assert index.full_loads == 0 and index.dead == 1 and index.live_count == 4
    # Re-embedding everything replaces the newest row too: ids may be reused, so it reloads.
    backfill(db, tmp_path, mode="all")
    assert sorted(ids(similar_events(db, "evt-0002", min_similarity=0.9))) == ["evt-0001", "evt-0003"]
    assert index.full_loads == 1 and index.dead == 0 and index.n == 4


@pytest.mark.usefixtures("in_memory_index")
def test_a_warm_index_gives_what_a_cold_process_gives(db, tmp_path, monkeypatch):
    """The per-process index is an optimisation only: after adds, a re-embedding and a
    deletion, its answers equal those of a process that loads everything afresh."""
    monkeypatch.setattr(similarity, "CONSISTENCY_CHECK_SECONDS", 0.0)
    colour_events(db, ["red", "red", "blue", "blue", "green"])
    backfill(db, tmp_path)

    def answers(event_ids):
        return {event_id: [(m.event_id, round(m.similarity, 6))
                           for m in similar_events(db, event_id, min_similarity=-1, days=0).matches]
                for event_id in event_ids}

    answers(["evt-0000", "evt-0002"])  # warm the index
    colour_events(db, ["red", "green"], prefix="new", start=T0 + timedelta(hours=1))
    with db.write() as session:
        session.execute(update(Event).where(Event.id == "evt-0003").values(thumbnail_base64=b64(jpeg_bytes(COLOURS["red"]))))
        session.execute(delete(EventEmbedding).where(EventEmbedding.event_id == "evt-0003"))
        session.execute(delete(Event).where(Event.id == "evt-0001"))
    backfill(db, tmp_path)
    queries = ["evt-0000", "evt-0002", "evt-0003", "new-0000", "new-0001"]
    warm = answers(queries)
    index = vector_index(db, "mean-colour-v1")
    assert index.full_loads == 0 and index.dead == 2  # updated incrementally
    clear_vector_indexes()  # as a new process starts
    cold = answers(queries)
    assert warm == cold
    assert {e for e, _ in cold["evt-0000"][:2]} == {"evt-0003", "new-0000"}  # the red ones, re-embedded included
    assert "evt-0001" not in {e for matches in cold.values() for e, _ in matches}


@pytest.mark.usefixtures("in_memory_index")
def test_deleted_events_vanish_from_results_at_once_and_from_the_index_at_the_next_check(db, tmp_path, monkeypatch):
    colour_events(db, ["red", "red", "red", "blue"])
    backfill(db, tmp_path)
    monkeypatch.setattr(similarity, "CONSISTENCY_CHECK_SECONDS", 3600.0)
    assert sorted(ids(similar_events(db, "evt-0000", min_similarity=0.9))) == ["evt-0001", "evt-0002"]
    with db.write() as session:
        session.execute(delete(Event).where(Event.id == "evt-0001"))  # cascades to its embedding
    index = vector_index(db, "mean-colour-v1")
    assert ids(similar_events(db, "evt-0000", min_similarity=0.9)) == ["evt-0002"]  # filtered by the events table
    assert index.dead == 0  # not checked yet
    monkeypatch.setattr(similarity, "CONSISTENCY_CHECK_SECONDS", 0.0)
    assert ids(similar_events(db, "evt-0000", min_similarity=0.9)) == ["evt-0002"]
    assert index.dead == 1 and index.full_loads == 0 and index.live_count == 3
    assert similar_events(db, "evt-0000", min_similarity=-1).searched == 3


def test_snapshot_lets_the_next_process_skip_json_parsing(file_db, tmp_path, monkeypatch):
    db = file_db  # the snapshot lives beside an SQLite file
    monkeypatch.setattr(similarity, "SNAPSHOT_MIN_NEW_ROWS", 1)
    colour_events(db, ["red", "red", "blue", "green"])
    backfill(db, tmp_path)
    first = similar_events(db, "evt-0000", min_similarity=-1)
    snapshot = similarity.snapshot_path(db, "mean-colour-v1")
    assert snapshot.is_file() and snapshot.parent.parent.name == "events.sqlite.cache"
    clear_vector_indexes()  # as if another process started
    again = similar_events(db, "evt-0000", min_similarity=-1)
    index = vector_index(db, "mean-colour-v1")
    assert index.loaded_from_snapshot and index.rows_parsed == 0
    assert again.matches == first.matches
    # A snapshot older than the database: new rows are appended, deleted ones dropped.
    colour_events(db, ["red"], prefix="new", start=T0 + timedelta(hours=1))
    backfill(db, tmp_path)
    with db.write() as session:
        session.execute(delete(Event).where(Event.id == "evt-0002"))
    monkeypatch.setattr(similarity, "SNAPSHOT_MIN_NEW_ROWS", 10**9)
    clear_vector_indexes()
    result = similar_events(db, "evt-0000", min_similarity=0.9)
    index = vector_index(db, "mean-colour-v1")
    assert index.loaded_from_snapshot and index.rows_parsed == 1 and index.live_count == 4
    assert sorted(ids(result)) == ["evt-0001", "new-0000"]


def test_a_damaged_snapshot_is_ignored(file_db, tmp_path, monkeypatch):
    db = file_db  # the snapshot lives beside an SQLite file
    colour_events(db, ["red", "red"])
    backfill(db, tmp_path)
    snapshot = similarity.snapshot_path(db, "mean-colour-v1")
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"not an npz file")
    assert ids(similar_events(db, "evt-0000", min_similarity=0.9)) == ["evt-0001"]
    assert not vector_index(db, "mean-colour-v1").loaded_from_snapshot


@pytest.mark.usefixtures("in_memory_index")
def test_reused_top_row_id_is_detected(db, tmp_path):
    colour_events(db, ["red", "red", "blue"])
    backfill(db, tmp_path)
    similar_events(db, "evt-0000", min_similarity=-1)
    # Delete the newest vector's event and embed a new event: SQLite may hand out the same row id.
    with db.write() as session:
        session.execute(delete(Event).where(Event.id == "evt-0002"))
    colour_events(db, ["red"], prefix="other", start=T0 + timedelta(hours=1))
    backfill(db, tmp_path)
    result = similar_events(db, "evt-0000", min_similarity=0.9)
    assert sorted(ids(result)) == ["evt-0001", "other-0000"]


def test_parse_vectors_skips_only_malformed_rows():
    good = "[" + ",".join(["0.5"] * 4) + "]"
    matrix, kept = parse_vectors([good, "[1,2", good.replace("0.5", "NaN", 1), "[0,0,0,1]", "[0,0,1]"], dim=None)
    assert kept == [0, 3]
    assert matrix.shape == (2, 4) and np.allclose(np.linalg.norm(matrix, axis=1), 1.0)


def test_top_k_orders_and_drops_excluded():
    scores = np.array([0.1, 0.9, -np.inf, 0.5, 0.7], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [1, 4, 3]
    assert top_k(scores, 10).tolist() == [1, 4, 3, 0]
    assert top_k(scores, 0).tolist() == []


# ---------------------------------------------------------------- text search


def test_text_search_ranks_matching_thumbnails_first(db, tmp_path):
    colour_events(db, ["red", "blue", "green", "blue", "yellow"])
    backfill(db, tmp_path)
    result = search_events_by_text(db, MeanColourEmbedder(), "a blue", limit=2)
    assert sorted(ids(result)) == ["evt-0001", "evt-0003"]
    assert result.searched == 5
    assert len(search_events_by_text(db, MeanColourEmbedder(), "blue", limit=10).matches) == 5
    assert search_events_by_text(db, MeanColourEmbedder(), "blue", min_similarity=0.99, camera="garage").matches == []


def test_text_search_needs_a_text_capable_embedder(db):
    class HistogramLike(MeanColourEmbedder):
        family = "color_histogram"

    with pytest.raises(TextSearchUnavailableError, match="needs a CLIP embedder.*color_histogram"):
        search_events_by_text(db, HistogramLike("color_histogram-v1"), "a person")

    class NoText(MeanColourEmbedder):
        def embed_texts(self, texts):
            raise NotImplementedError

    with pytest.raises(TextSearchUnavailableError):
        search_events_by_text(db, NoText(), "a person")
    with pytest.raises(ValueError, match="empty"):
        search_events_by_text(db, MeanColourEmbedder(), "   ")


def test_text_search_with_no_vectors_is_empty(db):
    assert search_events_by_text(db, MeanColourEmbedder(), "red").matches == []
