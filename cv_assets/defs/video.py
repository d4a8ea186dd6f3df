"""Video assets of a project partition: `video_clips` (probe) and `sampled_frames` (key
frames), made by one step so each clip is decoded once.

Wiring only: the work is `cv_assets.video.sample_clips`; rows and lossless frame files
are written by `cv_assets.store.frames.save_sampled_frames`.
"""
# No `from __future__ import annotations` here: Dagster inspects the real `context` annotations.


from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from cv_assets.defs.common import (
    PREVIEW_ROWS,
    STORE_RETRY,
    markdown_table,
    partitioned_check,
    stop_on_termination,
    timed,
)
from cv_assets.defs.partitions import projects_partitions
from cv_assets.defs.projects import project_or_fail
from cv_assets.defs.resources import AppDatabaseResource, SettingsResource, WarehouseResource
from cv_assets.store.frames import clip_rows, save_sampled_frames
from cv_assets.video import SamplingResult
from cv_assets.video.sampler import clip_record, sample_clips

VIDEO_CLIPS_DOC = """One row per scene in DuckDB `clips`: the clip's path, size, codec, size in pixels,
the frame rate read from the stream, frame counts declared by the header and actually
decoded, duration, and status ok / partial / failed with the reason. A bad clip
(missing, empty, not a video, cut off, no decoder, outside the project folder, above
the size limits...) is recorded as failed and the other scenes go on."""

SAMPLED_FRAMES_DOC = """The 5-8 key frames of every scene, from the same decode pass as `video_clips`:
lossless PNGs under `<frames_dir>/<project>/v-<run>/scene_<NNN>/` and rows in DuckDB
`sampled_frames` (frame index, time, reasons base / last / motion, motion score, image
path, size, sha256 of the decoded RGB pixels). Base frames at the configured offsets and
the last frame are always kept; the strongest motion frames fill the rest of the budget.
Rows and files are replaced together: no frame of an earlier run remains."""


@multi_asset(
    specs=[
        AssetSpec("video_clips", deps=["project_manifest"], description=VIDEO_CLIPS_DOC,
                  group_name="video", kinds={"python", "duckdb"}),
        AssetSpec("sampled_frames", deps=["video_clips"], description=SAMPLED_FRAMES_DOC,
                  group_name="video", kinds={"python", "duckdb"}),
    ],
    partitions_def=projects_partitions,
    retry_policy=STORE_RETRY,
)
@timed
@stop_on_termination
def video_assets(
    context: AssetExecutionContext,
    settings: SettingsResource,
    app_db: AppDatabaseResource,
    warehouse: WarehouseResource,
):
    """Decode each clip of the project once: probe it and pick its key frames."""
    cfg = settings.load()
    project = project_or_fail(app_db, context.partition_key)
    results = sample_clips(
        [(s.scene_index, s.clip_path) for s in project.scenes], cfg.sampling, cfg.cv_analysis,
        project_root=project.root_path, on_clip=lambda index, result: _log_clip(context, index, result),
    )
    rows = [{"project": project.key, "scene_index": index, **clip_record(r)} for index, r in results.items()]
    saved = save_sampled_frames(warehouse.get(), cfg.storage.frames_dir, project.key, rows,
                                {index: r.frames for index, r in results.items()})
    yield MaterializeResult(asset_key="video_clips", metadata=_clips_metadata(project.key, results, project.root_path))
    yield MaterializeResult(asset_key="sampled_frames", metadata=_frames_metadata(project.key, results, saved))


def _log_clip(context, scene_index: int, result: SamplingResult) -> None:
    probe = result.probe
    if probe.status == "ok":
        context.log.info(f"scene {scene_index} ({probe.path}): {len(result.frames)} frames in {result.decode_ms:.0f} ms")
    else:
        context.log.warning(f"scene {scene_index} ({probe.path}): {probe.status}: {probe.reason}")


def _picked(result: SamplingResult) -> str:
    return ", ".join(f"{f.frame_index} ({'+'.join(f.reasons)})" for f in result.frames) or "-"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _relative(text: str | None, root: str) -> str:
    """`text` with the project folder left out of the paths it names (short table cells)."""
    return (text or "").replace(f"{root.rstrip('/')}/", "")


def _clips_metadata(project: str, results: dict[int, SamplingResult], root: str) -> dict:
    # What a reader looks for first (status and why, what was picked) before the stream details.
    table = markdown_table(
        ["scene", "status", "reason", "picked (reasons)", "frames decoded / declared", "duration s", "size", "fps",
         "codec", "decode ms"],
        [[i, r.probe.status, _relative(r.probe.reason, root) or "—", _picked(r),
          f"{r.probe.decoded_frames} / {r.probe.declared_frames if r.probe.declared_frames is not None else '?'}",
          _num(r.probe.duration_sec), f"{r.probe.width}x{r.probe.height}" if r.probe.width else "-", _num(r.probe.fps),
          r.probe.codec or "-", f"{r.decode_ms:.0f}"] for i, r in results.items()],
        limit=PREVIEW_ROWS, noun="scenes",
    )
    statuses = [r.probe.status for r in results.values()]
    return {
        "project": project,
        "scenes": len(results),
        "ok": statuses.count("ok"),
        "partial": statuses.count("partial"),
        "failed": statuses.count("failed"),
        "frames_decoded": sum(r.probe.decoded_frames for r in results.values()),
        "frames_picked": sum(len(r.frames) for r in results.values()),
        "decode_ms_total": MetadataValue.float(round(sum(r.decode_ms for r in results.values()), 1)),
        "failed_scenes": MetadataValue.md(markdown_table(
            ["scene", "status", "reason"],
            [[i, r.probe.status, _relative(r.probe.reason, root)] for i, r in results.items() if r.probe.status != "ok"]))
        if any(s != "ok" for s in statuses) else "none",
        "scenes_table": MetadataValue.md(table),
    }


def _frames_metadata(project: str, results: dict[int, SamplingResult], saved) -> dict:
    reasons = [reason for r in results.values() for f in r.frames for reason in f.reasons]
    return {
        "project": project,
        "frames_dir": MetadataValue.path(str(saved.folder)),
        "frames": saved.frames,
        "scenes_with_frames": sum(1 for r in results.values() if r.frames),
        "scenes_without_frames": ", ".join(str(i) for i, r in results.items() if not r.frames) or "none",
        "base_frames": reasons.count("base"),
        "last_frames": reasons.count("last"),
        "motion_frames": reasons.count("motion"),
        "decode_ms_total": MetadataValue.float(round(sum(r.decode_ms for r in results.values()), 1)),
        "png_write_ms": MetadataValue.float(round(saved.write_ms, 1)),
        "frames_table": MetadataValue.md(markdown_table(
            ["scene", "status", "frames", "picked (reasons)", "motion candidates", "decode ms"],
            [[i, r.probe.status, len(r.frames), _picked(r), r.motion_candidates, f"{r.decode_ms:.0f}"]
             for i, r in results.items()],
            limit=PREVIEW_ROWS, noun="scenes",
        )),
    }


@partitioned_check(
    AssetKey("video_clips"),
    "Every scene's clip decodes completely (status ok). Fails naming the scenes that did not, with why.",
)
def video_clips_all_decodable(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    key = context.partition_key
    clips = clip_rows(warehouse.get(), key)
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
            "bad_scenes": MetadataValue.md(markdown_table(
                ["scene", "status", "reason"], [[int(r.scene_index), r.status, r.reason] for r in bad.itertuples()]))
            if not bad.empty else "none",
        },
    )


VIDEO_ASSETS = [video_assets]
VIDEO_CHECKS = [video_clips_all_decodable]
