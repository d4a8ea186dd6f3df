"""Concurrent event backfill on PostgreSQL: several OS processes (standing in for pods)
claim disjoint batches; every event is embedded exactly once, and the batch of a worker
SIGKILLed mid-batch is embedded by another worker. SQLite keeps one backfill at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from helpers.events import colour_events

from cv_assets.store import AppDatabase
from cv_assets.store.events import count_remaining
from cv_assets.store.models import EventEmbedding

WORKER = Path(__file__).parent / "helpers" / "backfill_worker.py"
TIMEOUT = 120
COLOURS = ["red", "green", "blue", "yellow"]


def start_worker(url: str, tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    log = tmp_path / f"{name}.log"
    return subprocess.Popen([sys.executable, str(WORKER), url, str(tmp_path / "thumbs"), str(log), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output


def logged(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / f"{name}.log"
    if not path.exists():
        return []
    return [event_id for line in path.read_text().splitlines() for event_id in json.loads(line)]


def vector_rows(db: AppDatabase) -> tuple[int, int, int]:
    """(rows, distinct events, largest row id): every re-embedding gets a new, larger id, so
    rows == events == largest id means no event was ever written twice."""
    with db.read() as session:
        return session.execute(select(func.count(), func.count(EventEmbedding.event_id.distinct()),
                                      func.max(EventEmbedding.id))).one()


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_concurrent_workers_embed_each_event_exactly_once(postgres_url, tmp_path):
    db = AppDatabase(postgres_url)
    ids = colour_events(db, [COLOURS[i % 4] for i in range(120)], noise=0)
    go = tmp_path / "go"
    workers = {f"w{i}": start_worker(postgres_url, tmp_path, f"w{i}", "--start-when", str(go)) for i in range(4)}
    for name, proc in workers.items():  # a fast-starting worker must not drain the queue alone
        wait_for(tmp_path / f"{name}.log.ready", proc)
    go.touch()
    for proc in workers.values():
        finish(proc)
    per_worker = {name: logged(tmp_path, name) for name in workers}
    everything = [event_id for batch in per_worker.values() for event_id in batch]
    assert sorted(everything) == sorted(ids)  # each event by exactly one worker, once
    assert vector_rows(db) == (len(ids), len(ids), len(ids))
    assert sum(1 for batch in per_worker.values() if batch) >= 2  # the work really was shared
    with db.read() as session:
        assert count_remaining(session, "mean-colour-v1", 3) == 0


def test_a_killed_workers_batch_is_skipped_while_held_and_embedded_by_another(postgres_url, tmp_path):
    db = AppDatabase(postgres_url)
    ids = colour_events(db, [COLOURS[i % 4] for i in range(30)], noise=0)
    marker = tmp_path / "claimed.json"
    holder = start_worker(postgres_url, tmp_path, "holder", "--hold", str(marker))
    try:
        wait_for(marker, holder)
        claimed = json.loads(marker.read_text())
        assert len(claimed) == 5
        # While the holder lives, the others pass over its rows instead of waiting for them.
        others = [start_worker(postgres_url, tmp_path, f"w{i}") for i in range(2)]
        for proc in others:
            finish(proc)
        done = logged(tmp_path, "w0") + logged(tmp_path, "w1")
        assert sorted(done) == sorted(set(ids) - set(claimed))
        assert holder.poll() is None
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # mid-batch: claimed, embedding, nothing stored
        holder.wait(timeout=TIMEOUT)
    finish(start_worker(postgres_url, tmp_path, "after"))
    assert sorted(logged(tmp_path, "after")) == sorted(claimed)
    assert logged(tmp_path, "holder") == []
    assert vector_rows(db) == (len(ids), len(ids), len(ids))


# ---------------------------------------------------------------- the schedule asks for several runs


def tick(settings, when):
    from dagster import DagsterInstance, build_schedule_context

    from cv_assets.defs.events import build_event_schedules
    from cv_assets.defs.resources import build_resources

    schedule = {s.name: s for s in build_event_schedules(settings)}["event_embedding_backfill_schedule"]
    context = build_schedule_context(instance=DagsterInstance.ephemeral(), scheduled_execution_time=when,
                                     resources=build_resources(settings))
    requests = schedule(context)
    return requests if isinstance(requests, list) else [requests]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schedule_requests_up_to_backfill_workers_runs_on_postgresql_only(backend, settings_factory, request):
    from datetime import datetime, timezone

    storage = {"database_url": request.getfixturevalue("postgres_url")} if backend == "postgresql" else {}
    settings, _ = settings_factory(storage=storage, events={"max_batch": 5, "backfill_workers": 3})
    colour_events(AppDatabase(settings.storage.database_url), [COLOURS[i % 4] for i in range(12)], noise=0)
    when = datetime(2026, 11, 21, 6, 15, tzinfo=timezone.utc)
    requests = tick(settings, when)
    expected = 3 if backend == "postgresql" else 1
    assert len(requests) == expected
    assert len({r.run_key for r in requests}) == expected
    assert requests[0].run_key == f"event_embeddings:{when.isoformat()}"
