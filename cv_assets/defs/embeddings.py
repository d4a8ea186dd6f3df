"""CLIP vectors for reference images and sampled frames (wiring only; the work is in
cv_assets/embedding)."""

import warnings

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    asset,
    asset_check,
)
from sqlalchemy import select

from cv_assets.defs.partitions import projects_partitions
from cv_assets.defs.resources import AppDatabaseResource, EmbedderResource, WarehouseResource
from cv_assets.defs.common import STORE_RETRY, stop_on_termination
from cv_assets.embedding import ModelUnavailableError
from cv_assets.embedding.refresh import (
    RefreshReport,
    VectorCheck,
    blob_to_vector,
    check_vectors,
    refresh_frame_embeddings,
    refresh_reference_embeddings,
)
from cv_assets.store.models import Asset, Project

PREVIEW_ROWS = 20


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in rows[:PREVIEW_ROWS]]
    if len(rows) > PREVIEW_ROWS:
        lines.append(f"| … {len(rows) - PREVIEW_ROWS} more | " + " | " * (len(header) - 1))
    return "\n".join(lines)


def _metadata(report: RefreshReport, header: list[str]) -> dict:
    return {
        "embedded": report.embedded,
        "skipped_unchanged": report.skipped,
        "failed": report.failed,
        "total": report.total,
        "images_per_sec": round(report.images_per_sec, 2),
        "ms_per_image": round(report.ms_per_image, 2),
        "embed_seconds": round(report.embed_seconds, 3),
        "model_version": report.model_version,
        "device": report.device,
        "embedder_family": report.family,
        "failures": MetadataValue.md(_md_table(["item", "reason"], [[k, v] for k, v in report.failures.items()])
                                     if report.failures else "none"),
        "preview": MetadataValue.md(_md_table(header, report.preview) if report.preview else "nothing to embed"),
    }


def _model_or_fail(embedder: EmbedderResource):
    model = embedder.get()
    try:
        model.ensure_ready()
    except ModelUnavailableError as exc:
        raise Failure(str(exc), allow_retries=False) from None
    return model


@asset(
    partitions_def=projects_partitions,
    deps=["project_manifest"],
    group_name="embeddings",
    kinds={"pytorch", "sqlite"},
    retry_policy=STORE_RETRY,
)
@stop_on_termination
def reference_embeddings(
    context: AssetExecutionContext, app_db: AppDatabaseResource, embedder: EmbedderResource
) -> MaterializeResult:
    """A 512-d unit vector for every reference asset image of the project, written to SQLite
    `assets.clip_embedding` (float32 bytes) with `embedding_model_version` and the image's
    sha256. Images whose bytes and model are unchanged are skipped; a bad image is recorded
    in `embedding_failures` (item `<project>/<code>`) and never stops the other assets."""
    model = _model_or_fail(embedder)
    try:
        report = refresh_reference_embeddings(app_db.get(), context.partition_key, model)
    except LookupError as exc:
        raise Failure(f"{exc}: materialise project_manifest first", allow_retries=False) from None
    for item, reason in report.failures.items():
        context.log.warning(f"reference image of {item} not embedded: {reason}")
    return MaterializeResult(metadata=_metadata(report, ["asset", "status", "image"]))


@asset(
    partitions_def=projects_partitions,
    deps=["sampled_frames"],
    group_name="embeddings",
    kinds={"pytorch", "duckdb"},
    retry_policy=STORE_RETRY,
)
@stop_on_termination
def frame_embeddings(
    context: AssetExecutionContext,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
    embedder: EmbedderResource,
) -> MaterializeResult:
    """A 512-d unit vector for every sampled frame of the project, in DuckDB
    `frame_embeddings` (FLOAT[512], model_version, the frame's content hash). Pixels come
    from the sampler's in-process frame cache when it has them, else from the exported JPEG.
    Frames whose pixels and model are unchanged keep their vectors; the project's rows are
    replaced in one transaction. A frame that cannot be read is recorded in
    `embedding_failures` (item `<project>/<scene>/<frame>`) and never stops the others."""
    model = _model_or_fail(embedder)
    report = refresh_frame_embeddings(warehouse.get(), app_db.get(), context.partition_key, model)
    for item, reason in report.failures.items():
        context.log.warning(f"frame {item} not embedded: {reason}")
    return MaterializeResult(metadata=_metadata(report, ["scene", "frame", "status"]))


def _check_result(result: VectorCheck) -> AssetCheckResult:
    return AssetCheckResult(
        passed=result.passed,
        metadata={
            "vectors": result.rows,
            "wrong_dimension": ", ".join(result.bad_dimension[:PREVIEW_ROWS]) or "none",
            "not_unit_norm": ", ".join(result.bad_norm[:PREVIEW_ROWS]) or "none",
            "with_nan": ", ".join(result.with_nan[:PREVIEW_ROWS]) or "none",
            "model_versions": ", ".join(result.model_versions) or "none",
        },
    )


def _partitioned_check(asset_def, description: str):
    """A check that runs per project partition, so "one model_version" means per project.
    (Partitioned checks are a Dagster preview feature; its warning is silenced here only.)"""

    def decorate(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PreviewWarning)
            return asset_check(asset=asset_def, partitions_def=projects_partitions, description=description)(fn)

    return decorate


@_partitioned_check(
    reference_embeddings,
    "Reference vectors: 512 dimensions, unit norm within 1e-3, no NaN, one model_version per project.",
)
def reference_embeddings_are_valid(context: AssetCheckExecutionContext, app_db: AppDatabaseResource) -> AssetCheckResult:
    with app_db.get().read() as session:
        rows = session.execute(
            select(Asset.code, Asset.clip_embedding, Asset.embedding_model_version)
            .join(Project, Project.id == Asset.project_id)
            .where(Project.key == context.partition_key)
        ).all()
    return _check_result(check_vectors([(code, blob_to_vector(blob), version) for code, blob, version in rows]))


@_partitioned_check(
    frame_embeddings,
    "Frame vectors: 512 dimensions, unit norm within 1e-3, no NaN, one model_version per project.",
)
def frame_embeddings_are_valid(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    rows = warehouse.get().query(
        "SELECT scene_index, frame_index, embedding, model_version FROM frame_embeddings WHERE project = ?",
        [context.partition_key])
    items = [(f"scene {r.scene_index} frame {r.frame_index}", np.asarray(r.embedding, dtype=np.float32), r.model_version)
             for r in rows.itertuples(index=False)]
    return _check_result(check_vectors(items))


EMBEDDING_ASSETS = [reference_embeddings, frame_embeddings]
EMBEDDING_CHECKS = [reference_embeddings_are_valid, frame_embeddings_are_valid]
