"""What real footage brings that the demo did not: hard cuts inside a clip, clips that fail
to decode, damaged frames, and ground truth named (and validated) by the manifest."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import yaml
from dagster import DagsterInstance
from PIL import Image

from cv_assets.cli import main as cv_assets_main
from cv_assets.cli.run_demo import run_everything
from cv_assets.definitions import build_definitions
from cv_assets.settings import CvAnalysisSettings, SamplingSettings, load_settings
from cv_assets.store import AppDatabase
from cv_assets.store.projects import load_project
from cv_assets.video import sample_video_frames
from helpers.video import write_clip

SAMPLING, CV = SamplingSettings(), CvAnalysisSettings()


# -- cuts, in the sampler's one pass -----------------------------------------------------------


def test_hard_cuts_are_found_at_their_frame_and_motion_is_not_a_cut(tmp_path):
    cut_clip = write_clip(tmp_path / "cuts.mp4", fps=25, n_frames=200, cuts=[30, 80])
    cuts = sample_video_frames(cut_clip, SAMPLING, CV).cuts
    assert [c.frame_index for c in cuts] == [30, 80]
    assert [c.timestamp_sec for c in cuts] == pytest.approx([1.2, 3.2])
    # Every frame changes (sustained motion, like a pan): no frame stands out, no cut.
    moving = write_clip(tmp_path / "moving.mp4", fps=25, n_frames=100, all_motion=True)
    assert sample_video_frames(moving, SAMPLING, CV).cuts == []


def test_a_cut_in_the_demo_scene_is_found_and_its_pan_is_not(tmp_path):
    from cv_assets.demo import write_demo_data

    write_demo_data(tmp_path, scene_seconds=4.0, n_events=30)
    truth = json.loads((tmp_path / "projects" / "demo" / "ground_truth.json").read_text())
    for index, scene in truth["scenes"].items():
        found = sample_video_frames(tmp_path / "projects" / "demo" / scene["clip"], SAMPLING, CV).cuts
        assert len(found) == len(scene["cuts"]), index
        assert all(abs(c.frame_index - t) <= 1 for c, t in zip(found, scene["cuts"])), index


# -- damaged frames -----------------------------------------------------------------------------


def _truncated_mpeg_ps(path, frames=100, keep=0.55):
    """An MPEG-2 program stream cut off part way: FFmpeg flags its last decoded frame corrupt."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mpeg") as container:
        stream = container.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(frames):
            image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_a_frame_the_decoder_flags_corrupt_is_never_kept(tmp_path):
    clip = _truncated_mpeg_ps(tmp_path / "cut_off.mpg")
    flagged = [i for i, f in enumerate(av.open(str(clip)).decode(video=0)) if f.is_corrupt]
    assert flagged, "the fixture must contain a frame FFmpeg flags as corrupt"
    result = sample_video_frames(clip, SAMPLING, CV)
    assert result.probe.status == "partial"
    assert f"frame {flagged[0]} (" in result.probe.reason and "damaged" in result.probe.reason
    kept = [f.frame_index for f in result.frames]
    assert not set(kept) & set(flagged)
    last = [f for f in result.frames if "last" in f.reasons]
    assert last and last[0].frame_index == max(i for i in range(flagged[0]) if i not in flagged)


# -- continuity through Dagster -----------------------------------------------------------------


def _project(tmp_path, scenes: list[dict], ground_truth=None) -> tuple:
    """A project `p1` with one reference asset and the given scenes, and its config."""
    root = tmp_path / "projects" / "p1"
    (root / "refs").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(root / "refs" / "CHAR_01.png")
    manifest = {"project": "p1", "assets": [{"code": "CHAR_01", "kind": "character", "name": "Red",
                                             "reference_image": "refs/CHAR_01.png"}], "scenes": scenes}
    if ground_truth is not None:
        (root / "gt.json").write_text(json.dumps(ground_truth))
        manifest["ground_truth"] = "gt.json"
    (root / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"database_url": f"sqlite:///{tmp_path / 'app.sqlite'}", "duckdb_path": str(tmp_path / "wh.duckdb"),
                    "frames_dir": str(tmp_path / "frames"), "reports_dir": str(tmp_path / "reports"),
                    "projects_root": str(tmp_path / "projects"), "thumbnails_root": str(tmp_path / "thumbnails")},
        "embedder": {"model": str(tmp_path / "no-model"), "fallback": "color_histogram", "device": "cpu"},
    }))
    return root, config


def _run(config):
    settings = load_settings(config, env={})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["p1"])
    result = build_definitions(settings).resolve_job_def("project_reprocess_job").execute_in_process(
        partition_key="p1", instance=instance, raise_on_error=False)
    return settings, result


def _continuity(settings) -> dict[int, tuple]:
    project = load_project(AppDatabase(settings.storage.sqlite_url), "p1")
    return {s.scene_index: (s.continuity_score, json.loads(s.cv_analysis_json)) for s in project.scenes}


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Four scenes: an unannounced cut, the same clip with its cuts declared, a clip that
    does not exist, and a deliberate change of place after it."""
    tmp_path = tmp_path_factory.mktemp("story")
    clips = tmp_path / "projects" / "p1" / "clips"
    write_clip(clips / "cuts.mp4", fps=25, n_frames=150, cuts=[30, 80])
    write_clip(clips / "still.mp4", fps=25, n_frames=50)
    root, config = _project(tmp_path, [
        {"index": 0, "clip": "clips/cuts.mp4"},
        {"index": 1, "clip": "clips/cuts.mp4", "cuts": [1.2, 3.2]},
        {"index": 2, "clip": "clips/missing.mp4"},
        {"index": 3, "clip": "clips/still.mp4", "continues_previous": False},
    ])
    settings, result = _run(config)
    return config, settings, result


def test_an_unannounced_cut_lowers_the_score_and_is_named(story):
    _, settings, result = story
    assert result.success
    scores = _continuity(settings)
    score0, details0 = scores[0]
    score1, details1 = scores[1]
    assert "hard cut at 1.20 s (frame 30) not announced by the manifest" in details0["reasons"]
    assert "hard cut at 3.20 s (frame 80) not announced by the manifest" in details0["reasons"]
    assert details0["intra_scene"] == pytest.approx(1 / 3) and details0["needs_review"]
    # Declared cuts are neutral: the same clip scores higher and is not flagged for them.
    assert details1["intra_scene"] == 1.0 and all(c["declared"] for c in details1["cuts"])
    assert score1 > score0


def test_a_failed_clip_has_no_score_and_needs_review(story):
    config, settings, result = story
    score, details = _continuity(settings)[2]
    assert score is None and details["needs_review"] and details["clip_status"] == "failed"
    assert details["reasons"][0].startswith("clip failed: ") and "missing.mp4" in details["reasons"][0]
    # The scene after it declares a change of place: its boundary is neutral and says why.
    _, details3 = _continuity(settings)[3]
    assert details3["boundary"] is None
    assert any("continues_previous: false" in r for r in details3["reasons"])
    meta = {e.event_specific_data.materialization.asset_key.path[-1]: e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()}["scene_continuity_scores"]
    assert meta["failed_clips"].value == "2" and "| 2 | — | yes |" in meta["scores"].value


def test_run_demo_names_the_failed_clip_and_exits_non_zero(story, capsys):
    config, _, _ = story
    summary = run_everything(str(config))
    assert not summary["ok"]
    assert "project p1: CLIP FAILED" in summary["text"] and "scene 2: — (clip failed:" in summary["text"]
    assert cv_assets_main(["--config", str(config), "run-demo"]) == 1
    assert "SOME RUNS OR CLIPS FAILED" in capsys.readouterr().out


# -- ground truth is explicit -------------------------------------------------------------------


def test_a_bad_ground_truth_file_is_a_validation_error_naming_file_and_field(tmp_path, capsys):
    write_clip(tmp_path / "projects" / "p1" / "clips" / "a.mp4", n_frames=30)
    bad = {"scenes": {"0": {"frames": {"0": [{"code": "CHAR_01", "bbox": [50, 10, 20, 40]}]}}}}
    root, config = _project(tmp_path, [{"index": 0, "clip": "clips/a.mp4"}], ground_truth=bad)
    settings, result = _run(config)
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["project_manifest"]
    message = failures[0].step_failure_data.user_failure_data.description
    assert "gt.json" in message and "scenes.0.frames.0.0.bbox" in message and "x1 < x2" in message
    starts = [e for e in result.all_events if e.event_type_value == "STEP_START" and e.step_key == "project_manifest"]
    assert len(starts) == 1  # bad input is never retried
    assert cv_assets_main(["--config", str(config), "projects", "validate"]) != 0
    assert "gt.json" in capsys.readouterr().out


def test_ground_truth_named_by_the_manifest_gives_quality_figures(tmp_path):
    write_clip(tmp_path / "projects" / "p1" / "clips" / "a.mp4", n_frames=30)
    truth = {"scenes": {"0": {"frames": {"0": [{"code": "CHAR_01", "bbox": [0, 0, 40, 40]}]}}}}
    root, config = _project(tmp_path, [{"index": 0, "clip": "clips/a.mp4"}], ground_truth=truth)
    (root / "ground_truth.json").write_text("not json: a file of this name is no longer read by itself")
    settings, result = _run(config)
    assert result.success
    meta = {e.event_specific_data.materialization.asset_key.path[-1]: e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()}["asset_appearances"]
    assert "| CHAR_01 |" in meta["quality_vs_ground_truth"].value
