"""Video assets of a project partition: `video_clips` (probe) and `sampled_frames` (key frames).

Wiring only: the work is `cv_assets.video.sample_video_frames`. When both assets run
in one process the decode pass done for `video_clips` is handed to `sampled_frames`
through `cv_assets.video.sampling_cache`; otherwise `sampled_frames` decodes again.
"""
# No `from __future__ import annotations` here: Dagster inspects the real `context` annotations.

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckExecutionContext,
    AssetCheckSeverity,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    RetryPolicy,
    asset,
    asset_check,
)
from sqlalchemy import select

from cv_assets.defs.partitions import projects_partitions
from cv_assets.defs.resources import AppDatabaseResource, SettingsResource, WarehouseResource
from cv_assets.defs.common import stop_on_termination
from cv_assets.settings import Settings
from cv_assets.store import AppDatabase
from cv_assets.store.models import Project, SceneManifest
from cv_assets.video import (
    SamplingResult,
    clip_file_sha256,
    export_frames,
    frame_cache,
    project_frames_dir,
    sample_video_frames,
    sampling_cache,
    scene_dir_name,
)
from cv_assets.video.export import new_staging_dir, replace_directory

PREVIEW_ROWS = 50  # scenes shown in a metadata table; the rest are counted
# A transient store error (a lock held a moment too long) is retried; bad input is not
# (it raises Failure(allow_retries=False) or is recorded per scene).
RETRY = RetryPolicy(max_retries=2, delay=1.0)


@dataclass(frozen=True)
class Scene:
    index: int
    clip_path: str


@dataclass(frozen=True)
class ProjectScenes:
    key: str
    root: str
    scenes: list[Scene]


def load_project_scenes(db: AppDatabase, key: str) -> ProjectScenes:
    """The project's folder and scenes from the app database; Failure when the key is unknown."""
    with db.read() as session:
        project = session.execute(select(Project).where(Project.key == key)).scalar_one_or_none()
        if project is None:
            raise Failure(
                description=f"project {key!r} is not in the app database ({db.url}); "
                "register it (project.yaml + the project sensor) before materialising its partition",
                allow_retries=False,
            )
        rows = session.execute(
            select(SceneManifest.scene_index, SceneManifest.clip_path)
            .where(SceneManifest.project_id == project.id)
            .order_by(SceneManifest.scene_index)
        ).all()
        return ProjectScenes(key, project.root_path, [Scene(int(i), str(p)) for i, p in rows])


def _sample_scene(project: ProjectScenes, scene: Scene, settings: Settings) -> SamplingResult:
    return sample_video_frames(scene.clip_path, settings.sampling, settings.cv_analysis, project_root=project.root)


def _cache_key(project: ProjectScenes, scene: Scene, settings: Settings):
    return sampling_cache.sampling_key(
        project.key, scene.index, scene.clip_path, project.root, settings.sampling, settings.cv_analysis
    )


@asset(
    partitions_def=projects_partitions,
    group_name="video",
    kinds={"python", "duckdb"},
    # project_manifest registers the project's scenes in the app database that this reads.
    deps=["project_manifest"],
    retry_policy=RETRY,
)
@stop_on_termination
def video_clips(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    """One row per scene in DuckDB `clips`: the clip's path, size, codec, size in pixels, the
    frame rate read from the stream, frame counts declared by the header and actually
    decoded, duration, and status ok / partial / failed with the reason.

    Each clip is decoded once; the key frames picked in that same pass are kept in
    memory for `sampled_frames` when it runs in this process. A bad clip (missing,
    empty, not a video, cut off, no decoder, outside the project folder, above the
    size limits...) is recorded as failed and the other scenes go on.
    """
    cfg = settings.load()
    project = load_project_scenes(app_db.get(), context.partition_key)
    rows, results = [], {}
    for scene in project.scenes:
        key = _cache_key(project, scene, cfg)
        # A retry after a failed write finds this attempt's decode passes still here.
        result = sampling_cache.peek(key) or _sample_scene(project, scene, cfg)
        sampling_cache.remember(key, result)
        results[scene.index] = result
        rows.append(_clip_row(project.key, scene.index, result))
        _log_scene(context, scene, result)
    warehouse.get().replace_partition("clips", project.key, pd.DataFrame(rows, columns=CLIP_COLUMNS))
    return MaterializeResult(metadata=_clips_metadata(project, results))


CLIP_COLUMNS = [
    "project", "scene_index", "path", "size_bytes", "codec", "width", "height", "fps",
    "declared_frames", "decoded_frames", "duration_sec", "status", "reason", "decode_ms", "content_hash",
]


def _clip_row(project: str, scene_index: int, result: SamplingResult) -> dict:
    probe = result.probe
    usable_file = probe.resolved_path is not None and probe.size_bytes
    return {
        "project": project,
        "scene_index": scene_index,
        "path": probe.path,
        "size_bytes": probe.size_bytes,
        "codec": probe.codec,
        "width": probe.width,
        "height": probe.height,
        "fps": probe.fps,
        "declared_frames": probe.declared_frames,
        "decoded_frames": probe.decoded_frames,
        "duration_sec": probe.duration_sec,
        "status": probe.status,
        "reason": probe.reason,
        "decode_ms": round(result.decode_ms, 2),
        "content_hash": clip_file_sha256(probe.resolved_path) if usable_file else None,
    }


def _log_scene(context, scene: Scene, result: SamplingResult) -> None:
    probe = result.probe
    if probe.status == "ok":
        context.log.info(f"scene {scene.index} ({scene.clip_path}): {len(result.frames)} frames in {result.decode_ms:.0f} ms")
    else:
        context.log.warning(f"scene {scene.index} ({scene.clip_path}): {probe.status}: {probe.reason}")


def _reasons_summary(result: SamplingResult) -> str:
    return ", ".join(f"{f.frame_index} ({'+'.join(f.reasons)})" for f in result.frames) or "-"


def _clips_metadata(project: ProjectScenes, results: dict[int, SamplingResult]) -> dict:
    lines = [
        "| scene | status | codec | size | fps | frames decoded / declared | duration s | picked (reasons) | decode ms | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, result in list(results.items())[:PREVIEW_ROWS]:
        p = result.probe
        size = f"{p.width}x{p.height}" if p.width else "-"
        lines.append(
            f"| {index} | {p.status} | {p.codec or '-'} | {size} | {_num(p.fps)} | "
            f"{p.decoded_frames} / {p.declared_frames if p.declared_frames is not None else '?'} | "
            f"{_num(p.duration_sec)} | {_reasons_summary(result)} | {result.decode_ms:.0f} | {_md(p.reason)} |"
        )
    statuses = [r.probe.status for r in results.values()]
    decode_ms = sum(r.decode_ms for r in results.values())
    return {
        "project": project.key,
        "scenes": len(results),
        "ok": statuses.count("ok"),
        "partial": statuses.count("partial"),
        "failed": statuses.count("failed"),
        "frames_decoded": sum(r.probe.decoded_frames for r in results.values()),
        "frames_picked": sum(len(r.frames) for r in results.values()),
        "decode_ms_total": MetadataValue.float(round(decode_ms, 1)),
        "failed_scenes": MetadataValue.json(
            {str(i): r.probe.reason for i, r in results.items() if r.probe.status != "ok"}
        ),
        "scenes_table": MetadataValue.md("\n".join(lines) + _more(len(results))),
    }


@asset(
    partitions_def=projects_partitions,
    group_name="video",
    kinds={"python", "duckdb"},
    deps=[video_clips],
    retry_policy=RETRY,
)
@stop_on_termination
def sampled_frames(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    """The 5-8 key frames of every scene: JPEGs under `<frames_dir>/<project>/scene_<NNN>/`
    and rows in DuckDB `sampled_frames` (frame index, time, reasons base / last / motion,
    motion score, image path, size, sha256 of the decoded RGB pixels).

    Base frames at the configured offsets and the last frame are always kept; the
    strongest motion frames fill the rest of the budget. The project's frame folder is
    replaced as a whole, so no JPEG of an earlier run remains. The decoded pixels also
    go to the in-process frame cache, where `frame_embeddings` reads them first.
    """
    cfg = settings.load()
    project = load_project_scenes(app_db.get(), context.partition_key)
    target = project_frames_dir(cfg.storage.frames_dir, project.key)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(target)
    results, reused, rows = {}, 0, []
    write_ms = 0.0
    try:
        for scene in project.scenes:
            result = sampling_cache.take(_cache_key(project, scene, cfg))
            reused += result is not None
            result = result or _sample_scene(project, scene, cfg)
            results[scene.index] = result
            started = time.perf_counter()
            paths = export_frames(result.frames, staging / scene_dir_name(scene.index), cfg.sampling.jpeg_quality)
            write_ms += (time.perf_counter() - started) * 1000
            final_dir = target / scene_dir_name(scene.index)
            rows += [_frame_row(project.key, scene.index, f, final_dir / p.name) for f, p in zip(result.frames, paths)]
        # Rows first, then files: a run that dies before the commit leaves the previous
        # rows beside the JPEGs they point to, never old rows beside new pixels.
        warehouse.get().replace_partition("sampled_frames", project.key, pd.DataFrame(rows, columns=FRAME_COLUMNS))
        replace_directory(staging, target)
    except BaseException:
        _remove_tree(staging)
        raise
    _fill_frame_cache(project.key, results)
    return MaterializeResult(metadata=_frames_metadata(project, results, rows, target, reused, write_ms))


FRAME_COLUMNS = [
    "project", "scene_index", "frame_index", "timestamp_sec", "reasons", "motion_score",
    "image_path", "width", "height", "content_hash",
]


def _frame_row(project: str, scene_index: int, frame, image_path: Path) -> dict:
    return {
        "project": project,
        "scene_index": scene_index,
        "frame_index": frame.frame_index,
        "timestamp_sec": frame.timestamp_sec,
        "reasons": list(frame.reasons),
        "motion_score": frame.motion_score,
        "image_path": str(image_path),
        "width": frame.width,
        "height": frame.height,
        "content_hash": frame.content_hash,
    }


def _fill_frame_cache(project: str, results: dict[int, SamplingResult]) -> None:
    frame_cache.discard_project(project)
    for scene_index, result in results.items():
        for frame in result.frames:
            frame_cache.put(project, scene_index, frame.frame_index, frame.content_hash, frame.image)


def _frames_metadata(project, results, rows, target: Path, reused: int, write_ms: float) -> dict:
    lines = ["| scene | status | frames | picked (reasons) | motion candidates | decode ms |", "|---|---|---|---|---|---|"]
    for index, result in list(results.items())[:PREVIEW_ROWS]:
        lines.append(
            f"| {index} | {result.probe.status} | {len(result.frames)} | {_reasons_summary(result)} | "
            f"{result.motion_candidates} | {result.decode_ms:.0f} |"
        )
    reasons = [r for row in rows for r in row["reasons"]]
    return {
        "project": project.key,
        "frames_dir": MetadataValue.path(str(target)),
        "frames": len(rows),
        "scenes_with_frames": sum(1 for r in results.values() if r.frames),
        "scenes_without_frames": MetadataValue.json(
            {str(i): r.probe.reason for i, r in results.items() if not r.frames}
        ),
        "base_frames": reasons.count("base"),
        "last_frames": reasons.count("last"),
        "motion_frames": reasons.count("motion"),
        "sampling_results_reused": reused,
        "decode_ms_total": MetadataValue.float(round(sum(r.decode_ms for r in results.values()), 1)),
        "jpeg_write_ms": MetadataValue.float(round(write_ms, 1)),
        "frames_table": MetadataValue.md("\n".join(lines) + _more(len(results))),
    }


def _checked_per_partition(fn):
    # A partitioned check is the only way to judge the project just materialised;
    # Dagster flags partitions_def on checks as preview, which is known and accepted here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return asset_check(
            asset=video_clips,
            name="video_clips_all_decodable",
            partitions_def=projects_partitions,
            description="Every scene's clip decodes completely (status ok). Fails naming the scenes that did not, with why.",
        )(fn)


@_checked_per_partition
def video_clips_all_decodable(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    key = context.partition_key
    clips = warehouse.get().query(
        "SELECT scene_index, path, status, reason FROM clips WHERE project = ? ORDER BY scene_index", [key]
    )
    bad = clips[clips["status"] != "ok"]
    failed = bad[bad["status"] == "failed"]
    described = [f"scene {int(r.scene_index)} ({r.path}): {r.status}: {r.reason}" for r in bad.itertuples()]
    return AssetCheckResult(
        passed=bad.empty,
        severity=AssetCheckSeverity.ERROR if not failed.empty else AssetCheckSeverity.WARN,
        description=(
            f"all {len(clips)} clips of {key} decode" if bad.empty
            else f"{len(bad)} of {len(clips)} clips of {key} are not fully decodable: " + "; ".join(described)
        ),
        metadata={
            "scenes": len(clips),
            "failed": len(failed),
            "partial": int((bad["status"] == "partial").sum()),
            "bad_scenes": MetadataValue.json({str(int(r.scene_index)): f"{r.status}: {r.reason}" for r in bad.itertuples()}),
        },
    )


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _md(text: str | None) -> str:
    return "" if not text else text.replace("|", "\\|").replace("\n", " ")


def _more(total: int) -> str:
    return f"\n\n…and {total - PREVIEW_ROWS} more scenes" if total > PREVIEW_ROWS else ""


VIDEO_ASSETS = [video_clips, sampled_frames]
VIDEO_CHECKS = [video_clips_all_decodable]
