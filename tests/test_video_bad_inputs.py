"""Bad clips: each gets a clear reason, nothing hangs, and the rest of the project is still processed."""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from cv_assets.defs.resources import build_resources
from cv_assets.defs.video import VIDEO_ASSETS, VIDEO_CHECKS
from cv_assets.settings import CvAnalysisSettings, SamplingSettings, load_settings
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.video import VideoInputError, detect_motion_deltas, extract_frames, sample_video_frames
from helpers.video import materialization, register_project, settings_yaml, truncate_copy, write_clip, write_clip_without_decoder

SAMPLING = SamplingSettings()
CV = CvAnalysisSettings()


def sample(path, sampling=SAMPLING, project_root=None):
    return sample_video_frames(path, sampling, CV, project_root=project_root)


def assert_failed(result, *fragments):
    assert result.probe.status == "failed", result.probe
    assert result.frames == []
    for fragment in fragments:
        assert fragment in result.probe.reason, result.probe.reason


def zero_mdat_payload(src: Path, dst: Path) -> Path:
    """Keep the MP4 structure and index but blank every coded picture: it opens, yields nothing."""
    data = bytearray(src.read_bytes())
    offset = 0
    while offset < len(data):
        size, name = struct.unpack(">I4s", bytes(data[offset:offset + 8]))
        if name == b"mdat":
            data[offset + 8:offset + size] = bytes(size - 8)
        offset += size
    dst.write_bytes(bytes(data))
    return dst


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert_failed(sample(empty), "empty file (0 bytes)")
    assert str(empty) in sample(empty).probe.path


def test_text_renamed_to_mp4(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("shot list:\n1. wide\n2. close-up\n")
    assert_failed(sample(fake), "cannot open as video", "text, not video")


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(random.Random(0).randbytes(20_000))
    assert_failed(sample(junk), "cannot open as video")


def test_mp4_with_its_index_cut_off(tmp_path):
    clip = write_clip(tmp_path / "full.mp4", n_frames=100)  # index (moov) written at the end
    cut = truncate_copy(clip, tmp_path / "cut.mp4", 0.7)
    assert_failed(sample(cut), "moov atom) is missing", "cut off")


def test_truncated_file_decodes_part_way_and_keeps_what_decoded(tmp_path):
    clip = write_clip(tmp_path / "full.mp4", n_frames=200, cuts=[30], faststart=True)  # index first
    cut = truncate_copy(clip, tmp_path / "cut.mp4", 0.5)
    result = sample(cut)
    probe = result.probe
    assert probe.status == "partial"
    assert probe.declared_frames == 200 and 0 < probe.decoded_frames < 200
    assert f"decoded {probe.decoded_frames} of 200 declared frames" in probe.reason
    indices = [f.frame_index for f in result.frames]
    assert indices[0] == 0 and indices[-1] == probe.decoded_frames - 1
    assert "last" in result.frames[-1].reasons
    assert all(f.image.shape == (90, 160, 3) for f in result.frames)


def test_truncated_file_without_frame_count_is_partial_by_duration(tmp_path):
    clip = write_clip(tmp_path / "full.mkv", n_frames=100)
    cut = truncate_copy(clip, tmp_path / "cut.mkv", 0.5)
    result = sample(cut)
    assert result.probe.status == "partial"
    assert result.probe.declared_frames is None
    assert "of the 4.00 s declared" in result.probe.reason
    assert result.frames


def test_codec_without_a_decoder_fails(tmp_path):
    # A real Matroska file whose track names an unknown codec (see write_clip_without_decoder).
    result = sample(write_clip_without_decoder(tmp_path / "nodecoder.mkv"))
    assert_failed(result, "no decoder")


def test_stream_that_opens_but_yields_no_frame_fails(tmp_path):
    clip = write_clip(tmp_path / "src.mp4", n_frames=20, faststart=True)
    blank = zero_mdat_payload(clip, tmp_path / "blank.mp4")
    result = sample(blank)
    assert_failed(result, "no frame could be decoded")
    assert result.probe.codec == "h264" and result.probe.declared_frames == 20
    assert result.probe.decoded_frames == 0


def test_missing_path_and_directory(tmp_path):
    assert_failed(sample(tmp_path / "nope.mp4"), "no such file")
    assert_failed(sample(tmp_path), "is a directory")


def _finishes_quickly(fn, seconds=10.0):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "sampling hung"
    return box["result"]


def test_fifo_is_rejected_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    result = _finishes_quickly(lambda: sample(fifo))
    assert_failed(result, "FIFO")


def test_device_file_is_rejected(tmp_path):
    result = _finishes_quickly(lambda: sample("/dev/zero"))
    assert_failed(result, "device file")


def test_paths_escaping_the_project_folder(tmp_path):
    project = tmp_path / "project"
    outside = write_clip(tmp_path / "elsewhere" / "clip.mp4", n_frames=5)
    (project / "clips").mkdir(parents=True)
    (project / "clips" / "link.mp4").symlink_to(outside)
    assert_failed(sample("clips/link.mp4", project_root=project), "outside the project folder")
    assert_failed(sample("../elsewhere/clip.mp4", project_root=project), "outside the project folder")
    assert_failed(sample(str(outside), project_root=project), "outside the project folder")
    (project / "clips" / "dev.mp4").symlink_to("/dev/zero")
    assert_failed(sample("clips/dev.mp4", project_root=project), "outside the project folder")
    # A link that stays inside the project is fine.
    inside = write_clip(project / "clips" / "real.mp4", n_frames=5)
    (project / "clips" / "alias.mp4").symlink_to(inside)
    assert sample("clips/alias.mp4", project_root=project).probe.status == "ok"


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("http://example.com/clip.mp4", "URL or FFmpeg protocol"),
        ("concat:a.mp4|b.mp4", "URL or FFmpeg protocol"),
        ("pipe:0", "URL or FFmpeg protocol"),
        ("frames/img%03d.png", "printf pattern"),
        ("shot_%d.mp4", "printf pattern"),
    ],
)
def test_urls_and_patterns_are_not_paths(path, fragment):
    result = sample(path)
    assert_failed(result, fragment)
    assert result.probe.path == path


def test_limits_on_resolution_duration_and_size(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", width=320, height=180, n_frames=100)  # 4 s
    narrow = SamplingSettings(max_width=200)
    result = sample(clip, narrow)
    assert_failed(result, "resolution 320x180 is above the limit 200x4320")
    assert (result.probe.width, result.probe.height) == (320, 180)
    assert_failed(sample(clip, SamplingSettings(max_duration_sec=3)), "declared duration 4.0 s", "max_duration_sec=3")
    assert_failed(sample(clip, SamplingSettings(max_file_bytes=100)), "above the limit sampling.max_file_bytes=100")


def test_library_functions_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoInputError, match=r"empty\.mp4: empty file \(0 bytes\)"):
        detect_motion_deltas(empty)
    with pytest.raises(VideoInputError, match="URL or FFmpeg protocol"):
        extract_frames("https://example.com/x.mp4", [0])


# -- through Dagster: one bad scene never sinks the others --------------------------------------------


def test_project_with_bad_scenes_still_processes_the_good_ones(tmp_path):
    config = settings_yaml(tmp_path)
    settings = load_settings(config)
    root = tmp_path / "projects" / "p1"
    clips = root / "clips"
    good = write_clip(clips / "good.mp4", n_frames=100, cuts=[30])
    empty = clips / "empty.mp4"
    empty.write_bytes(b"")
    text = clips / "text.mp4"
    text.write_text("not a video\n")
    no_index = truncate_copy(write_clip(tmp_path / "src" / "a.mp4", n_frames=60), clips / "noindex.mp4", 0.6)
    partial = truncate_copy(
        write_clip(tmp_path / "src" / "b.mp4", n_frames=150, faststart=True), clips / "partial.mp4", 0.5
    )
    no_decoder = write_clip_without_decoder(clips / "nodecoder.mkv")
    fifo = clips / "pipe.mp4"
    os.mkfifo(fifo)
    (clips / "folder.mp4").mkdir()
    outside = write_clip(tmp_path / "outside" / "o.mp4", n_frames=5)
    (clips / "escape.mp4").symlink_to(outside)
    scenes = [
        good, empty, text, no_index, partial, no_decoder, fifo, clips / "folder.mp4", "clips/missing.mp4",
        clips / "escape.mp4", "http://example.com/x.mp4", "clips/img%03d.png", "/dev/zero",
    ]
    db = AppDatabase(settings.storage.sqlite_url)
    register_project(db, "p1", root, scenes)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["p1"])

    result = _finishes_quickly(
        lambda: materialize(
            [*VIDEO_ASSETS, *VIDEO_CHECKS],
            partition_key="p1",
            resources=build_resources(settings),
            instance=instance,
        ),
        seconds=120,
    )
    assert result.success

    warehouse = Warehouse(settings.storage.duckdb_path)
    clips_rows = warehouse.query("SELECT * FROM clips WHERE project = 'p1' ORDER BY scene_index")
    statuses = dict(zip(clips_rows.scene_index, clips_rows.status))
    reasons = dict(zip(clips_rows.scene_index, clips_rows.reason))
    assert statuses == {
        0: "ok", 1: "failed", 2: "failed", 3: "failed", 4: "partial", 5: "failed", 6: "failed", 7: "failed",
        8: "failed", 9: "failed", 10: "failed", 11: "failed", 12: "failed",
    }
    expected_fragments = {
        1: "empty file", 2: "text, not video", 3: "moov atom", 4: "of 150 declared", 5: "no decoder",
        6: "FIFO", 7: "is a directory", 8: "no such file", 9: "outside the project folder",
        10: "URL or FFmpeg protocol", 11: "printf pattern", 12: "outside the project folder",
    }
    for scene, fragment in expected_fragments.items():
        assert fragment in reasons[scene], (scene, reasons[scene])
    good_row = clips_rows.iloc[0]
    assert (good_row.codec, good_row.width, good_row.height, good_row.fps) == ("h264", 160, 90, 25.0)
    assert good_row.declared_frames == good_row.decoded_frames == 100

    frames = warehouse.query("SELECT scene_index, frame_index, reasons FROM sampled_frames WHERE project = 'p1'")
    assert set(frames.scene_index) == {0, 4}
    assert sorted(frames[frames.scene_index == 0].frame_index) == [0, 30, 50, 99]
    (frames_dir,) = (settings.storage.frames_dir / "p1").glob("v-*")
    assert sorted(p.name for p in frames_dir.iterdir()) == ["scene_000", "scene_004"]

    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.severity.value == "ERROR"
    for scene in expected_fragments:
        assert f"scene {scene} (" in check.description
    assert "scene 0 (" not in check.description
    assert "12 of 13 clips of p1 are not fully decodable" in check.description

    clips_meta = materialization(result, "video_clips").metadata
    assert clips_meta["failed"].value == 11 and clips_meta["partial"].value == 1 and clips_meta["ok"].value == 1
    assert "| 2 | failed |" in clips_meta["scenes_table"].value


def test_limits_from_the_config_apply_through_dagster(tmp_path):
    config = settings_yaml(tmp_path, max_duration_sec=3, max_width=200)
    settings = load_settings(config)
    root = tmp_path / "projects" / "p1"
    short = write_clip(root / "short.mp4", n_frames=50)  # 2 s, 160x90
    long = write_clip(root / "long.mp4", n_frames=100)  # 4 s
    wide = write_clip(root / "wide.mp4", width=320, height=180, n_frames=25)
    register_project(AppDatabase(settings.storage.sqlite_url), "p1", root, [short, long, wide])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["p1"])
    result = materialize(
        [*VIDEO_ASSETS, *VIDEO_CHECKS], partition_key="p1", resources=build_resources(settings),
        instance=instance,
    )
    assert result.success
    clips = Warehouse(settings.storage.duckdb_path).query("SELECT status, reason FROM clips ORDER BY scene_index")
    assert list(clips.status) == ["ok", "failed", "failed"]
    assert "above the limit sampling.max_duration_sec=3" in clips.reason[1]
    assert "resolution 320x180 is above the limit 200x4320" in clips.reason[2]
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and "scene 1 (long.mp4)" in check.description and "scene 2 (wide.mp4)" in check.description
