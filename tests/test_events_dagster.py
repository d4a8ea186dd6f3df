"""The event assets, check, jobs and schedules, run through Dagster with the tiny CLIP model."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from dagster import (
    AssetCheckSeverity,
    DagsterInstance,
    Definitions,
    RunRequest,
    SkipReason,
    build_schedule_context,
    materialize,
)
from sqlalchemy import func, select
from helpers.events import T0, add_events, colour_events

from cv_assets.events.search import clear_vector_indexes
from cv_assets.defs.events import (
    EVENT_ASSETS,
    EVENT_CHECKS,
    EVENT_JOBS,
    build_event_schedules,
    event_embeddings,
    recurring_visitors,
)
from cv_assets.defs.resources import build_resources
from cv_assets.store import AppDatabase
from cv_assets.store.models import EmbeddingFailure, EntityEvent, EventEmbedding

TICK = datetime(2026, 11, 21, 6, 15, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def fresh_indexes():
    clear_vector_indexes()
    yield
    clear_vector_indexes()


@pytest.fixture
def env(settings_factory):
    settings, config_path = settings_factory(events={"max_batch": 5, "max_attempts": 2, "visitor_min_events": 2})
    db = AppDatabase(settings.storage.sqlite_url)
    return settings, build_resources(settings), db


def schedules_of(settings) -> dict:
    return {s.name: s for s in build_event_schedules(settings)}


def metadata_of(result, asset_name):
    materializations = [m for m in result.asset_materializations_for_node(asset_name)]
    assert len(materializations) == 1
    return {key: value.value for key, value in materializations[0].metadata.items()}


def count(db, model) -> int:
    with db.read() as session:
        return session.scalar(select(func.count()).select_from(model))


def embedding_config(**config):
    return {"ops": {"event_embeddings": {"config": config}}}


def test_assets_embed_a_batch_and_group_visitors(env):
    settings, resources, db = env
    colour_events(db, ["red", "red", "blue", "blue", "green", "yellow"])
    add_events(db, [{"id": "broken", "camera_id": "garage", "started_at": T0 - timedelta(days=1),
                     "thumbnail_base64": "definitely not base64!"}])
    instance = DagsterInstance.ephemeral()
    result = materialize([event_embeddings, recurring_visitors], resources=resources, instance=instance)
    assert result.success
    meta = metadata_of(result, "event_embeddings")
    assert meta["mode"] == "missing" and meta["batch_size"] == 5
    assert meta["embedded"] == 4 and meta["failed"] == 1  # oldest first: the broken event is in the first batch
    assert meta["remaining"] == 3 and meta["skipped"] == 0 and meta["total_events"] == 7
    assert meta["coverage_pct"] == pytest.approx(100 * 4 / 7, abs=0.01)
    assert meta["model_version"].startswith("clip:tiny-clip@sha256:")
    assert meta["images_per_sec"] > 0
    assert "| broken | garage |" in meta["preview"] and "not valid base64" in meta["preview"]
    visitors = metadata_of(result, "recurring_visitors")
    assert visitors["events_grouped"] == 4 and visitors["mode"] == "incremental"
    assert count(db, EntityEvent) == 4

    second = materialize([event_embeddings, recurring_visitors], resources=resources, instance=instance)
    meta = metadata_of(second, "event_embeddings")
    assert meta["embedded"] == 2 and meta["failed"] == 1 and meta["remaining"] == 0 and meta["skipped"] == 1
    assert metadata_of(second, "recurring_visitors")["new_events"] == 2
    with db.read() as session:
        failure = session.scalars(select(EmbeddingFailure)).one()
    assert failure.item_id == "broken" and failure.attempts == 2 and "broken" in failure.reason
    third = materialize([event_embeddings, *EVENT_CHECKS], resources=resources, instance=instance)
    meta = metadata_of(third, "event_embeddings")
    assert meta["embedded"] == 0 and meta["failed"] == 0 and meta["batches"] == 0  # given up: nothing left to try
    [check] = third.get_asset_check_evaluations()
    assert check.check_name == "event_embeddings_not_given_up" and not check.passed
    assert "| broken | 2 |" in check.metadata["given_up"].value
    assert check.severity == AssetCheckSeverity.WARN
    assert re.fullmatch(r"1 thumbnail given up for clip:tiny-clip@sha256:\w+: broken: event broken: .*not valid base64.*",
                        check.description)
    assert count(db, EventEmbedding) == 6


def test_mode_all_and_batch_size_from_run_config(env):
    _, resources, db = env
    colour_events(db, ["red", "blue", "green"])
    instance = DagsterInstance.ephemeral()
    first = materialize([event_embeddings], resources=resources, instance=instance,
                        run_config=embedding_config(batch_size=2))
    assert metadata_of(first, "event_embeddings")["embedded"] == 2
    everything = materialize([event_embeddings], resources=resources, instance=instance,
                             run_config=embedding_config(mode="all", batch_size=2))
    meta = metadata_of(everything, "event_embeddings")
    assert meta["mode"] == "all" and meta["embedded"] == 3 and meta["batches"] == 2 and meta["remaining"] == 0


@pytest.mark.parametrize("config, message", [
    ({"batch_size": 101}, r"batch_size 101 is over the limit of 5 events per batch"),
    ({"batch_size": 6}, r"batch_size 6 is over the limit of 5"),
    ({"mode": "some"}, r"mode must be one of missing, all"),
])
def test_refused_run_configs(env, config, message):
    _, resources, db = env
    colour_events(db, ["red"])
    result = materialize([event_embeddings], resources=resources, instance=DagsterInstance.ephemeral(),
                         run_config=embedding_config(**config), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert re.search(message, failure.event_specific_data.error.message)
    assert count(db, EventEmbedding) == 0


def tick_schedule(instance, settings, resources, when=TICK):
    context = build_schedule_context(instance=instance, scheduled_execution_time=when, resources=resources)
    return schedules_of(settings)["event_embedding_backfill_schedule"](context)


def test_backfill_schedule_requests_runs_while_events_remain(env):
    settings, resources, db = env
    instance = DagsterInstance.ephemeral()

    skip = tick_schedule(instance, settings, resources)
    assert isinstance(skip, SkipReason) and "no events" in skip.skip_message
    colour_events(db, ["red", "blue"])
    add_events(db, [{"id": "broken", "camera_id": "c", "started_at": T0, "thumbnail_base64": "%"}])
    request = tick_schedule(instance, settings, resources)
    assert isinstance(request, RunRequest)
    assert request.run_key == f"event_embeddings:{TICK.isoformat()}"
    assert "has not run" in request.tags["reason"]  # the embedder's version is not known yet
    assert tick_schedule(instance, settings, resources).run_key == request.run_key  # a re-tick asks for the same run
    assert tick_schedule(instance, settings, resources, TICK + timedelta(minutes=15)).run_key != request.run_key

    first = materialize([event_embeddings], resources=resources, instance=instance)
    version = metadata_of(first, "event_embeddings")["model_version"]
    request = tick_schedule(instance, settings, resources)
    assert isinstance(request, RunRequest) and request.tags["remaining_events"] == "1"  # broken: attempt 1 of 2
    assert request.tags["model_version"] == version
    materialize([event_embeddings], resources=resources, instance=instance)
    skip = tick_schedule(instance, settings, resources)
    assert isinstance(skip, SkipReason) and f"every event has an embedding for {version}" in skip.skip_message


def test_schedule_notices_a_model_change_without_loading_the_model(settings_factory, tiny_clip_dir_b):
    settings, config_path = settings_factory(events={"max_batch": 5})
    db = AppDatabase(settings.storage.sqlite_url)
    colour_events(db, ["red", "blue", "green"])
    instance = DagsterInstance.ephemeral()
    model_a = build_resources(settings)
    materialize([event_embeddings], resources=model_a, instance=instance)
    assert isinstance(tick_schedule(instance, settings, model_a), SkipReason)

    settings_b, config_b = settings_factory(events={"max_batch": 2}, embedder={"model": str(tiny_clip_dir_b)})
    model_b = build_resources(settings_b)
    request = tick_schedule(instance, settings_b, model_b)
    assert isinstance(request, RunRequest) and "has not run" in request.tags["reason"]
    runs = [metadata_of(materialize([event_embeddings], resources=model_b, instance=instance), "event_embeddings")]
    version_b = runs[0]["model_version"]
    while isinstance(request := tick_schedule(instance, settings_b, model_b), RunRequest):
        assert request.tags["model_version"] == version_b
        runs.append(metadata_of(materialize([event_embeddings], resources=model_b, instance=instance),
                                "event_embeddings"))
    assert [r["embedded"] for r in runs] == [2, 1]
    with db.read() as session:
        assert session.execute(select(EventEmbedding.model_version).distinct()).scalars().all() == [version_b]
    # Back to model A: its version is known, and every event lacks it now.
    assert tick_schedule(instance, settings, model_a).tags["remaining_events"] == "3"


def test_nightly_schedule_reclusters_from_scratch(env):
    settings, resources, db = env
    colour_events(db, ["red", "red", "blue"])
    instance = DagsterInstance.ephemeral()
    materialize([event_embeddings, recurring_visitors], resources=resources, instance=instance)
    nightly = schedules_of(settings)["recurring_visitors_nightly_schedule"]
    request = nightly(build_schedule_context(instance=instance, scheduled_execution_time=TICK))
    assert request.run_key == f"recurring_visitors:{TICK.isoformat()}"
    run_config = request.run_config
    assert run_config["ops"]["recurring_visitors"]["config"]["full_recluster"] is True
    result = materialize([event_embeddings, recurring_visitors], selection=[recurring_visitors],
                         resources=resources, instance=instance, run_config=run_config)
    meta = metadata_of(result, "recurring_visitors")
    assert meta["mode"] == "full" and meta["events_grouped"] == 3
    assert count(db, EntityEvent) == 3


def test_definitions_load_and_the_backfill_job_runs(env):
    settings, resources, db = env
    colour_events(db, ["red", "blue"])
    defs = Definitions(assets=EVENT_ASSETS, asset_checks=EVENT_CHECKS, jobs=EVENT_JOBS,
                       schedules=build_event_schedules(settings), resources=resources)
    Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("event_embedding_backfill_job")
    result = job.execute_in_process(instance=DagsterInstance.ephemeral())
    assert result.success
    assert {m.asset_key.path[-1] for m in result.asset_materializations_for_node("event_embeddings")} == {"event_embeddings"}
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("event_embeddings_not_given_up", True)]
    assert checks[0].description.startswith("no thumbnail given up for clip:tiny-clip@sha256:")
    assert count(db, EventEmbedding) == 2 and count(db, EntityEvent) == 2
    assert defs.resolve_schedule_def("event_embedding_backfill_schedule").cron_schedule == "*/15 * * * *"
