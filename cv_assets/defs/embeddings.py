"""Vectors for reference images and sampled frames (wiring only; the work is
`cv_assets.embedding.refresh.refresh_embeddings`, the rows are written by `cv_assets.store.embeddings`)."""

from pathlib import Path

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetRecordsFilter,
    MaterializeResult,
    MetadataValue,
)

from cv_assets.defs.common import (
    PREVIEW_ROWS,
    bad_input,
    embedder_label,
    markdown_table,
    note_embedder,
    partitioned_check,
    project_asset,
)
from cv_assets.defs.k8s import GPU_STEP_TAGS
from cv_assets.defs.projects import project_or_fail
from cv_assets.defs.resources import AppDatabaseResource, EmbedderResource, WarehouseResource
from cv_assets.embedding import ModelUnavailableError
from cv_assets.embedding.refresh import (
    EmbedInput,
    RefreshReport,
    StoredVector,
    check_vectors,
    read_reference_image,
    refresh_embeddings,
    unchanged_report,
)
from cv_assets.events.backfill import known_embedder_version, remember_embedder_version
from cv_assets.store.embeddings import (
    all_frame_vectors,
    asset_item_id,
    frame_item_id,
    save_frame_vectors,
    save_reference_vectors,
    stored_frame_vectors,
    stored_reference_vectors,
)
from cv_assets.store.frames import sampled_frame_rows


def _metadata(report: RefreshReport, item_name: str, unchanged_since: str | None) -> dict:
    preview = (MetadataValue.md(markdown_table([item_name, "status"], report.preview, limit=PREVIEW_ROWS))
               if report.preview else "nothing to embed")
    if report.total and not report.embedded and not report.failed:  # a no-op: say so, not zeros
        return {
            "status": f"unchanged since run {unchanged_since[:8]}" if unchanged_since else "unchanged",
            "kept": report.skipped,
            "total": report.total,
            "embedder": embedder_label(report.model_version),
            "model_version": report.model_version,
            "embedder_family": report.family,
            "preview": preview,
        }
    return {
        "status": f"{report.embedded} embedded, {report.skipped} unchanged, {report.failed} failed",
        "embedded": report.embedded,
        "skipped_unchanged": report.skipped,
        "failed": report.failed,
        "total": report.total,
        "images_per_sec": round(report.images_per_sec, 2),
        "ms_per_image": round(report.ms_per_image, 2),
        "embed_seconds": round(report.embed_seconds, 3),
        "embedder": embedder_label(report.model_version),
        "model_version": report.model_version,
        "device": report.device,
        "backend": f"{report.backend} {report.precision}",
        "embedder_family": report.family,
        "failures": MetadataValue.md(markdown_table(["item", "reason"], report.failures.items(), limit=PREVIEW_ROWS))
        if report.failures else "none",
        "preview": preview,
    }


def _finish(context: AssetExecutionContext, report: RefreshReport, item_name: str,
            root: str | None = None) -> MaterializeResult:
    note_embedder(context, report.model_version)
    if root:  # table cells name files relative to the project folder
        report.preview = [[label.removeprefix(f"{root.rstrip('/')}/"), *rest] for label, *rest in report.preview]
    since = _last_written_by(context) if report.total and not report.embedded and not report.failed else None
    metadata = _metadata(report, item_name, since)
    if since:
        metadata["unchanged_since_run"] = since
    return MaterializeResult(metadata=metadata)


def _last_written_by(context: AssetExecutionContext) -> str | None:
    """The run that last wrote this partition's vectors: the previous materialisation's run,
    or the run that one was itself unchanged since. None on a fresh instance."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[context.partition_key]), limit=1).records
    if not records:
        return None
    earlier = records[0].asset_materialization.metadata.get("unchanged_since_run")
    return earlier.value if earlier is not None else records[0].run_id


def _model_or_fail(embedder: EmbedderResource):
    model = embedder.get()
    try:
        model.ensure_ready()
    except ModelUnavailableError as exc:
        raise bad_input(str(exc)) from None
    return model


def _refresh(inputs, stored, embedder: EmbedderResource, app_db: AppDatabaseResource) -> RefreshReport:
    """Embed what changed. When the configured embedder's model_version is already known
    (recorded by an earlier run) and nothing changed, the model is not even loaded."""
    known = known_embedder_version(app_db.get(), embedder.settings())
    report = unchanged_report(inputs, stored, known) if known else None
    if report is None:
        report = refresh_embeddings(inputs, stored, _model_or_fail(embedder))
        remember_embedder_version(app_db.get(), embedder.settings(), report.model_version)
    return report


@project_asset(deps=["project_manifest"], group_name="embeddings", kinds={"python", "sqlite"}, op_tags=GPU_STEP_TAGS)
def reference_embeddings(
    context: AssetExecutionContext, app_db: AppDatabaseResource, embedder: EmbedderResource
) -> MaterializeResult:
    """A 512-d unit vector from the configured embedder (CLIP; the colour-histogram fallback
    only where config allows it and CLIP is unavailable: metadata `embedder` and the run's
    `cv_assets/embedder` tag say which) for every reference asset image of the project, written to SQLite
    `assets.clip_embedding` (float32 bytes) with `embedding_model_version` and the image's
    sha256. Images whose bytes and model are unchanged are skipped; a bad image is recorded
    in `embedding_failures` (item `<project>/<code>`) and never stops the other assets."""
    project = project_or_fail(app_db, context.partition_key)
    inputs = [read_reference_image(asset_item_id(project.key, a.code), Path(project.root_path) / a.reference_image_path) for a in project.assets]
    stored = {item: StoredVector(*values) for item, values in stored_reference_vectors(project.assets, project.key).items()}
    report = _refresh(inputs, stored, embedder, app_db)
    save_reference_vectors(app_db.get(), project.key, project.assets, report.model_version, report.vectors, report.failures)
    for item, reason in report.failures.items():
        context.log.warning(f"reference image of {item} not embedded: {reason}")
    return _finish(context, report, "asset", project.root_path)


@project_asset(deps=["sampled_frames"], group_name="embeddings", kinds={"python", "duckdb"}, op_tags=GPU_STEP_TAGS)
def frame_embeddings(context: AssetExecutionContext, app_db: AppDatabaseResource,
                     warehouse: WarehouseResource, embedder: EmbedderResource) -> MaterializeResult:
    """A 512-d unit vector from the configured embedder (CLIP, or the colour-histogram
    fallback: metadata `embedder` says which) for every sampled frame of the project, in DuckDB
    `frame_embeddings` (FLOAT[512], model_version, the frame's content hash), computed from
    the lossless frame files `sampled_frames` stored (the same pixels in any process).
    Frames whose pixels and model are unchanged keep their vectors; the project's rows are
    replaced in one transaction. A frame that cannot be read is recorded in
    `embedding_failures` (item `<project>/<scene>/<frame>`) and never stops the others."""
    key = context.partition_key
    store = warehouse.get()
    frames = sampled_frame_rows(store, key)
    inputs = [_frame_input(key, row) for row in frames.itertuples(index=False)]
    stored_rows = stored_frame_vectors(store, key)
    stored = {frame_item_id(key, r.scene_index, r.frame_index): StoredVector(r.content_hash, r.model_version, np.asarray(r.embedding, np.float32))
              for r in stored_rows.itertuples(index=False)}
    report = _refresh(inputs, stored, embedder, app_db)
    save_frame_vectors(store, app_db.get(), key, report.model_version, stored_rows, report.kept, report.vectors,
                       report.failures, [i.item_id for i in inputs])
    for item, reason in report.failures.items():
        context.log.warning(f"frame {item} not embedded: {reason}")
    return _finish(context, report, "frame")


def _frame_input(project: str, row) -> EmbedInput:
    item_id = frame_item_id(project, row.scene_index, row.frame_index)
    label = f"scene {int(row.scene_index)} frame {int(row.frame_index)}"  # short: the preview table's cell
    if not isinstance(row.image_path, str) or not row.image_path or not isinstance(row.content_hash, str):
        return EmbedInput(item_id, label, None, error=f"{label}: no frame file recorded (image_path {row.image_path!r})")
    return EmbedInput(item_id, label, row.content_hash, source=row.image_path)


def _check_result(items) -> AssetCheckResult:
    result = check_vectors(items)
    return AssetCheckResult(
        passed=result.passed,
        description=result.summary(),
        metadata={
            "vectors": result.rows,
            "wrong_dimension": ", ".join(result.bad_dimension[:PREVIEW_ROWS]) or "none",
            "not_unit_norm": ", ".join(result.bad_norm[:PREVIEW_ROWS]) or "none",
            "with_nan": ", ".join(result.with_nan[:PREVIEW_ROWS]) or "none",
            "model_versions": ", ".join(result.model_versions) or "none",
        },
    )


@partitioned_check(
    reference_embeddings,
    "Reference vectors: 512 dimensions, unit norm within 1e-3, no NaN, one model_version per project.",
)
def reference_embeddings_are_valid(context: AssetCheckExecutionContext, app_db: AppDatabaseResource) -> AssetCheckResult:
    project = project_or_fail(app_db, context.partition_key)
    stored = stored_reference_vectors(project.assets, project.key)
    return _check_result([(item, vector, version) for item, (_, version, vector) in stored.items()])


@partitioned_check(
    frame_embeddings,
    "Frame vectors: 512 dimensions, unit norm within 1e-3, no NaN, one model_version per project.",
)
def frame_embeddings_are_valid(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    rows = all_frame_vectors(warehouse.get(), context.partition_key)
    return _check_result([(f"scene {r.scene_index} frame {r.frame_index}", np.asarray(r.embedding, dtype=np.float32), r.model_version)
                          for r in rows.itertuples(index=False)])


EMBEDDING_ASSETS = [reference_embeddings, frame_embeddings]
EMBEDDING_CHECKS = [reference_embeddings_are_valid, frame_embeddings_are_valid]
