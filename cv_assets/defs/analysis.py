"""Appearances, continuity scores and the project report (wiring only; the work is in
cv_assets/analysis, the rows are written by cv_assets/store)."""

import json
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
)

from cv_assets.analysis.appearances import FrameInput, ReferenceAsset
from cv_assets.analysis.continuity import SceneContinuity, SceneInput, score_scenes
from cv_assets.analysis.ground_truth import GroundTruthError, quality_against_truth
from cv_assets.analysis.report import (
    ReportFrame,
    asset_colours,
    contact_sheet,
    jpeg_data_uri,
    render_report,
    timeline_image,
    write_report,
)
from cv_assets.analysis.sources import build_sources, find_appearances
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
from cv_assets.defs.resources import AppDatabaseResource, EmbedderResource, SettingsResource, WarehouseResource
from cv_assets.embedding.images import ImageError, load_image
from cv_assets.store.appearances import load_appearances, replace_appearances, replace_region_embeddings
from cv_assets.store.continuity import load_continuity, save_continuity
from cv_assets.store.embeddings import frame_vectors
from cv_assets.store.frames import clip_rows, frame_image, sampled_frame_rows
from cv_assets.events.backfill import embedder_fingerprint
from cv_assets.store.projects import ProjectRows, asset_vector, record_processed


def _frame_inputs(store, project: str) -> tuple[list[FrameInput], list[str]]:
    """The project's sampled frames with their pixels, and a note for each whose file is gone."""
    frames, missing = [], []
    for row in sampled_frame_rows(store, project).itertuples():
        image = frame_image(row)
        if image is None:
            missing.append(f"scene {row.scene_index} frame {row.frame_index}: image missing or changed at {row.image_path}")
            continue
        frames.append(FrameInput(int(row.scene_index), int(row.frame_index), float(row.timestamp_sec), image))
    return frames, missing


def _reference_images(project: ProjectRows) -> dict[int, tuple[str, np.ndarray]]:
    images = {}
    for a in project.assets:
        try:
            images[a.id] = (a.code, load_image(Path(project.root_path) / a.reference_image_path))
        except ImageError:
            continue  # reference_embeddings already recorded why
    return images


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _quality(project: ProjectRows, appearances, frame_keys, min_iou: float) -> dict | None:
    """Quality against the ground truth the manifest names; a file that became invalid
    since the manifest was validated is bad input (never retried)."""
    try:
        return quality_against_truth(project.ground_truth_path, appearances, frame_keys, [a.code for a in project.assets],
                                     min_iou)
    except GroundTruthError as exc:
        raise bad_input(str(exc)) from None


def _quality_table(quality: dict) -> str:
    return markdown_table(
        ["asset", "precision", "recall", "mean IoU", "TP", "predicted", "actual"],
        [[c, _fmt(q["precision"]), _fmt(q["recall"]), _fmt(q.get("mean_iou")), q["true_positives"], q["predicted"],
          q["actual"]] for c, q in quality.items()])


# GPU node: clip_match embeds candidate crops of every frame.
@project_asset(deps=["frame_embeddings", "reference_embeddings"], group_name="analysis",
               kinds={"python", "sqlite", "duckdb"}, op_tags=GPU_STEP_TAGS)
def asset_appearances(context: AssetExecutionContext, settings: SettingsResource,
                      app_db: AppDatabaseResource, warehouse: WarehouseResource, embedder: EmbedderResource) -> MaterializeResult:
    """Where each reference asset appears: scene, frame, time, box, confidence and source.

    Every enabled appearance source runs over the sampled frames: clip_match compares each
    asset's reference vector with the whole frame and with crops around likely regions;
    face_match (dlib, installed with the faces extra; or YuNet/SFace when configured) finds
    faces and matches them to the reference faces; yolo runs when its weights are configured. Replaces the project's rows
    in SQLite `asset_appearances` in one transaction.
    """
    cfg = settings.load()
    project = project_or_fail(app_db, context.partition_key)
    model = embedder.get()
    note_embedder(context, model.model_version)
    references = [ReferenceAsset(a.id, a.code, asset_vector(a)) for a in project.assets
                  if a.embedding_model_version == model.model_version and a.clip_embedding is not None]
    unembedded = sorted(a.code for a in project.assets if a.embedding_model_version != model.model_version)
    store = warehouse.get()
    frames, missing_frames = _frame_inputs(store, project.key)
    sources = build_sources(cfg.appearances, cfg.cv_analysis, model.embed_regions, model.family,
                            lambda: _reference_images(project))
    started = time.perf_counter()
    found = find_appearances(sources, frames, references)
    match_seconds = time.perf_counter() - started
    regions = sum(getattr(s, "regions_embedded", 0) for s in sources)
    replace_appearances(app_db.get(), project.project_id, found)
    replace_region_embeddings(store, project.key, found, model.model_version)

    codes = [a.code for a in project.assets]
    metadata = {
        "appearances": len(found),
        "frames_matched": len(frames),
        "assets_matched": len(references),
        "embedder": embedder_label(model.model_version),
        "model_version": model.model_version,
        "backend": f"{model.device}, {model.backend} {model.precision}",
        "match_seconds": round(match_seconds, 2),
        "regions_embedded": regions,
        "regions_reused": sum(getattr(s, "regions_reused", 0) for s in sources),
        "regions_per_sec": round(regions / match_seconds, 1) if match_seconds > 0 else 0.0,
        **{"forwards_per_frame": round(s.forwards_per_frame, 1) for s in sources if hasattr(s, "forwards_per_frame")},
        "by_asset": MetadataValue.md(markdown_table(
            ["asset", "frames", "scenes", "best confidence"],
            [[c, sum(a.asset_code == c for a in found),
              ", ".join(map(str, sorted({a.scene_index for a in found if a.asset_code == c}))) or "—",
              f"{max([a.confidence for a in found if a.asset_code == c], default=0):.3f}"] for c in codes],
        )),
        **{f"source_{s.name}": s.describe() for s in sources},
    }
    if unembedded:
        metadata["assets_without_reference_embedding"] = ", ".join(unembedded)
    if missing_frames:
        metadata["frames_missing"] = "; ".join(missing_frames)
    quality = _quality(project, found, [(f.scene_index, f.frame_index) for f in frames], cfg.appearances.eval_iou)
    if quality is not None:
        metadata["quality_vs_ground_truth"] = MetadataValue.md(_quality_table(quality))
    return MaterializeResult(metadata=metadata)


@partitioned_check(asset_appearances, "Every appearance has a box inside its frame and a confidence in 0..1.")
def appearances_are_well_formed(
    context: AssetCheckExecutionContext, app_db: AppDatabaseResource, warehouse: WarehouseResource, embedder: EmbedderResource
) -> AssetCheckResult:
    key = context.partition_key
    project = project_or_fail(app_db, key)
    store = warehouse.get()
    sizes = {(int(r.scene_index), int(r.frame_index)): (int(r.width), int(r.height))
             for r in sampled_frame_rows(store, key).itertuples()}
    bad = []
    for app in load_appearances(app_db.get(), store, key, project.project_id, embedder.model_version(app_db.get())):
        x1, y1, x2, y2 = app.bbox
        w, h = sizes.get((app.scene_index, app.frame_index), (None, None))
        if not (0 <= app.confidence <= 1.0 + 1e-6) or x1 >= x2 or y1 >= y2 or x1 < 0 or y1 < 0 or (w and (x2 > w or y2 > h)):
            bad.append(f"scene {app.scene_index} frame {app.frame_index} {app.asset_code}: bbox {list(app.bbox)} conf {app.confidence:.3f}")
    return AssetCheckResult(
        passed=not bad,
        description=f"{len(bad)} appearance(s) with a box outside the frame or a confidence outside 0..1" if bad
        else "every box lies inside its frame, every confidence in 0..1",
        metadata={"bad_rows": len(bad), "examples": "; ".join(bad[:10]) or "none"},
    )


@project_asset(deps=[asset_appearances], group_name="analysis", kinds={"python", "sqlite", "duckdb"})
def scene_continuity_scores(context: AssetExecutionContext, settings: SettingsResource,
                            app_db: AppDatabaseResource, warehouse: WarehouseResource, embedder: EmbedderResource) -> MaterializeResult:
    """A 0-10 continuity score per scene with its reasons: manifest adherence, identity
    consistency of recurring assets, the visual boundary with the previous scene (unless the
    scene declares `continues_previous: false`) and hard cuts inside the clip that the
    manifest does not announce. A scene whose clip failed has no score; it, a partial clip,
    an unannounced cut and a score below `quality_gate_threshold` are flagged needs_review.
    Stored in scene_manifests (SQLite) and appended to DuckDB `continuity_history`."""
    cfg = settings.load()
    project = project_or_fail(app_db, context.partition_key)
    model_version = embedder.model_version(app_db.get())
    store = warehouse.get()
    appearances = load_appearances(app_db.get(), store, project.key, project.project_id, model_version)
    clips = {int(c.scene_index): c for c in clip_rows(store, project.key).itertuples()}
    scenes = [_scene_input(s, clips.get(s.scene_index), frame_vectors(store, project.key, model_version, s.scene_index))
              for s in project.scenes]
    results = score_scenes(scenes, appearances, cfg.continuity.weights.model_dump(), cfg.cv_analysis.quality_gate_threshold,
                           cfg.continuity.cut_tolerance_sec)
    save_continuity(app_db.get(), store, project.project_id, project.key, results, context.run_id, model_version)
    review = [r.scene_index for r in results if r.needs_review]
    scored = [r.score for r in results if r.score is not None]
    for r in results:
        if r.score is None:
            context.log.warning(f"scene {r.scene_index}: no continuity score: {r.reasons[0]}")
    return MaterializeResult(
        metadata={
            "scenes": len(results),
            "mean_score": round(float(np.mean(scored)), 2) if scored else None,
            "needs_review": ", ".join(map(str, review)) or "none",
            "failed_clips": ", ".join(str(r.scene_index) for r in results if r.clip_status == "failed") or "none",
            "unannounced_cuts": sum(not c["declared"] for r in results for c in r.cuts),
            "scores": MetadataValue.md(markdown_table(
                ["scene", "score", "review", "adherence", "identity", "boundary", "cuts", "missing", "unexpected"],
                [[r.scene_index, "—" if r.score is None else f"{r.score:.1f}", "yes" if r.needs_review else "",
                  _fmt(r.adherence), _fmt(r.identity), _fmt(r.boundary), _cuts_cell(r.cuts),
                  ", ".join(r.missing) or "—", ", ".join(r.unexpected) or "—"]
                 for r in results],
            )),
            "reasons": MetadataValue.md(markdown_table(
                ["scene", "reason"], [[r.scene_index, reason] for r in results for reason in r.reasons],
                limit=PREVIEW_ROWS * 5, noun="reasons")),
        }
    )


def _scene_input(scene, clip, vectors) -> SceneInput:
    """What continuity needs of one scene: the manifest's intent, the clip's probe and cuts,
    and the vectors of its first and last sampled frames."""
    first = last = None
    if not vectors.empty:
        first, last = (np.asarray(vectors["embedding"].iloc[i], np.float32) for i in (0, -1))
    return SceneInput(
        scene.scene_index, json.loads(scene.expected_asset_codes), first, last,
        clip_status=clip.status if clip is not None else "failed",
        clip_reason=f"{clip.path}: {clip.reason}" if clip is not None else "the clip was not sampled (materialise sampled_frames)",
        cuts=json.loads(clip.cuts) if clip is not None and isinstance(clip.cuts, str) else [],
        declared_cuts=json.loads(scene.declared_cuts), continues_previous=scene.continues_previous,
    )


def _cuts_cell(cuts: list[dict]) -> str:
    return ", ".join(f"{c['timestamp_sec']:.2f} s{' (declared)' if c['declared'] else ''}" for c in cuts) or "—"


@project_asset(deps=[scene_continuity_scores], group_name="analysis", kinds={"python", "html"})
def project_report(context: AssetExecutionContext, settings: SettingsResource,
                   app_db: AppDatabaseResource, warehouse: WarehouseResource, embedder: EmbedderResource) -> MaterializeResult:
    """The project's HTML report (`reports_dir/<project>.html`): per scene a contact sheet
    of the sampled frames with appearance boxes and labels, the continuity score with its
    components and reasons, and a timeline of which asset appears in which scene. Its
    metadata shows the timeline and each scene's contact sheet inline, and links the report
    as served by `make ui` (`storage.reports_base_url`). Finishing it records the project's
    manifest hash and embedder as processed, so project_sensor does not launch them again."""
    cfg = settings.load()
    project = project_or_fail(app_db, context.partition_key)
    model_version = embedder.model_version(app_db.get())
    store = warehouse.get()
    appearances = load_appearances(app_db.get(), store, project.key, project.project_id, model_version)
    frames = [ReportFrame(int(r.scene_index), int(r.frame_index), float(r.timestamp_sec), list(r.reasons), frame_image(r))
              for r in sampled_frame_rows(store, project.key).itertuples()]
    continuity = [SceneContinuity(**details) for details in load_continuity(app_db.get(), project.project_id)]
    codes = [a.code for a in project.assets]
    quality = _quality(project, appearances, [(f.scene_index, f.frame_index) for f in frames], cfg.appearances.eval_iou)
    html = render_report(project.key, project.name, frames, appearances, continuity, codes, model_version, quality)
    path = write_report(cfg.storage.reports_dir / f"{project.key}.html", html)
    summary = markdown_table(
        ["scene", "score", "found", "missing", "review"],
        [[c.scene_index, "—" if c.score is None else f"{c.score:.1f}", ", ".join(c.found) or "—", ", ".join(c.missing) or "—",
          "yes" if c.needs_review else ""] for c in continuity],
    )
    since = record_processed(app_db.get(), project.key, embedder_fingerprint(cfg.embedder), context.run_id)
    colours = asset_colours(codes)
    return MaterializeResult(
        metadata={
            "report": MetadataValue.url(f"{cfg.storage.reports_base_url.rstrip('/')}/{quote(path.name)}"),
            "report_path": MetadataValue.path(str(path)),
            "size_kb": round(path.stat().st_size / 1024, 1),
            "summary": MetadataValue.md(summary),
            "timeline": MetadataValue.md(_picture(
                "timeline", timeline_image(appearances, continuity, codes, colours),
                "Asset colours as in the boxes; clip row: a red cut is not announced by the manifest.")),
            **{f"scene_{c.scene_index}_contact_sheet": MetadataValue.md(_picture(
                f"scene {c.scene_index}", contact_sheet([f for f in frames if f.scene_index == c.scene_index],
                                                         appearances, colours)))
               for c in continuity},
            "processed_since_run": since or context.run_id,
        }
    )


def _picture(title: str, image, caption: str = "") -> str:
    """A markdown image from a small JPEG data URI (the UI shows it inline, no file access)."""
    return f"![{title}]({jpeg_data_uri(image, METADATA_PICTURE_WIDTH, METADATA_JPEG_QUALITY)})" + (
        f"\n\n{caption}" if caption else "")


# Inline pictures in project_report's metadata: small enough for the event log (~30 KB each).
METADATA_PICTURE_WIDTH = 720
METADATA_JPEG_QUALITY = 70


ANALYSIS_ASSETS = [asset_appearances, scene_continuity_scores, project_report]
ANALYSIS_CHECKS = [appearances_are_well_formed]
