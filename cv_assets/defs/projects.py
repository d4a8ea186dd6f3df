"""Projects: the manifest asset, the sensor that finds new or edited projects, and the
job that reprocesses one project's partition end to end."""


from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
    sensor,
)

from cv_assets.events.backfill import embedder_fingerprint
from cv_assets.settings import ConfigError
from cv_assets.manifest import ManifestError, ProjectKeyConflict, discover_manifests, load_manifest
from cv_assets.defs.partitions import projects_partitions
from cv_assets.defs.resources import AppDatabaseResource, SettingsResource
from cv_assets.defs.common import bad_input, project_asset
from cv_assets.store.projects import ProjectRows, load_project, processed_projects, upsert_project
from cv_assets.text import printable

def project_or_fail(app_db: AppDatabaseResource, key: str) -> ProjectRows:
    """The project's rows (folder, scenes, assets); a non-retried Failure when it is not registered."""
    project = load_project(app_db.get(), key)
    if project is None:
        raise bad_input(f"project {key!r} is not registered in {app_db.url}: materialise project_manifest "
                        "(or let project_sensor find its project.yaml) first")
    return project


PROJECT_CHAIN = [
    "project_manifest",
    "video_clips",
    "sampled_frames",
    "reference_embeddings",
    "frame_embeddings",
    "asset_appearances",
    "scene_continuity_scores",
    "project_report",
]
# A whole project run normally takes minutes; this ends a run that hangs.
PROJECT_RUN_MAX_RUNTIME_SEC = 2 * 60 * 60


@project_asset(group_name="projects", kinds={"python", "sqlite"})
def project_manifest(context: AssetExecutionContext, settings: SettingsResource, app_db: AppDatabaseResource) -> MaterializeResult:
    """The project's `project.yaml`, validated and synced into SQLite (projects, assets,
    scene_manifests). Re-materialising picks up edits to the manifest."""
    cfg = settings.load()
    folder = cfg.storage.projects_root / context.partition_key
    try:
        manifest = load_manifest(folder, cfg.manifests)
    except ManifestError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    if manifest.key != context.partition_key:
        raise Failure(f"{folder}/project.yaml names project {manifest.key!r}, not {context.partition_key!r}", allow_retries=False)
    try:
        result = upsert_project(app_db.get(), manifest)
    except ProjectKeyConflict as exc:
        raise bad_input(str(exc)) from None
    rows = "\n".join(
        f"| {s.index} | {s.clip} | {', '.join(s.expected_assets) or '—'} |" for s in manifest.spec.scenes
    )
    return MaterializeResult(
        metadata={
            "project": manifest.name,
            "manifest": MetadataValue.path(str(folder / "project.yaml")),
            "content_hash": manifest.content_hash,
            "assets": result.assets,
            "scenes": result.scenes,
            "changed": result.changed,
            "scenes_table": MetadataValue.md("| scene | clip | expected assets |\n|---|---|---|\n" + rows),
        }
    )


EXECUTORS = {"in_process": in_process_executor, "multiprocess": multiprocess_executor}


def executor_for(name: str):
    """`runs.executor` as a Dagster executor. `k8s`: each step is its own Kubernetes Job
    (dagster-k8s, the deploy extra), so the embedding steps' `dagster-k8s/config` op tags
    put them on GPU nodes while the other steps stay on CPU nodes."""
    if name != "k8s":
        return EXECUTORS[name]
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:
        raise ConfigError("runs.executor is 'k8s' but dagster-k8s is not installed "
                          "(pip install 'cv_assets[deploy]', or use in_process or multiprocess)") from exc
    return k8s_job_executor


def build_project_job(executor: str = "in_process"):
    """The job that materialises one project's whole chain. Every step reads only what the
    step before stored, so any executor gives the same rows; `runs.executor` picks one."""
    return define_asset_job(
        "project_reprocess_job",
        selection=AssetSelection.assets(*[AssetKey(k) for k in PROJECT_CHAIN]),
        partitions_def=projects_partitions,
        executor_def=executor_for(executor),
        tags={"dagster/max_runtime": PROJECT_RUN_MAX_RUNTIME_SEC},
        description="Materialise the whole chain for one project partition (manifest to report).",
    )



PROJECT_SENSOR_DOC = (
    "Finds new or edited projects under storage.projects_root: validates each project.yaml, syncs it "
    "into SQLite, adds its partition and launches project_reprocess_job for it, unless its current "
    "manifest and embedder were already processed (by make run, the UI or an earlier tick)."
)


@sensor(job_name="project_reprocess_job", minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
        description=PROJECT_SENSOR_DOC)
def project_sensor(context: SensorEvaluationContext, settings: SettingsResource, app_db: AppDatabaseResource):
    """Scan `projects_root` for project manifests; validate each, sync it into SQLite, add
    its partition and request a run keyed by the manifest's content hash and the embedder
    configuration (a re-tick never launches a duplicate; an edited manifest, clip or image,
    or a switch of model, launches a new run). A project whose current manifest hash and
    embedder fingerprint a finished run already processed (`record_processed`, whoever ran
    it) is left alone. A bad project never blocks the others: each manifest is capped in
    size (`manifests.*`) and checked on its own, and a folder declaring a key another folder
    registered first is logged and its rows left untouched. A tick that requests nothing
    says why."""
    cfg = settings.load()
    manifests, bad = discover_manifests(cfg.storage.projects_root, cfg.manifests)
    db = app_db.get()
    model = embedder_fingerprint(cfg.embedder)
    processed = processed_projects(db)
    synced, run_requests, unchanged = [], [], []
    for manifest in manifests:
        try:
            upsert_project(db, manifest)
        except ProjectKeyConflict as exc:
            bad[manifest.key] = str(exc)
            continue
        synced.append(manifest.key)
        done = processed.get(manifest.key)
        if done is not None and (done.manifest_hash, done.embedder) == (manifest.content_hash, model):
            unchanged.append(manifest.key)
            continue
        run_requests.append(
            RunRequest(
                partition_key=manifest.key,
                run_key=f"{manifest.key}:{manifest.content_hash}:{model}",
                tags={"cv_assets/project": manifest.key, "cv_assets/manifest_hash": manifest.content_hash,
                      "cv_assets/embedder_fingerprint": model},
            )
        )
    for folder, reason in bad.items():
        context.log.error(printable(f"project {folder} skipped: {reason}"))
    if not synced:
        return SkipReason(printable(f"no valid project under {cfg.storage.projects_root} ({len(bad)} invalid)"))
    known = set(context.instance.get_dynamic_partitions(projects_partitions.name))
    new_keys = [key for key in synced if key not in known]
    partitions = [projects_partitions.build_add_request(new_keys)] if new_keys else []
    if not run_requests:
        reason = _unchanged_text(unchanged, bad)
        context.log.info(reason)  # the tick's logs say it too (the skip reason shows on hover)
        return SensorResult(skip_reason=reason, dynamic_partitions_requests=partitions)
    return SensorResult(run_requests=run_requests, dynamic_partitions_requests=partitions)


def _unchanged_text(unchanged: list[str], bad: dict) -> str:
    """Why a tick requests nothing: "3 projects unchanged (a, b, c); 1 invalid"."""
    names = ", ".join(unchanged[:5]) + (f", +{len(unchanged) - 5} more" if len(unchanged) > 5 else "")
    text = (f"{len(unchanged)} project{'s' if len(unchanged) != 1 else ''} unchanged ({names}): manifest and "
            "embedder already processed")
    return printable(text + (f"; {len(bad)} invalid" if bad else ""))
