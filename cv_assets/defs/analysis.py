"""Appearances, continuity scores and the project report (wiring only; the work is in
cv_assets/analysis)."""


import json
import time

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
    asset_check,
)
from sqlalchemy import select

from cv_assets.analysis.appearances import FrameInput, ReferenceAsset, candidate_regions, evaluate_against_truth, match_frames
from cv_assets.analysis.continuity import SceneInput, score_scenes
from cv_assets.analysis.detectors import run_face_match, run_yolo
from cv_assets.analysis.ground_truth import load_ground_truth
from cv_assets.analysis.report import ReportFrame, render_report, write_report
from cv_assets.defs.partitions import projects_partitions
from cv_assets.defs.resources import AppDatabaseResource, EmbedderResource, SettingsResource, WarehouseResource
from cv_assets.defs.common import stop_on_termination
from cv_assets.embedding.images import ImageError, load_image
from cv_assets.store.appearances import load_appearances, replace_appearances, replace_region_embeddings
from cv_assets.store.frames import frame_image, sampled_frame_rows
from cv_assets.store.models import SceneManifest
from cv_assets.store.projects import ProjectRows, asset_vector, load_project

RETRY = RetryPolicy(max_retries=2, delay=1.0)


def _project_or_fail(app_db: AppDatabaseResource, key: str) -> ProjectRows:
    project = load_project(app_db.get(), key)
    if project is None:
        raise Failure(f"project {key!r} is not registered: materialise project_manifest first", allow_retries=False)
    return project


def _frame_inputs(warehouse, project: str) -> tuple[list[FrameInput], list[str]]:
    frames, missing = [], []
    for row in sampled_frame_rows(warehouse, project).itertuples():
        image = frame_image(project, row)
        if image is None:
            missing.append(f"scene {row.scene_index} frame {row.frame_index}: image missing at {row.image_path}")
            continue
        frames.append(FrameInput(int(row.scene_index), int(row.frame_index), float(row.timestamp_sec), image))
    return frames, missing


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@asset(
    partitions_def=projects_partitions,
    deps=["frame_embeddings", "reference_embeddings"],
    group_name="analysis",
    kinds={"python", "sqlite", "duckdb"},
    retry_policy=RETRY,
)
@stop_on_termination
def asset_appearances(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
    embedder: EmbedderResource,
) -> MaterializeResult:
    """Where each reference asset appears: scene, frame, time, box, confidence and source.

    clip_match compares every asset's reference vector with the whole frame and with
    multi-scale crops of every sampled frame; face_match and yolo run when configured.
    Replaces the project's rows in SQLite `asset_appearances` in one transaction.
    """
    cfg = settings.load()
    key = context.partition_key
    project = _project_or_fail(app_db, key)
    model = embedder.get()
    references = [
        ReferenceAsset(a.id, a.code, asset_vector(a))
        for a in project.assets
        if a.embedding_model_version == model.model_version and a.clip_embedding is not None
    ]
    unembedded = sorted(a.code for a in project.assets if a.embedding_model_version != model.model_version)
    store = warehouse.get()
    frames, missing_frames = _frame_inputs(store, key)
    threshold = cfg.appearances.thresholds.get(model.family, cfg.cv_analysis.clip_similarity_threshold)
    started = time.perf_counter()
    found = match_frames(
        frames,
        references,
        model.embed_images,
        threshold=threshold,
        scales=cfg.appearances.region_scales,
        overlap=cfg.appearances.region_overlap,
        vote_fraction=cfg.appearances.vote_fraction,
        tie_margin=cfg.appearances.tie_margin,
    )
    match_sec = time.perf_counter() - started
    regions = sum(
        len(candidate_regions(f.image.shape[1], f.image.shape[0], cfg.appearances.region_scales, cfg.appearances.region_overlap))
        for f in frames
    )
    plugins = _run_plugins(cfg, project, frames, references, model)
    for plugin in plugins:
        found.extend(plugin.appearances)
    replace_appearances(app_db.get(), project.project_id, found)
    replace_region_embeddings(store, key, found, model.model_version)

    codes = [a.code for a in project.assets]
    metadata = {
        "appearances": len(found),
        "frames_matched": len(frames),
        "assets_matched": len(references),
        "embedder": f"{model.family} ({model.model_version})",
        "threshold": threshold,
        "match_seconds": round(match_sec, 2),
        "regions_embedded": regions,
        "regions_per_sec": round(regions / match_sec, 1) if match_sec > 0 else 0.0,
        "by_asset": MetadataValue.md(_md_table(
            ["asset", "frames", "scenes", "best confidence"],
            [[c, sum(a.asset_code == c for a in found), sorted({a.scene_index for a in found if a.asset_code == c}) or "—",
              f"{max([a.confidence for a in found if a.asset_code == c], default=0):.3f}"] for c in codes],
        )),
        **{f"source_{p.name}": p.summary() for p in plugins},
        "source_clip_match": f"enabled, {sum(a.source == 'clip_match' for a in found)} appearance(s)",
    }
    if unembedded:
        metadata["assets_without_reference_embedding"] = ", ".join(unembedded)
    if missing_frames:
        metadata["frames_missing"] = "; ".join(missing_frames)
    quality = _quality_vs_ground_truth(project, found, frames, cfg.appearances.eval_iou)
    if quality is not None:
        metadata["quality_vs_ground_truth"] = MetadataValue.md(_md_table(
            ["asset", "precision", "recall", "TP", "predicted", "actual"],
            [[c, _fmt(q["precision"]), _fmt(q["recall"]), q["true_positives"], q["predicted"], q["actual"]] for c, q in quality.items()],
        ))
        metadata["quality"] = MetadataValue.json(quality)
    return MaterializeResult(metadata=metadata)


def _quality_vs_ground_truth(project: ProjectRows, appearances, frames, min_iou: float) -> dict | None:
    """Precision and recall per asset over the sampled frames, when the project ships a
    ground_truth.json (the demo does); None otherwise."""
    truth = load_ground_truth(project.root_path)
    if truth is None:
        return None
    frame_keys = [(f.scene_index, f.frame_index) for f in frames]
    scores = evaluate_against_truth(appearances, truth, frame_keys, [a.code for a in project.assets], min_iou)
    return {c: vars(s) | {"precision": s.precision, "recall": s.recall} for c, s in scores.items()}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _run_plugins(cfg, project: ProjectRows, frames, references, model):
    reference_images = {}
    if cfg.appearances.face_detector_model and cfg.appearances.face_recognizer_model:
        for a in project.assets:
            try:
                reference_images[a.id] = (a.code, load_image(a.reference_image_path))
            except ImageError:
                continue  # reference_embeddings already recorded why
    face = run_face_match(frames, reference_images, cfg.appearances.face_detector_model,
                          cfg.appearances.face_recognizer_model, cfg.cv_analysis.face_match_threshold)
    threshold = cfg.appearances.thresholds.get(model.family, cfg.cv_analysis.clip_similarity_threshold)
    yolo = run_yolo(frames, references, cfg.appearances.yolo_weights, model.embed_images, threshold)
    return [face, yolo]


@asset_check(asset=asset_appearances, description="Every appearance has a box inside its frame and a confidence in 0..1.")
def appearances_are_well_formed(app_db: AppDatabaseResource, warehouse: WarehouseResource) -> AssetCheckResult:
    from cv_assets.store.models import AssetAppearance

    sizes = warehouse.get().query("SELECT project, scene_index, frame_index, width, height FROM sampled_frames")
    dims = {(r.scene_index, r.frame_index, r.project): (r.width, r.height) for r in sizes.itertuples()}
    bad = []
    with app_db.get().read() as session:
        from cv_assets.store.models import Project

        rows = session.execute(select(AssetAppearance, Project.key).join(Project, Project.id == AssetAppearance.project_id)).all()
    for app, key in rows:
        x1, y1, x2, y2 = json.loads(app.bbox)
        w, h = dims.get((app.scene_index, app.frame_index, key), (None, None))
        if not (0 <= app.confidence <= 1.0 + 1e-6) or x1 >= x2 or y1 >= y2 or (w and (x2 > w or y2 > h)) or x1 < 0 or y1 < 0:
            bad.append(f"{key} scene {app.scene_index} frame {app.frame_index}: bbox {app.bbox} conf {app.confidence:.3f}")
    return AssetCheckResult(passed=not bad, metadata={"bad_rows": len(bad), "examples": "; ".join(bad[:10]) or "none"})


@asset(
    partitions_def=projects_partitions,
    deps=[asset_appearances],
    group_name="analysis",
    kinds={"python", "sqlite", "duckdb"},
    retry_policy=RETRY,
)
@stop_on_termination
def scene_continuity_scores(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
    embedder: EmbedderResource,
) -> MaterializeResult:
    """A 0-10 continuity score per scene with its reasons: manifest adherence, identity
    consistency of recurring assets, and the visual boundary with the previous scene.
    Scenes below `quality_gate_threshold` are flagged needs_review. Stored in
    scene_manifests (SQLite) and appended to DuckDB `continuity_history`."""
    cfg = settings.load()
    key = context.partition_key
    project = _project_or_fail(app_db, key)
    model_version = embedder.get().model_version
    store = warehouse.get()
    appearances = load_appearances(app_db.get(), store, key, project.project_id, model_version)
    scenes = [
        SceneInput(s.scene_index, project.expected_codes(s.scene_index), *_boundary_vectors(store, key, s.scene_index, model_version))
        for s in project.scenes
    ]
    weights = cfg.continuity.weights.model_dump()
    results = score_scenes(scenes, appearances, weights, cfg.cv_analysis.quality_gate_threshold)
    _store_continuity(app_db, store, project, results, context.run_id, model_version)
    review = [r.scene_index for r in results if r.needs_review]
    return MaterializeResult(
        metadata={
            "scenes": len(results),
            "mean_score": round(float(np.mean([r.score for r in results])), 2) if results else 0.0,
            "needs_review": ", ".join(map(str, review)) or "none",
            "scores": MetadataValue.md(_md_table(
                ["scene", "score", "adherence", "identity", "boundary", "missing", "unexpected", "review"],
                [[r.scene_index, f"{r.score:.1f}", _fmt(r.adherence), _fmt(r.identity), _fmt(r.boundary),
                  ", ".join(r.missing) or "—", ", ".join(r.unexpected) or "—", "yes" if r.needs_review else ""] for r in results],
            )),
        }
    )


def _boundary_vectors(store, project: str, scene_index: int, model_version: str):
    rows = store.query(
        "SELECT frame_index, embedding FROM frame_embeddings WHERE project = ? AND scene_index = ? AND model_version = ? ORDER BY frame_index",
        [project, scene_index, model_version],
    )
    if rows.empty:
        return None, None
    return np.asarray(rows["embedding"].iloc[0], np.float32), np.asarray(rows["embedding"].iloc[-1], np.float32)


def _store_continuity(app_db, store, project: ProjectRows, results, run_id: str, model_version: str) -> None:
    by_index = {r.scene_index: r for r in results}
    with app_db.get().write() as session:
        for scene in session.scalars(select(SceneManifest).where(SceneManifest.project_id == project.project_id)):
            result = by_index.get(scene.scene_index)
            if result is not None:
                scene.continuity_score = result.score
                scene.cv_analysis_json = json.dumps(result.as_json())
    history = pd.DataFrame(
        [
            {
                "project": project.key, "scene_index": r.scene_index, "run_id": run_id, "model_version": model_version,
                "score": r.score, "adherence": r.adherence, "identity": r.identity, "boundary": r.boundary,
                "needs_review": r.needs_review, "details": json.dumps(r.as_json()),
            }
            for r in results
        ]
    )
    store.append("continuity_history", history)


@asset(
    partitions_def=projects_partitions,
    deps=[scene_continuity_scores],
    group_name="analysis",
    kinds={"python", "html"},
)
def project_report(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
    embedder: EmbedderResource,
) -> MaterializeResult:
    """The project's HTML report (`reports_dir/<project>.html`): per scene a contact sheet
    of the sampled frames with appearance boxes and labels, the continuity score with its
    components and reasons, and a timeline of which asset appears in which scene."""
    cfg = settings.load()
    key = context.partition_key
    project = _project_or_fail(app_db, key)
    model_version = embedder.get().model_version
    store = warehouse.get()
    appearances = load_appearances(app_db.get(), store, key, project.project_id, model_version)
    frames = [
        ReportFrame(int(r.scene_index), int(r.frame_index), float(r.timestamp_sec), list(r.reasons), frame_image(key, r))
        for r in sampled_frame_rows(store, key).itertuples()
    ]
    continuity = _stored_continuity(app_db, project)
    codes = [a.code for a in project.assets]
    quality = _quality_vs_ground_truth(project, appearances, frames, cfg.appearances.eval_iou)
    html = render_report(key, project.name, frames, appearances, continuity, codes, model_version, quality)
    path = write_report(cfg.storage.reports_dir / f"{key}.html", html)
    summary = _md_table(
        ["scene", "score", "found", "missing", "review"],
        [[c.scene_index, f"{c.score:.1f}", ", ".join(c.found) or "—", ", ".join(c.missing) or "—", "yes" if c.needs_review else ""] for c in continuity],
    )
    return MaterializeResult(
        metadata={
            "report": MetadataValue.url(path.as_uri()),
            "report_path": MetadataValue.path(str(path)),
            "size_kb": round(path.stat().st_size / 1024, 1),
            "summary": MetadataValue.md(summary),
        }
    )


def _stored_continuity(app_db, project: ProjectRows):
    from cv_assets.analysis.continuity import SceneContinuity

    with app_db.get().read() as session:
        scenes = list(session.scalars(select(SceneManifest).where(SceneManifest.project_id == project.project_id).order_by(SceneManifest.scene_index)))
    return [SceneContinuity(**json.loads(s.cv_analysis_json)) for s in scenes if s.cv_analysis_json]


ANALYSIS_ASSETS = [asset_appearances, scene_continuity_scores, project_report]
ANALYSIS_CHECKS = [appearances_are_well_formed]
