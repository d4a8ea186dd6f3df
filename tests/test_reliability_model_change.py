"""A model change (two tiny CLIP checkpoints): everything is re-embedded under the new
model_version, similarity never mixes versions, and an item whose re-embedding fails is
reported, never silently dropped nor matched with its old vector."""

from datetime import datetime, timedelta, timezone

import pytest
from dagster import DagsterInstance, RunRequest, SkipReason, build_schedule_context, materialize
from sqlalchemy import select

from helpers import reliability as h
from helpers.events import colour_events
from cv_assets.defs.events import build_event_schedules, event_embeddings
from cv_assets.defs.resources import build_resources
from cv_assets.events.importer import import_events
from cv_assets.events.backfill import event_status
from cv_assets.events.search import clear_vector_indexes, similar_events
from cv_assets.embedding import clear_embedder_cache
from cv_assets.store import AppDatabase
from cv_assets.store.models import (
    Asset, AssetAppearance, EmbedderVersion, EmbeddingFailure, EntityEvent, Event, EventEmbedding, RecognizedEntity,
)

BROKEN_REFERENCE = "CHAR_01"
BROKEN_THUMBNAIL = "evt-00010"  # a file thumbnail that embeds under the first model
EVENTS_CONFIG = {"max_attempts": 1, "visitor_min_events": 2}
# Whole-frame matching only: versions are what this test is about, and each extra crop
# scale multiplies the tiny model's forward passes.
APPEARANCES_CONFIG = {"region_scales": [1.0]}


def _tiny(model_dir) -> dict:
    return {"model": str(model_dir), "fallback": "none", "device": "cpu"}


def _metadata(result, node: str) -> dict:
    [materialization] = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in materialization.metadata.items()}


def _backfill_events(store: h.Store, instance) -> list[dict]:
    """Run the scheduled backfill until the schedule skips; the metadata of each run."""
    schedule = store.defs.resolve_schedule_def("event_embedding_backfill_schedule")
    job = store.job("event_embedding_backfill_job")
    tick = datetime(2026, 11, 21, 6, 0, tzinfo=timezone.utc)
    runs = []
    for _ in range(10):
        with build_schedule_context(instance=instance, resources=store.defs.resources, scheduled_execution_time=tick) as ctx:
            data = schedule.evaluate_tick(ctx)
        if not data.run_requests:
            return runs
        for request in data.run_requests:
            runs.append(_metadata(job.execute_in_process(instance=instance, run_config=request.run_config,
                                                         tags=request.tags), "event_embeddings"))
        tick += timedelta(minutes=15)
    raise AssertionError("the backfill schedule never skipped")


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_vector_indexes()
    yield
    clear_vector_indexes()
    clear_embedder_cache()


@pytest.mark.slow
def test_a_model_change_reembeds_everything_and_never_mixes_versions(tmp_path, tmp_path_factory, tiny_clip_dir, tiny_clip_dir_b):
    demo = h.demo_source(tmp_path_factory)
    root = tmp_path / "store"
    first = h.make_store(root, demo, embedder=_tiny(tiny_clip_dir), events=EVENTS_CONFIG,
                         appearances=APPEARANCES_CONFIG)
    storage = first.settings.storage
    db = AppDatabase(storage.sqlite_url)
    imported = import_events(db, demo / "events" / "events.jsonl", thumbnails_root=storage.thumbnails_root,
                             thumbnail_max_bytes=first.settings.events.thumbnail_max_bytes)
    n_events = imported.imported
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["demo"])

    # Model A: the whole project chain and the event backfill.
    run_a = first.job().execute_in_process(partition_key="demo", instance=instance)
    version_a = _metadata(run_a, "frame_embeddings")["model_version"]
    events_a = _backfill_events(first, instance)
    with db.read() as session:
        embedded_a = set(session.scalars(select(EventEmbedding.event_id).where(EventEmbedding.model_version == version_a)))
    assert BROKEN_THUMBNAIL in embedded_a and len(embedded_a) == sum(r["embedded"] for r in events_a)
    failed_a = n_events - len(embedded_a)
    assert failed_a == sum(r["failed"] for r in events_a) > 0  # the demo's own corrupted thumbnails

    # Between the runs: one reference image and one thumbnail file go bad.
    (storage.projects_root / "demo" / "refs" / f"{BROKEN_REFERENCE}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (storage.thumbnails_root / "front_door" / f"{BROKEN_THUMBNAIL}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")

    # Model B.
    clear_embedder_cache()
    second = h.make_store(root, None, embedder=_tiny(tiny_clip_dir_b), events=EVENTS_CONFIG,
                          appearances=APPEARANCES_CONFIG)
    resources = dict(second.defs.resources)

    # Appearances computed before any reference is re-embedded use no reference at all:
    # every stored reference vector is of the old version.
    from cv_assets.defs.analysis import asset_appearances

    early = materialize([asset_appearances], partition_key="demo", instance=instance, resources=resources)
    early_meta = _metadata(early, "asset_appearances")
    version_b = early_meta["model_version"]
    assert version_b != version_a and version_b.startswith("clip:")
    assert early_meta["assets_matched"] == 0 and early_meta["appearances"] == 0
    with db.read() as session:
        all_codes = set(session.scalars(select(Asset.code)))
        assert session.scalars(select(AssetAppearance)).all() == []
    assert set(early_meta["assets_without_reference_embedding"].split(", ")) == all_codes and len(all_codes) == 4

    run_b = second.job().execute_in_process(partition_key="demo", instance=instance)
    assert run_b.success
    refs = _metadata(run_b, "reference_embeddings")
    frames = _metadata(run_b, "frame_embeddings")
    appearances = _metadata(run_b, "asset_appearances")
    assert refs["model_version"] == frames["model_version"] == version_b
    assert (refs["embedded"], refs["failed"], refs["skipped_unchanged"]) == (3, 1, 0)
    assert BROKEN_REFERENCE in refs["failures"] and "refs/CHAR_01.png" in refs["failures"]
    assert frames["embedded"] == frames["total"] > 0 and frames["skipped_unchanged"] == 0
    assert appearances["assets_matched"] == 3 and appearances["appearances"] > 0
    assert appearances["assets_without_reference_embedding"] == BROKEN_REFERENCE

    snap = h.snapshot(second.settings, "demo")
    assert {row[3] for row in snap["frame_embeddings"]} == {version_b}
    assert len(snap["frame_embeddings"]) == len(snap["sampled_frames"])
    assert {row[3] for row in snap["appearance_embeddings"]} <= {version_b}
    with db.read() as session:
        assets = {a.code: a for a in session.scalars(select(Asset))}
        failures = session.scalars(select(EmbeddingFailure).where(EmbeddingFailure.item_kind == "asset")).all()
        codes_seen = set(session.scalars(select(Asset.code).join(AssetAppearance, AssetAppearance.asset_id == Asset.id)))
    assert {c: a.embedding_model_version for c, a in assets.items()} == {
        c: (None if c == BROKEN_REFERENCE else version_b) for c in assets}
    assert assets[BROKEN_REFERENCE].clip_embedding is None  # its model-A vector is not kept as a stand-in
    assert [(f.item_id, f.model_version) for f in failures] == [(f"demo/{BROKEN_REFERENCE}", version_b)]
    assert codes_seen and BROKEN_REFERENCE not in codes_seen

    # Events: mode `missing` re-embeds every event for model B, batch by batch.
    events_b = _backfill_events(second, instance)
    assert events_b and {r["model_version"] for r in events_b} == {version_b}
    with db.read() as session:
        rows = session.execute(select(EventEmbedding.event_id, EventEmbedding.model_version)).all()
        event_failures = {f.item_id: f for f in session.scalars(
            select(EmbeddingFailure).where(EmbeddingFailure.item_kind == "event", EmbeddingFailure.model_version == version_b))}
        grouped = set(session.scalars(select(EntityEvent.event_id)))
        all_ids = set(session.scalars(select(Event.id)))
        entity_versions = set(session.scalars(select(RecognizedEntity.model_version)))
    by_version = {}
    for event_id, version in rows:
        by_version.setdefault(version, set()).add(event_id)
    assert by_version[version_b] == embedded_a - {BROKEN_THUMBNAIL}
    assert by_version[version_a] == {BROKEN_THUMBNAIL}  # kept, but never compared with model-B vectors
    assert set(event_failures) == (all_ids - embedded_a) | {BROKEN_THUMBNAIL}
    assert BROKEN_THUMBNAIL in event_failures[BROKEN_THUMBNAIL].reason
    assert sum(r["failed"] for r in events_b) == failed_a + 1

    status = event_status(db, BROKEN_THUMBNAIL)
    assert status["model_version"] == version_a and status["stale"] is True
    assert [f["model_version"] for f in status["failures"]] == [version_b]

    # Similar-event search with a model-B event searches model-B vectors only.
    probe = sorted(by_version[version_b])[0]
    result = similar_events(db, probe, limit=1000, min_similarity=-1.0, days=None)
    assert result.model_version == version_b and result.searched == len(by_version[version_b])
    assert {m.event_id for m in result.matches} == by_version[version_b] - {probe}
    stale = similar_events(db, BROKEN_THUMBNAIL, limit=1000, min_similarity=-1.0, days=None)
    assert stale.model_version == version_a and stale.searched == 1 and stale.matches == []
    # Recurring visitors group model-B vectors only.
    assert entity_versions == {version_b} and BROKEN_THUMBNAIL not in grouped


def test_the_schedule_notices_a_model_change_on_either_backend(app_db_url, settings_factory, tiny_clip_dir_b):
    """The configured embedder's model_version is recorded in the application database, so
    the schedule tells a new model from the old one without loading it on PostgreSQL too
    (no file beside the database there)."""
    storage = {"database_url": app_db_url}
    settings_a, _ = settings_factory(storage=storage, events={"max_batch": 2})
    settings_b, _ = settings_factory(storage=storage, events={"max_batch": 2}, embedder={"model": str(tiny_clip_dir_b)})
    db = AppDatabase(settings_a.storage.database_url)
    assert (db.path is None) == app_db_url.startswith("postgresql")
    colour_events(db, ["red", "blue", "green"])
    instance = DagsterInstance.ephemeral()

    def tick(settings):
        schedule = {s.name: s for s in build_event_schedules(settings)}["event_embedding_backfill_schedule"]
        when = datetime(2026, 11, 21, 6, 15, tzinfo=timezone.utc)
        with build_schedule_context(instance=instance, scheduled_execution_time=when,
                                    resources=build_resources(settings)) as context:
            return schedule(context)

    def backfill(settings) -> list[dict]:
        runs = []
        while isinstance(tick(settings), RunRequest):
            result = materialize([event_embeddings], resources=build_resources(settings), instance=instance)
            runs.append(_metadata(result, "event_embeddings"))
            assert len(runs) <= 3, "the backfill schedule never skipped"
        return runs

    runs_a = backfill(settings_a)
    version_a = runs_a[0]["model_version"]
    assert [r["embedded"] for r in runs_a] == [2, 1]
    skip = tick(settings_a)
    assert isinstance(skip, SkipReason) and version_a in skip.skip_message

    # Model B: unknown to the record, so the schedule asks for a run instead of skipping.
    request = tick(settings_b)
    assert isinstance(request, RunRequest) and "has not run" in request.tags["reason"]
    assert request.tags["model_version"] == "unknown"
    runs_b = backfill(settings_b)
    version_b = runs_b[0]["model_version"]
    assert version_b != version_a and [r["embedded"] for r in runs_b] == [2, 1]
    with db.read() as session:
        assert set(session.scalars(select(EventEmbedding.model_version))) == {version_b}
        assert sorted(session.scalars(select(EmbedderVersion.model_version))) == sorted([version_a, version_b])

    # Back to model A: its version is known, and every event lacks it now.
    request = tick(settings_a)
    assert request.tags["model_version"] == version_a and request.tags["remaining_events"] == "3"
