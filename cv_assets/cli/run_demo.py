"""Run everything for the data on disk, as `make run` does: sync project manifests, import
demo events, materialise each project's chain and the event backfill until nothing is left."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dagster import DagsterInstance

from cv_assets.manifest import discover_manifests
from cv_assets.defs.partitions import projects_partitions
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase
from cv_assets.store.projects import upsert_project


# Step-by-step DEBUG logs stay in the run's log (visible in `make ui`); the terminal gets the summary.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance() -> DagsterInstance:
    try:
        return DagsterInstance.get()  # DAGSTER_HOME (the Makefile sets it): runs show in `make ui`
    except Exception:
        return DagsterInstance.ephemeral()


def run_everything(config_path: str | None = None) -> dict:
    from cv_assets.events.importer import import_events_file
    from cv_assets.definitions import build_definitions

    settings = load_settings(config_path)
    defs = build_definitions(settings)
    instance = _instance()
    db = AppDatabase(settings.storage.sqlite_url)
    lines, summary = [], {"projects": {}, "events": {}, "ok": True}

    manifests, bad = discover_manifests(settings.storage.projects_root)
    for folder, reason in bad.items():
        lines.append(f"skipped invalid project {folder}: {reason}")
    keys = [m.key for m in manifests]
    for manifest in manifests:
        upsert_project(db, manifest)
    if keys:
        instance.add_dynamic_partitions(projects_partitions.name, keys)
    job = defs.resolve_job_def("project_reprocess_job")
    for key in keys:
        started = time.perf_counter()
        result = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False, run_config=QUIET)
        summary["projects"][key] = {"success": result.success, "seconds": round(time.perf_counter() - started, 1)}
        summary["ok"] &= result.success
        lines.append(_project_line(db, settings, key, result.success, time.perf_counter() - started))

    events_file = settings.storage.thumbnails_root.parent / "events" / "events.jsonl"
    if events_file.is_file():
        report = import_events_file(db, events_file, settings)
        lines.append(f"events imported from {events_file}: {report.summary()}")
    backfill = defs.resolve_job_def("event_embedding_backfill_job")
    runs = 0
    while True:
        result = backfill.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET)
        runs += 1
        summary["ok"] &= result.success
        remaining = _metadata_value(result, "event_embeddings", "remaining")
        if not result.success or not remaining or runs >= 1000:
            break
    visitors = defs.resolve_job_def("recurring_visitors_job").execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET)
    summary["ok"] &= visitors.success
    summary["events"] = _events_summary(db)
    lines.append(f"event backfill: {runs} run(s); {json.dumps(summary['events'])}")
    summary["text"] = "\n".join(["cv_assets run summary", "=" * 21, *lines, "OK" if summary["ok"] else "SOME RUNS FAILED"])
    return summary


def _metadata_value(result, asset_name: str, key: str):
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] == asset_name and key in mat.metadata:
            return mat.metadata[key].value
    return None


def _project_line(db: AppDatabase, settings, key: str, success: bool, seconds: float) -> str:
    from sqlalchemy import func, select

    from cv_assets.store.models import AssetAppearance, Project, SceneManifest

    with db.read() as session:
        project = session.scalar(select(Project).where(Project.key == key))
        n_app = session.scalar(select(func.count()).select_from(AssetAppearance).where(AssetAppearance.project_id == project.id))
        scores = session.execute(select(SceneManifest.scene_index, SceneManifest.continuity_score).where(SceneManifest.project_id == project.id).order_by(SceneManifest.scene_index)).all()
    score_text = ", ".join(f"scene {i}: {s:.1f}" if s is not None else f"scene {i}: —" for i, s in scores)
    report = Path(settings.storage.reports_dir) / f"{key}.html"
    return (f"project {key}: {'ok' if success else 'FAILED'} in {seconds:.1f}s; {n_app} appearances; continuity {score_text}; "
            f"report {report if report.exists() else '(not written)'}")


def _events_summary(db: AppDatabase) -> dict:
    from cv_assets.store.database import table_counts

    return table_counts(db, ["events", "event_embeddings", "embedding_failures", "recognized_entities"])
