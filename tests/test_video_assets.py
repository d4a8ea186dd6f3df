"""`video_clips`, `sampled_frames` and their check, materialised through Dagster on a project partition."""

from __future__ import annotations

import hashlib

import cv2
import pytest
from dagster import AssetKey, DagsterInstance, Definitions, materialize

from cv_assets.defs.resources import build_resources
from cv_assets.defs.video import VIDEO_ASSETS, VIDEO_CHECKS, video_assets
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.store.models import Project, SceneManifest
from cv_assets.video import decoder as decoder_module
from cv_assets.store.frames import frame_image
from cv_assets.video import extract_frames
from helpers.video import materialization, register_project, settings_yaml, write_clip


@pytest.fixture
def env(tmp_path):
    """A config, app database and one project folder (`p1`) inside tmp_path."""
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


def test_materialising_a_project_writes_clips_frames_and_lossless_frame_files(env):
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
    (version,) = [p for p in frames_root.iterdir() if p.is_dir()]
    assert version.name.startswith("v-")
    for row in frames.itertuples():
        assert row.image_path == str(version / f"scene_{row.scene_index:03d}" / f"frame_{row.frame_index:06d}.png")
        assert cv2.imread(row.image_path).shape == (row.height, row.width, 3)
    assert sorted(p.name for p in version.iterdir()) == ["scene_000", "scene_001"]

    # Frames are stored losslessly: the file holds exactly the decoded pixels the hash names.
    extracted = {f.frame_index: f for f in extract_frames(a, scene0.frame_index)}
    for row in scene0.itertuples():
        assert row.content_hash == extracted[row.frame_index].content_hash
        stored = frame_image(row)
        assert stored is not None and (stored == extracted[row.frame_index].image).all()

    (check,) = result.get_asset_check_evaluations()
    assert check.passed and "all 2 clips of p1 decode" in check.description

    meta = materialization(result, "sampled_frames").metadata
    assert meta["frames"].value == 11
    assert meta["frames_dir"].value == str(version)
    assert (meta["base_frames"].value, meta["last_frames"].value, meta["motion_frames"].value) == (6, 2, 3)
    assert "| 0 | ok | 7 | 0 (base), 30 (motion), 50 (base)" in meta["frames_table"].value
    clip_meta = materialization(result, "video_clips").metadata
    assert clip_meta["scenes"].value == 2 and clip_meta["frames_decoded"].value == 290
    assert "| 1 | ok | — | 0 (base), 45 (motion), 60 (base), 89 (last) | 90 / 90 | 3 | 320x180 | 30 | h264 |" in clip_meta["scenes_table"].value


def test_each_clip_is_decoded_once_when_both_assets_run_together(env, monkeypatch):
    two_scene_project(env)
    opened = []
    real_open = decoder_module.av.open
    monkeypatch.setattr(decoder_module.av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert env.run(VIDEO_ASSETS).success
    assert len(opened) == 2


def test_a_changed_frame_file_is_not_served_as_the_sampled_pixels(env):
    two_scene_project(env)
    assert env.run(VIDEO_ASSETS).success
    row = next(env.warehouse.query("SELECT * FROM sampled_frames WHERE project = 'p1'").itertuples())
    image = frame_image(row)
    cv2.imwrite(row.image_path, 255 - image[:, :, ::-1])
    assert frame_image(row) is None


def test_rerun_replaces_rows_and_leaves_no_stale_frames(env):
    a, b = two_scene_project(env)
    assert env.run(VIDEO_ASSETS).success
    frames_root = env.settings.storage.frames_dir / "p1"
    (first,) = frames_root.glob("v-*")
    assert len(list((first / "scene_000").iterdir())) == 7
    # Leftovers of runs killed mid-export (older layouts too) are cleaned by the next run.
    (frames_root / ".p1.staging-dead").mkdir()
    (frames_root / "v-killed-run" / "scene_000").mkdir(parents=True)

    # Scene 0 is regenerated shorter and still; scene 1 is dropped from the project.
    write_clip(a, n_frames=40)
    with env.db.write() as session:
        project = session.query(Project).filter_by(key="p1").one()
        session.query(SceneManifest).filter_by(project_id=project.id, scene_index=1).delete()
    assert env.run(VIDEO_ASSETS).success

    (second,) = frames_root.glob("v-*")  # earlier versions and leftovers are gone
    assert second != first and sorted(p.name for p in frames_root.iterdir()) == [".frames.lock", second.name]
    assert sorted(p.name for p in (second / "scene_000").iterdir()) == ["frame_000000.png", "frame_000039.png"]
    assert [p.name for p in second.iterdir()] == ["scene_000"]
    assert [p.name for p in frames_root.parent.iterdir()] == ["p1"]
    assert env.warehouse.count("clips", "p1") == 1
    rows = env.warehouse.query("SELECT frame_index FROM sampled_frames WHERE project = 'p1' ORDER BY frame_index")
    assert list(rows.frame_index) == [0, 39]


def test_unknown_project_fails_with_a_clear_message(env):
    env.instance.add_dynamic_partitions("projects", ["ghost"])
    result = env.run(VIDEO_ASSETS, key="ghost", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("project 'ghost' is not registered")
    assert "materialise project_manifest" in description
    assert len([e for e in result.all_events if e.event_type_value == "STEP_START"]) == 1  # bad input: no retry


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
    clips_key, frames_key = (AssetKey("video_clips"), AssetKey("sampled_frames"))
    assert [k.to_user_string() for k in graph.get(clips_key).parent_keys] == ["project_manifest"]
    assert [k.to_user_string() for k in graph.get(frames_key).parent_keys] == ["video_clips"]
    assert graph.get(clips_key).group_name == "video"
    assert video_assets.descriptions_by_key[clips_key].startswith("One row per scene")
