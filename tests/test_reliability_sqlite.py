"""Several processes writing the SQLite application database at once: failure counters
incremented read-then-write on the same rows, new embedding rows, readers in between.
No writer ever sees "database is locked" and no increment is lost."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from helpers import reliability as h
from cv_assets.store import AppDatabase
from cv_assets.store.models import EmbeddingFailure, Event, EventEmbedding

WORKERS = 4
ITERATIONS = 50


@pytest.mark.slow
def test_concurrent_writers_never_lock_out_and_lose_no_update(tmp_path):
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    db = AppDatabase(url)
    start = datetime(2026, 11, 1, 8, 0)
    ids = h.SHARED_FAILURES + [f"w{w}-{k}" for w in range(WORKERS) for k in range(ITERATIONS)]
    with db.write() as session:
        session.add_all(Event(id=event_id, camera_id="front", started_at=start + timedelta(seconds=i),
                              thumbnail_base64="eA==") for i, event_id in enumerate(ids))
    go = tmp_path / "go"
    config = h.write_config(tmp_path)  # only so children never read the repo's config
    with h.children() as kids:
        for worker in range(WORKERS):
            kids.append(h.start_child([str(h.HERE), "sqlite-writer", url, str(worker), str(ITERATIONS), str(go)],
                                      h.child_env(config), tmp_path / f"writer{worker}.log"))
        h.release_together(go, kids)
        results = [h.assert_child_succeeded(kid)[0] for kid in kids]

    assert [r["errors"] for r in results] == [[]] * WORKERS
    with db.read() as session:
        failures = session.scalars(select(EmbeddingFailure).where(EmbeddingFailure.model_version == h.SQLITE_TEST_VERSION)).all()
        vectors = session.scalars(select(EventEmbedding)).all()
    by_kind = {}
    for failure in failures:
        by_kind.setdefault(failure.item_kind, {})[failure.item_id] = failure.attempts
    # Every read-then-write increment landed: one per writer per pass, none lost, none doubled.
    assert by_kind["event"] == {event_id: WORKERS * ITERATIONS for event_id in h.SHARED_FAILURES}
    assert by_kind["frame"] == {f"demo/0/{i}": WORKERS * ITERATIONS for i in range(4)}
    # One row per embedded event, row ids unique and increasing with each write.
    assert sorted(v.event_id for v in vectors) == sorted(f"w{w}-{k}" for w in range(WORKERS) for k in range(ITERATIONS))
    assert len({v.id for v in vectors}) == len(vectors) == WORKERS * ITERATIONS
    print(f"\nsqlite writers: {WORKERS} processes x {ITERATIONS} passes, seconds {[r['seconds'] for r in results]}")
