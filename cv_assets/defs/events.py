"""Security events: the embedding backfill, recurring visitors, their jobs and schedules.

Wiring only; the work lives in `cv_assets/events/` (backfill, visitors) and the SQL in
`cv_assets/store/events.py`.

The backfill schedule decides "is anything left?" without loading the model. Every
backfill run records which model_version the configured embedder produces, keyed by a
cheap fingerprint of the embedder settings and model files (`embedder_fingerprint`, in
the application database's `embedder_versions` table, so SQLite and PostgreSQL alike).
The schedule looks the configured embedder up there:
- known: it counts the events without an embedding of that version, minus those given up
  for it, and requests a run while any are left;
- unknown (a new model, or no run yet) and there are events: it requests a run, which
  records the version; from then on the count follows the new model until it covers
  every event.
(The Dagster instance is not used for this: a schedule that takes resources gets no
instance under an ephemeral instance, as in tests.)

(No `from __future__ import annotations` here: Dagster reads the Config and resource
annotations at runtime.)
"""

from datetime import datetime, timezone

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetSelection,
    Config,
    DefaultScheduleStatus,
    MaterializeResult,
    MetadataValue,
    RunConfig,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    asset,
    asset_check,
    define_asset_job,
    in_process_executor,
    schedule,
)
from pydantic import Field

from cv_assets.defs.common import (
    PREVIEW_ROWS,
    STORE_RETRY,
    bad_input,
    embedder_label,
    note_embedder,
    stop_on_termination,
    timed,
)
from cv_assets.defs.k8s import GPU_STEP_TAGS
from cv_assets.defs.resources import AppDatabaseResource, EmbedderResource, SettingsResource
from cv_assets.events.backfill import (
    MODES,
    BackfillLimits,
    BackfillReport,
    BatchSizeError,
    embedder_fingerprint,
    events_left,
    given_up_events,
    known_embedder_version,
    outcomes_preview,
    remember_embedder_version,
    resolve_batch_size,
    run_scheduled_batch,
)
from cv_assets.events.visitors import update_recurring_visitors, visitors_table
from cv_assets.settings import Settings

TOP_ENTITIES = 10


class EventEmbeddingConfig(Config):
    mode: str = Field("missing", description="missing: events without a vector for the current model, "
                                             "oldest first (one batch); all: re-embed every event")
    batch_size: int | None = Field(None, description="events per batch; default and most: events.max_batch (<= 100)")


class RecurringVisitorsConfig(Config):
    full_recluster: bool = Field(False, description="re-group every event from scratch instead of adding the new ones")


def _embedding_metadata(report: BackfillReport, fingerprint: str) -> dict:
    rate = {"images_per_sec": MetadataValue.float(round(report.images_per_sec, 2))} if report.embedded else {}
    return {
        "status": report.summary() if report.embedded or report.failed else
        f"nothing to embed: every event has a vector for {report.model_version} or was given up",
        "embedder": embedder_label(report.model_version),
        "model_version": report.model_version,
        "embedder_fingerprint": fingerprint,
        "mode": report.mode,
        "batch_size": report.batch_size,
        "batches": report.batches,
        "embedded": report.embedded,
        "failed": report.failed,
        "skipped": MetadataValue.int(report.skipped),
        "remaining": report.remaining,
        "total_events": report.total_events,
        "coverage_pct": MetadataValue.float(round(report.coverage_pct, 2)),
        **rate,
        "preview": MetadataValue.md(outcomes_preview(report.outcomes, PREVIEW_ROWS)),
    }


@asset(group_name="events", kinds={"python", "sqlite"}, retry_policy=STORE_RETRY)
@timed
@stop_on_termination
def event_embeddings(
    context: AssetExecutionContext,
    config: EventEmbeddingConfig,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    embedder: EmbedderResource,
) -> MaterializeResult:
    """Vectors of event thumbnails from the configured embedder (CLIP, or the colour-histogram
    fallback: metadata `embedder` and the run's `cv_assets/embedder` tag say which), in SQLite
    `event_embeddings` (JSON, model_version).

    `missing` (the schedule's mode) embeds the next batch of events that have no vector
    for the current model, oldest first; `all` re-embeds every event, batch by batch.
    A thumbnail that cannot be embedded is recorded in `embedding_failures` with the
    reason and retried at most `events.max_attempts` times; the event itself is never
    touched and never holds up the rest of the batch.
    """
    limits = BackfillLimits.from_settings(settings.load())
    if config.mode not in MODES:
        raise bad_input(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    try:
        batch_size = resolve_batch_size(config.batch_size, limits.max_batch)
    except BatchSizeError as exc:
        raise bad_input(str(exc)) from None
    db = app_db.get()
    report = run_scheduled_batch(
        db, embedder.get(), limits, mode=config.mode, batch_size=batch_size,
        on_batch=lambda b: context.log.info(f"batch: {b.embedded} embedded, {b.failed} failed"),
    )
    remember_embedder_version(db, embedder.settings(), report.model_version)
    note_embedder(context, report.model_version)
    for reason in report.failures.values():
        context.log.warning(reason)
    context.log.info(report.summary())
    return MaterializeResult(metadata=_embedding_metadata(report, embedder_fingerprint(embedder.settings())))


@asset_check(asset=event_embeddings, description="No event thumbnail has been given up on for the current model.")
def event_embeddings_not_given_up(settings: SettingsResource, app_db: AppDatabaseResource) -> AssetCheckResult:
    given_up = given_up_events(app_db.get(), settings.load().events.max_attempts, PREVIEW_ROWS)
    return AssetCheckResult(
        passed=given_up.count == 0,
        severity=AssetCheckSeverity.WARN,
        description=given_up.summary(),
        metadata={"model_version": given_up.model_version or "none yet", "given_up_count": given_up.count,
                  "given_up_shown": len(given_up.events), "given_up": MetadataValue.md(given_up.table())},
    )


@asset(group_name="events", kinds={"numpy", "sqlite"}, deps=[event_embeddings], retry_policy=STORE_RETRY)
@timed
@stop_on_termination
def recurring_visitors(
    context: AssetExecutionContext,
    config: RecurringVisitorsConfig,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
) -> MaterializeResult:
    """Recurring visitors: embedded events grouped into entities (`recognized_entities`,
    `entity_events`) by thumbnail similarity >= `events.visitor_similarity_threshold`.

    New events join the entity with the nearest centroid or start a new one; with
    `full_recluster` (the nightly schedule) every event is grouped again from scratch.
    Entities seen at least `events.visitor_min_events` times are reported. Only the
    current model version's vectors are grouped.
    """
    events = settings.load().events
    report = update_recurring_visitors(
        app_db.get(), threshold=events.visitor_similarity_threshold, min_events=events.visitor_min_events,
        full_recluster=config.full_recluster, top_limit=TOP_ENTITIES,
    )
    context.log.info(
        f"{report.mode}: {report.new_events} new events, {report.new_entities} new entities, "
        f"{report.entities_reported} recurring visitors"
    )
    return MaterializeResult(
        metadata={
            "model_version": report.model_version or "none yet",
            "mode": report.mode,
            "events_grouped": report.events_considered,
            "new_events": report.new_events,
            "new_entities": report.new_entities,
            "entities": report.entities_total,
            "recurring_visitors": report.entities_reported,
            "events_of_recurring_visitors": report.events_in_reported,
            "seconds": MetadataValue.float(round(report.seconds, 3)),
            "top_entities": MetadataValue.md(visitors_table(report.top)),
        }
    )


event_embedding_backfill_job = define_asset_job(
    "event_embedding_backfill_job",
    selection=AssetSelection.assets(event_embeddings, recurring_visitors),
    description="Embed the next batch of event thumbnails, then fold the new vectors into recurring visitors.",
    # One process: the model loads once and the vector index is shared by both steps.
    executor_def=in_process_executor,
    # The local dagster.yaml (SQLite) limits runs with this tag to one at a time: two
    # overlapping backfills on SQLite would pick the same events and double-count failed
    # attempts. On PostgreSQL each run claims its own batch (SKIP LOCKED), and the deployed
    # instance (deploy/dagster.yaml) allows events.backfill_workers of them at once.
    # On Kubernetes the run is a pod on a GPU node (the model loads once per run).
    tags={"cv_assets/kind": "event_backfill", **GPU_STEP_TAGS},
)

recurring_visitors_job = define_asset_job(
    "recurring_visitors_job",
    selection=AssetSelection.assets(recurring_visitors),
    description="Group embedded events into recurring visitors.",
    executor_def=in_process_executor,
)

def build_event_schedules(settings: Settings) -> list:
    """The event schedules, with their crons and limits from the settings the definitions
    are built from (the resources come from the same settings)."""
    max_attempts = settings.events.max_attempts
    workers, max_batch = settings.events.backfill_workers, settings.events.max_batch

    @schedule(
        cron_schedule=settings.events.backfill_cron,
        job=event_embedding_backfill_job,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Embeds event thumbnails batch by batch while any event lacks a vector "
                    "(up to events.backfill_workers runs per tick on PostgreSQL).",
    )
    def event_embedding_backfill_schedule(
        context: ScheduleEvaluationContext, app_db: AppDatabaseResource, embedder: EmbedderResource
    ):
        db = app_db.get()
        configured = embedder.settings()
        version = known_embedder_version(db, configured)
        total, remaining = events_left(db, version, max_attempts)
        if total == 0:
            return SkipReason("there are no events yet")
        if remaining == 0:
            return SkipReason(f"every event has an embedding for {version} (or was given up)")
        tick = context.scheduled_execution_time or datetime.now(timezone.utc)
        tags = {"model_version": version or "unknown", "embedder_fingerprint": embedder_fingerprint(configured)}
        if remaining is None:
            tags["reason"] = "the configured embedder has not run on these events yet"
        else:
            tags["remaining_events"] = str(remaining)
        key = f"event_embeddings:{tick.isoformat()}"
        # Several runs only where they claim disjoint batches; never more than there are batches left.
        runs = workers if db.supports_skip_locked else 1
        if remaining is not None:
            runs = min(runs, -(-remaining // max_batch))
        if runs == 1:
            return RunRequest(run_key=key, tags=tags)
        return [RunRequest(run_key=key if i == 0 else f"{key}:{i}", tags={**tags, "backfill_worker": str(i)})
                for i in range(runs)]

    @schedule(
        cron_schedule=settings.events.visitor_recluster_cron,
        job=recurring_visitors_job,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Nightly full re-cluster of recurring visitors (fixes the drift of incremental grouping).",
    )
    def recurring_visitors_nightly_schedule(context: ScheduleEvaluationContext):
        tick = context.scheduled_execution_time or datetime.now(timezone.utc)
        return RunRequest(
            run_key=f"recurring_visitors:{tick.isoformat()}",
            run_config=RunConfig(ops={"recurring_visitors": RecurringVisitorsConfig(full_recluster=True)}),
        )

    return [event_embedding_backfill_schedule, recurring_visitors_nightly_schedule]


EVENT_ASSETS = [event_embeddings, recurring_visitors]
EVENT_CHECKS = [event_embeddings_not_given_up]
EVENT_JOBS = [event_embedding_backfill_job, recurring_visitors_job]
