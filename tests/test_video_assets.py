"""`video_clips`, `sampled_frames` and their check, materialised through Dagster on a project partition."""

from __future__ import annotations

import hashlib

import cv2
import pytest
from dagster import DagsterInstance, Definitions, materialize

from cv_assets.defs.resources import build_resources
from cv_assets.defs.video import VIDEO_ASSETS, VIDEO_CHECKS, sampled_frames, video_clips
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.store.models import Project, SceneManifest
from cv_assets.video import decoder as decoder_module
from cv_assets.video import extract_frames, frame_cache, sampling_cache
from video_fixtures import register_project, settings_yaml, write_clip


@pytest.fixture
def env(tmp_path):
    """A config, app database and one project folder (`p1`) inside tmp_path."""
    sampling_cache.clear()
    frame_cache.clear()
    config = settings_yaml(tmp_path)
    settings = load_settings(config)
    db = AppDatabase(settings.storage.sqlite_url)
    root = tmp_path / "projects" / "p1"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["p1"])

    class Env:
        pass

    e = Env()
    e.config, e.settings, e.db, e.root, e.instance = config, settings, db, root, instance
    e.warehouse = Warehouse(settings.storage.duckdb_path)
    e.run = lambda assets, key="p1", **kw: materialize(
        assets, partition_key=key, resources=build_resources(settings), instance=instance, **kw
    )
    return e


def two_scene_project(env):
    a = write_clip(env.root / "clips" / "a.mp4", fps=25, n_frames=200, cuts=[30, 80])  # 8 s
    b = write_clip(env.root / "clips" / "b.mp4", fps=30, width=320, height=180, n_frames=90, cuts=[45])  # 3 s
    register_project(env.db, "p1", env.root, [a, b])
    return a, b


def test_materialising_a_project_writes_clips_frames_jpegs_and_the_cache(env):
    a, b = two_scene_project(env)
    result = env.run([*VIDEO_ASSETS, *VIDEO_CHECKS])
    assert result.success

    clips = env.warehouse.query("SELECT * FROM clips WHERE project = 'p1' ORDER BY scene_index")
    assert list(clips.path) == ["clips/a.mp4", "clips/b.mp4"]
    assert list(clips.status) == ["ok", "ok"] and clips.reason.isna().all()
    assert list(clips.fps) == [25.0, 30.0]
    assert list(clips.width) == [160, 320] and list(clips.height) == [90, 180]
    assert list(clips.declared_frames) == [200, 90] and list(clips.decoded_frames) == [200, 90]
    assert list(clips.duration_sec) == pytest.approx([8.0, 3.0])
    assert list(clips.codec) == ["h264", "h264"]
    assert list(clips.size_bytes) == [a.stat().st_size, b.stat().st_size]
    assert list(clips.content_hash) == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert (clips.decode_ms > 0).all()

    frames = env.warehouse.query(
        "SELECT * FROM sampled_frames WHERE project = 'p1' ORDER BY scene_index, frame_index"
    )
    scene0 = frames[frames.scene_index == 0]
    assert list(scene0.frame_index) == [0, 30, 50, 80, 100, 150, 199]
    assert [list(r) for r in scene0.reasons] == [["base"], ["motion"], ["base"], ["motion"], ["base"], ["base"], ["last"]]
    assert list(scene0.timestamp_sec) == pytest.approx([0, 1.2, 2, 3.2, 4, 6, 7.96])
    scene1 = frames[frames.scene_index == 1]
    assert list(scene1.frame_index) == [0, 45, 60, 89]
    assert list(scene1.timestamp_sec) == pytest.approx([0, 1.5, 2.0, 89 / 30])
    assert (scene1.width == 320).all() and (scene1.height == 180).all()
    motion_rows = frames[[("motion" in r) for r in frames.reasons]]
    assert (motion_rows.motion_score > 0.15).all()

    frames_root = env.settings.storage.frames_dir / "p1"
    for row in frames.itertuples():
        assert row.image_path == str(frames_root / f"scene_{row.scene_index:03d}" / f"frame_{row.frame_index:06d}.jpg")
        jpeg = cv2.imread(row.image_path)
        assert jpeg.shape == (row.height, row.width, 3)
    assert sorted(p.name for p in frames_root.iterdir()) == ["scene_000", "scene_001"]

    # Hashes are of the decoded pixels, which the frame cache serves to the embedder.
    extracted = {f.frame_index: f for f in extract_frames(a, scene0.frame_index)}
    for row in scene0.itertuples():
        assert row.content_hash == extracted[row.frame_index].content_hash
        cached = frame_cache.get("p1", 0, row.frame_index, row.content_hash)
        assert cached is not None and (cached == extracted[row.frame_index].image).all()

    (check,) = result.get_asset_check_evaluations()
    assert check.passed and "all 2 clips of p1 decode" in check.description

    meta = result.asset_materializations_for_node("sampled_frames")[0].metadata
    assert meta["frames"].value == 11
    assert meta["frames_dir"].value == str(frames_root)
    assert (meta["base_frames"].value, meta["last_frames"].value, meta["motion_frames"].value) == (6, 2, 3)
    assert "| 0 | ok | 7 | 0 (base), 30 (motion), 50 (base)" in meta["frames_table"].value
    assert meta["sampling_results_reused"].value == 2
    clip_meta = result.asset_materializations_for_node("video_clips")[0].metadata
    assert clip_meta["scenes"].value == 2 and clip_meta["frames_decoded"].value == 290
    assert "| 1 | ok | h264 | 320x180 | 30 | 90 / 90 | 3 |" in clip_meta["scenes_table"].value


def test_each_clip_is_decoded_once_when_both_assets_run_together(env, monkeypatch):
    two_scene_project(env)
    opened = []
    real_open = decoder_module.av.open
    monkeypatch.setattr(decoder_module.av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert env.run(VIDEO_ASSETS).success
    assert len(opened) == 2


def test_sampled_frames_decodes_again_when_the_cache_is_cold(env):
    two_scene_project(env)
    assert env.run([video_clips]).success
    sampling_cache.clear()
    result = env.run([sampled_frames])
    assert result.success
    meta = result.asset_materializations_for_node("sampled_frames")[0].metadata
    assert meta["sampling_results_reused"].value == 0 and meta["frames"].value == 11
    assert env.warehouse.count("sampled_frames", "p1") == 11


def test_rerun_replaces_rows_and_leaves_no_stale_jpegs(env):
    a, b = two_scene_project(env)
    assert env.run(VIDEO_ASSETS).success
    frames_root = env.settings.storage.frames_dir / "p1"
    assert len(list((frames_root / "scene_000").iterdir())) == 7

    # Scene 0 is regenerated shorter and still; scene 1 is dropped from the project.
    write_clip(a, n_frames=40)
    with env.db.write() as session:
        project = session.query(Project).filter_by(key="p1").one()
        session.query(SceneManifest).filter_by(project_id=project.id, scene_index=1).delete()
    assert env.run(VIDEO_ASSETS).success

    assert sorted(p.name for p in (frames_root / "scene_000").iterdir()) == ["frame_000000.jpg", "frame_000039.jpg"]
    assert [p.name for p in frames_root.iterdir()] == ["scene_000"]
    assert [p.name for p in frames_root.parent.iterdir()] == ["p1"]  # no staging or old folders left
    assert env.warehouse.count("clips", "p1") == 1
    rows = env.warehouse.query("SELECT frame_index FROM sampled_frames WHERE project = 'p1' ORDER BY frame_index")
    assert list(rows.frame_index) == [0, 39]


def test_unknown_project_fails_with_a_clear_message(env):
    env.instance.add_dynamic_partitions("projects", ["ghost"])
    result = env.run([video_clips], key="ghost", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("project 'ghost' is not in the app database")
    assert "register it" in description


def test_absolute_clip_paths_inside_the_project_are_accepted(env):
    clip = write_clip(env.root / "abs.mp4", n_frames=30)
    register_project(env.db, "p1", env.root, [str(clip)])
    assert env.run(VIDEO_ASSETS).success
    clips = env.warehouse.query("SELECT path, status FROM clips WHERE project = 'p1'")
    assert list(clips.status) == ["ok"] and list(clips.path) == [str(clip)]


def test_definitions_load_with_the_video_assets_and_check(env):
    defs = Definitions(
        assets=VIDEO_ASSETS, asset_checks=VIDEO_CHECKS, resources=build_resources(env.settings)
    )
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == {"video_clips", "sampled_frames"}
    assert [k.to_user_string() for k in graph.get(video_clips.key).parent_keys] == ["project_manifest"]
    assert graph.get(video_clips.key).group_name == "video"
    assert video_clips.descriptions_by_key[video_clips.key].startswith("One row per scene")
