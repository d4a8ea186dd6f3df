"""The one Definitions object of the code location, listing everything explicitly."""

from __future__ import annotations

from dagster import Definitions

from cv_assets.defs.analysis import ANALYSIS_ASSETS, ANALYSIS_CHECKS
from cv_assets.defs.embeddings import EMBEDDING_ASSETS, EMBEDDING_CHECKS
from cv_assets.defs.events import EVENT_ASSETS, EVENT_CHECKS, EVENT_JOBS, build_event_schedules
from cv_assets.defs.projects import build_project_job, project_manifest, project_sensor
from cv_assets.defs.resources import build_resources
from cv_assets.defs.video import VIDEO_ASSETS, VIDEO_CHECKS
from cv_assets.settings import Settings, load_settings


def build_definitions(settings: Settings, config_path: str | None = None) -> Definitions:
    """Definitions for one configuration (the CLI and tests pass their own)."""
    return Definitions(
        assets=[project_manifest, *VIDEO_ASSETS, *EMBEDDING_ASSETS, *ANALYSIS_ASSETS, *EVENT_ASSETS],
        asset_checks=[*VIDEO_CHECKS, *EMBEDDING_CHECKS, *ANALYSIS_CHECKS, *EVENT_CHECKS],
        jobs=[build_project_job(settings.runs.executor), *EVENT_JOBS],
        schedules=build_event_schedules(settings),
        sensors=[project_sensor],
        resources=build_resources(settings),
    )


defs = build_definitions(load_settings())


def project_job_from_env():
    """The project job of the configuration in $CV_ASSETS_CONFIG, importable by reference:
    `execute_job(reconstructable(project_job_from_env), ...)` rebuilds it in every step process."""
    return build_definitions(load_settings()).resolve_job_def("project_reprocess_job")
