"""The whole video chain through Dagster on a project partition, on the demo project."""

import json

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import func, select

from cv_assets.definitions import build_definitions
from cv_assets.demo import write_demo_data
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.analysis.ground_truth import quality_against_truth
from cv_assets.store.appearances import load_appearances
from cv_assets.store.frames import sampled_frame_rows
from cv_assets.store.models import AssetAppearance, SceneManifest
from cv_assets.store.projects import load_project

# Floors for the colour-histogram embedder on the demo ground truth (sampled frames,
# box IoU >= appearances.eval_iou = 0.1). Measured 1.00 precision and recall for all four
# assets, from in-memory frames and from the JPEGs alike (0.91-1.00 at IoU >= 0.3). The
# floors leave room for encoder differences while a real regression (a broken crop grid,
# a wrong threshold, boxes in the wrong coordinates) drops far below them.
MIN_PRECISION = 0.8
MIN_RECALL = 0.8


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    write_demo_data(root, scene_seconds=8.0, n_events=40)
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"database_url": "sqlite:///app.sqlite", "duckdb_path": "wh.duckdb", "frames_dir": "frames",
                    "reports_dir": "reports", "projects_root": "projects", "thumbnails_root": "thumbnails"},
        # No CLIP weights on CI machines: the explicit, separately versioned fallback.
        "embedder": {"model": str(root / "no-such-model"), "fallback": "color_histogram", "device": "cpu"},
    }))
    settings = load_settings(cfg)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["demo"])
    job = defs.resolve_job_def("project_reprocess_job")
    first = job.execute_in_process(partition_key="demo", instance=instance)
    return settings, defs, instance, job, first


def _materializations(result):
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def _counts(settings):
    db = AppDatabase(settings.storage.sqlite_url)
    wh = Warehouse(settings.storage.duckdb_path)
    with db.read() as s:
        apps = s.scalar(select(func.count()).select_from(AssetAppearance))
    return {t: wh.count(t, "demo") for t in ("clips", "sampled_frames", "frame_embeddings", "appearance_embeddings")} | {"appearances": apps}


def test_chain_materialises_every_asset_with_rows(demo_env):
    settings, _, _, _, result = demo_env
    assert result.success
    mats = _materializations(result)
    assert set(mats) >= {"project_manifest", "video_clips", "sampled_frames", "reference_embeddings", "frame_embeddings",
                         "asset_appearances", "scene_continuity_scores", "project_report"}
    counts = _counts(settings)
    assert counts["clips"] == 4
    assert 4 * 5 <= counts["sampled_frames"] <= 4 * 8
    assert counts["frame_embeddings"] == counts["sampled_frames"]
    assert counts["appearances"] > 0 and counts["appearance_embeddings"] == counts["appearances"]
    assert "color_histogram" in mats["asset_appearances"]["embedder"]
    # the demo's still props and backgrounds are embedded once per scene, then reused
    assert 0 < mats["asset_appearances"]["regions_reused"] < mats["asset_appearances"]["regions_embedded"]
    assert "unchanged since the previous frame reused" in mats["asset_appearances"]["source_clip_match"]
    # dlib from the faces extra when installed; the demo's sprites have no faces
    assert mats["asset_appearances"]["source_face_match"].startswith(
        ("enabled, 0 appearance(s): backend dlib", "disabled: install the faces extra"))
    assert mats["asset_appearances"]["source_yolo"].startswith("disabled")
    report = settings.storage.reports_dir / "demo.html"
    assert report.is_file() and "<h2>Scene 3</h2>" in report.read_text()


def test_appearance_quality_against_demo_ground_truth(demo_env):
    settings, _, _, _, result = demo_env
    db, wh = AppDatabase(settings.storage.sqlite_url), Warehouse(settings.storage.duckdb_path)
    project = load_project(db, "demo")
    appearances = load_appearances(db, wh, "demo", project.project_id, "color_histogram-v1")
    frames = sampled_frame_rows(wh, "demo")
    quality = quality_against_truth(project.ground_truth_path, appearances,
                                    zip(frames.scene_index, frames.frame_index), [a.code for a in project.assets],
                                    settings.appearances.eval_iou)
    assert len(quality) == 4
    table = _materializations(result)["asset_appearances"]["quality_vs_ground_truth"]
    for code, q in quality.items():
        if q["actual"] == 0:
            continue
        assert q["precision"] is not None and q["precision"] >= MIN_PRECISION, (code, q)
        assert q["recall"] >= MIN_RECALL, (code, q)
        assert f"| {code} | {q['precision']:.2f} | {q['recall']:.2f} |" in table


def test_continuity_scores_are_stored_and_flag_the_problem_scenes(demo_env):
    settings, *_ = demo_env
    truth = json.loads((settings.storage.projects_root / "demo" / "ground_truth.json").read_text())
    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as s:
        scenes = list(s.scalars(select(SceneManifest).order_by(SceneManifest.scene_index)))
    assert len(scenes) == 4
    for scene in scenes:
        details = json.loads(scene.cv_analysis_json)
        assert 0.0 <= scene.continuity_score <= 10.0
        assert details["score"] == scene.continuity_score and details["reasons"]
    missing_anywhere = [c for s in scenes for c in json.loads(s.cv_analysis_json)["missing"]]
    assert missing_anywhere, "the demo has an expected asset that never shows up"
    history = Warehouse(settings.storage.duckdb_path).count("continuity_history", "demo")
    assert history >= 4
    assert truth["scenes"]


def test_rematerialising_the_partition_is_idempotent(demo_env):
    settings, _, instance, job, _ = demo_env
    before = _counts(settings)
    again = job.execute_in_process(partition_key="demo", instance=instance)
    assert again.success
    assert _counts(settings) == before
    mats = _materializations(again)
    # Unchanged frames are not recomputed, and the metadata says so instead of showing zeros.
    assert mats["frame_embeddings"]["status"].startswith("unchanged since run")
    assert mats["frame_embeddings"]["kept"] == before["frame_embeddings"]
