"""A scheduled backfill to the end: events with 1 in 12 corrupted thumbnails, embedded
batch by batch by the runs `event_embedding_backfill_schedule` requests, until it skips.
Every good event is embedded exactly once, every bad one is recorded with exactly
max_attempts attempts, no batch exceeds max_batch, and a second pass does nothing.

A small batch size makes the few hundred events take many runs, which is what the
invariants are about (how memory behaves over thousands of events is measured in
`benchmarks/events.py`, not asserted here).
"""

import base64
import json
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np
from dagster import DagsterInstance, build_schedule_context
from sqlalchemy import func, select

from helpers import reliability as h
from cv_assets.events.importer import import_events
from cv_assets.events.search import clear_vector_indexes
from cv_assets.store import AppDatabase
from cv_assets.store.models import EmbeddingFailure, EventEmbedding

N_EVENTS = 120
CORRUPT_EVERY = 12
MAX_BATCH = 20
MAX_ATTEMPTS = 3
PALETTE = 20  # distinct scenes the thumbnails show, so visitors group into a bounded set
MAX_RUNS = 100  # a guard: the loop must stop by itself long before this


def _thumbnail(rng, colour) -> bytes:
    image = np.empty((32, 32, 3), np.uint8)
    image[:] = colour
    noisy = np.clip(image.astype(np.int16) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", noisy)
    assert ok
    return encoded.tobytes()


def _corrupt(data: bytes, kind: int) -> bytes:
    # Valid base64 of bytes that are not a whole image: the import accepts the event and
    # only embedding can tell.
    return [data[: len(data) // 3], b"GIF89a but not really an image", data[:20]][kind % 3]


def _write_events(path, n: int) -> set[str]:
    rng = np.random.default_rng(7)
    palette = rng.integers(0, 256, size=(PALETTE, 3))
    start = datetime(2026, 1, 1)
    corrupted = set()
    with open(path, "w") as out:
        for i in range(n):
            event_id = f"evt-{i:05d}"
            data = _thumbnail(rng, palette[i % PALETTE])
            if i % CORRUPT_EVERY == 7:
                data = _corrupt(data, i // CORRUPT_EVERY)
                corrupted.add(event_id)
            out.write(json.dumps({
                "id": event_id, "camera_id": f"cam-{i % 4}", "started_at": (start + timedelta(minutes=i)).isoformat(),
                "label": "person", "thumbnail_base64": base64.b64encode(data).decode(),
            }) + "\n")
    return corrupted


def _run_metadata(result) -> dict:
    [materialization] = result.asset_materializations_for_node("event_embeddings")
    return {key: value.value for key, value in materialization.metadata.items()}


def test_scheduled_backfill_embeds_every_good_event_once(tmp_path, tiny_clip_dir):
    clear_vector_indexes()
    store = h.make_store(tmp_path / "store", None,
                         embedder={"model": str(tiny_clip_dir), "fallback": "none", "device": "cpu"},
                         events={"max_batch": MAX_BATCH, "max_attempts": MAX_ATTEMPTS})
    events = store.settings.events
    corrupted = _write_events(tmp_path / "events.jsonl", N_EVENTS)
    db = AppDatabase(store.settings.storage.sqlite_url)
    imported = import_events(db, tmp_path / "events.jsonl", thumbnails_root=store.settings.storage.thumbnails_root,
                             thumbnail_max_bytes=events.thumbnail_max_bytes)
    assert imported.imported == N_EVENTS and not imported.errors

    instance = DagsterInstance.ephemeral()
    schedule = store.defs.resolve_schedule_def("event_embedding_backfill_schedule")
    job = store.job("event_embedding_backfill_job")
    tick = datetime(2026, 11, 21, 6, 0, tzinfo=timezone.utc)

    def evaluate(at):
        with build_schedule_context(instance=instance, resources=store.defs.resources, scheduled_execution_time=at) as ctx:
            return schedule.evaluate_tick(ctx)

    per_run, skip = [], None
    while len(per_run) < MAX_RUNS:
        data = evaluate(tick)
        if not data.run_requests:
            skip = data.skip_message
            break
        for request in data.run_requests:
            result = job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags)
            assert result.success
            per_run.append(_run_metadata(result))
        tick += timedelta(minutes=15)

    assert skip is not None, f"the schedule still requested runs after {len(per_run)}"
    assert "every event has an embedding" in skip
    good = N_EVENTS - len(corrupted)
    assert len(corrupted) == N_EVENTS // CORRUPT_EVERY
    assert sum(r["embedded"] for r in per_run) == good  # each good event embedded in exactly one run
    assert sum(r["failed"] for r in per_run) == len(corrupted) * MAX_ATTEMPTS
    assert all(r["batch_size"] == MAX_BATCH and r["embedded"] + r["failed"] <= MAX_BATCH for r in per_run)
    # Full batches until the end: every good event once plus max_attempts tries per bad one.
    needed = -(-(good + MAX_ATTEMPTS * len(corrupted)) // MAX_BATCH)
    assert needed <= len(per_run) <= needed + 2

    version = per_run[0]["model_version"]
    with db.read() as session:
        vectors = session.execute(select(EventEmbedding.model_version, func.count()).group_by(EventEmbedding.model_version)).all()
        failures = session.execute(select(EmbeddingFailure).where(EmbeddingFailure.item_kind == "event")).scalars().all()
        embedded_ids = set(session.scalars(select(EventEmbedding.event_id)))
    assert vectors == [(version, good)]
    assert embedded_ids.isdisjoint(corrupted) and len(embedded_ids) == good
    assert {f.item_id for f in failures} == corrupted
    assert {f.attempts for f in failures} == {MAX_ATTEMPTS}
    assert all(f.item_id in f.reason and f.model_version == version for f in failures)
    assert per_run[-1]["remaining"] == 0 and per_run[-1]["skipped"] == len(corrupted)

    # A second pass is a no-op: the schedule skips, and a run started by hand changes nothing.
    assert not evaluate(tick + timedelta(minutes=15)).run_requests
    again = _run_metadata(job.execute_in_process(instance=instance))
    assert (again["embedded"], again["failed"], again["remaining"]) == (0, 0, 0)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(EventEmbedding)) == good
        assert {f.attempts for f in session.scalars(select(EmbeddingFailure))} == {MAX_ATTEMPTS}
    clear_vector_indexes()
