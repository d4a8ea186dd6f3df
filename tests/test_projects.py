"""Project manifests and the project sensor: new, unchanged, edited and invalid projects."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context
from sqlalchemy import select

from cv_assets.manifest import ManifestError, discover_manifests, load_manifest
from cv_assets.defs.projects import project_sensor
from cv_assets.defs.resources import AppDatabaseResource, SettingsResource
from cv_assets.settings import load_settings
from cv_assets.store import AppDatabase
from cv_assets.store.models import Asset, Project, SceneManifest


def write_project(root, key, n_scenes=2, codes=("CHAR_01", "PROP_01"), **overrides):
    folder = root / key
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for code in codes:
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / "refs" / f"{code}.png")
    manifest = {
        "project": key,
        "name": f"Project {key}",
        "assets": [{"code": c, "kind": "character" if c.startswith("CHAR") else "prop", "name": c.lower(),
                    "reference_image": f"refs/{c}.png"} for c in codes],
        "scenes": [{"index": i, "clip": f"clips/scene_{i:02d}.mp4", "expected_assets": list(codes[:1])} for i in range(n_scenes)],
    }
    manifest.update(overrides)
    (folder / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


@pytest.fixture
def env(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {
        "database_url": "sqlite:///app.sqlite", "duckdb_path": "wh.duckdb", "projects_root": "projects",
        "frames_dir": "frames", "reports_dir": "reports", "thumbnails_root": "thumbs"}}))
    settings = load_settings(cfg)
    settings.storage.projects_root.mkdir()
    resources = {"settings": SettingsResource.from_settings(settings), "app_db": AppDatabaseResource(sqlite_url=settings.storage.sqlite_url)}
    return settings, resources


def test_manifest_loads_with_absolute_paths_and_a_stable_hash(tmp_path):
    folder = write_project(tmp_path, "alpha")
    m = load_manifest(folder)
    assert m.key == "alpha" and m.name == "Project alpha"
    assert m.clip_path(m.spec.scenes[1]) == (folder / "clips" / "scene_01.mp4").resolve()
    assert load_manifest(folder).content_hash == m.content_hash


@pytest.mark.parametrize(
    "override, message",
    [
        ({"project": "Bad Key"}, "project: must be lower-case"),
        ({"scenes": []}, "scenes: List should have at least 1 item"),
        ({"scenes": [{"index": -1, "clip": "a.mp4"}]}, "scenes[0].index: Input should be greater than or equal to 0"),
        ({"scenes": [{"index": 0, "clip": "a.mp4", "expected_assets": ["CHAR_09"]}]}, "unknown asset codes ['CHAR_09']"),
        ({"scenes": [{"index": 0, "clip": "a.mp4", "colour": "red"}]}, "scenes[0].colour: unknown field"),
        ({"assets": [{"code": "char1", "kind": "character", "name": "x", "reference_image": "refs/CHAR_01.png"}]}, "assets[0].code: must look like CHAR_01"),
        ({"assets": [{"code": "CHAR_01", "kind": "robot", "name": "x", "reference_image": "refs/CHAR_01.png"}]}, "assets[0].kind"),
        ({"assets": [{"code": "CHAR_01", "kind": "prop", "name": "x", "reference_image": "refs/nope.png"}]}, "assets[0].reference_image: file not found: refs/nope.png"),
        ({"assets": [{"code": "CHAR_01", "kind": "prop", "name": "x", "reference_image": "../../etc/passwd"}]}, "resolves outside the project folder"),
    ],
)
def test_invalid_manifest_names_the_field(tmp_path, override, message):
    folder = write_project(tmp_path, "beta", **override)
    with pytest.raises(ManifestError) as err:
        load_manifest(folder)
    assert message in str(err.value) and "project.yaml" in str(err.value)


def test_not_yaml_and_missing_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ManifestError, match="no project.yaml"):
        load_manifest(tmp_path / "x")
    (tmp_path / "x" / "project.yaml").write_text("project: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(tmp_path / "x")


def test_discover_keeps_good_projects_beside_bad_ones(tmp_path):
    write_project(tmp_path, "good1")
    write_project(tmp_path, "bad", project="BAD!")
    write_project(tmp_path, "good2")
    good, bad = discover_manifests(tmp_path)
    assert [m.key for m in good] == ["good1", "good2"]
    assert list(bad) == ["bad"] and "must be lower-case" in bad["bad"]


def _tick(instance, resources, cursor=None):
    with build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        return project_sensor(ctx)


def test_sensor_new_unchanged_edited_invalid(env):
    settings, resources = env
    root = settings.storage.projects_root
    instance = DagsterInstance.ephemeral()
    assert isinstance(_tick(instance, resources), SkipReason)

    write_project(root, "alpha")
    write_project(root, "broken", project="Nope Nope")
    result = _tick(instance, resources)
    assert isinstance(result, SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["alpha"]
    first_key = result.run_requests[0].run_key
    assert first_key.startswith("alpha:")
    assert result.dynamic_partitions_requests[0].partition_keys == ["alpha"]
    instance.add_dynamic_partitions("projects", ["alpha"])

    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as s:
        project = s.scalar(select(Project).where(Project.key == "alpha"))
        assert project.manifest_hash == first_key.split(":")[1]
        assert [a.code for a in s.scalars(select(Asset).order_by(Asset.code))] == ["CHAR_01", "PROP_01"]
        scenes = list(s.scalars(select(SceneManifest).order_by(SceneManifest.scene_index)))
        assert [json.loads(x.expected_asset_codes) for x in scenes] == [["CHAR_01"], ["CHAR_01"]]

    # unchanged: the same run key (Dagster drops a duplicate run key) and no new partition
    again = _tick(instance, resources)
    assert [r.run_key for r in again.run_requests] == [first_key]
    assert again.dynamic_partitions_requests == []

    # edited: a third scene -> a new run key, synced rows
    write_project(root, "alpha", n_scenes=3)
    edited = _tick(instance, resources)
    assert edited.run_requests[0].run_key != first_key
    with db.read() as s:
        assert s.query(SceneManifest).count() == 3


def test_sensor_removes_assets_and_scenes_dropped_from_the_manifest(env):
    settings, resources = env
    root = settings.storage.projects_root
    write_project(root, "gamma", n_scenes=3, codes=("CHAR_01", "CHAR_02"))
    _tick(DagsterInstance.ephemeral(), resources)
    write_project(root, "gamma", n_scenes=1, codes=("CHAR_01",))
    _tick(DagsterInstance.ephemeral(), resources)
    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as s:
        assert [a.code for a in s.scalars(select(Asset))] == ["CHAR_01"]
        assert [x.scene_index for x in s.scalars(select(SceneManifest))] == [0]


def test_sensor_requests_a_new_run_when_the_embedder_changes(env, tmp_path):
    settings, resources = env
    write_project(settings.storage.projects_root, "delta")
    instance = DagsterInstance.ephemeral()
    before = _tick(instance, resources).run_requests[0].run_key
    assert _tick(instance, resources).run_requests[0].run_key == before
    # The code location is rebuilt from the new config (config is read once, by build_definitions).
    switched = settings.model_copy(deep=True)
    switched.embedder.model = str(tmp_path / "another-model")
    after = _tick(instance, {**resources, "settings": SettingsResource.from_settings(switched)}).run_requests[0].run_key
    assert after != before and after.split(":")[:2] == before.split(":")[:2]


def test_sensor_skips_projects_a_finished_run_processed_whoever_ran_it(env):
    """`make run` (or a UI launch) records what project_report finished; the sensor then
    launches nothing for that manifest and embedder, and says why. An edit launches again."""
    from cv_assets.events.backfill import embedder_fingerprint
    from cv_assets.store.projects import processed_projects, record_processed

    settings, resources = env
    root = settings.storage.projects_root
    instance = DagsterInstance.ephemeral()
    write_project(root, "alpha")
    write_project(root, "beta")
    assert len(_tick(instance, resources).run_requests) == 2
    db = AppDatabase(settings.storage.sqlite_url)
    model = embedder_fingerprint(settings.embedder)
    assert record_processed(db, "alpha", model, "run-1") == "run-1"
    assert record_processed(db, "alpha", model, "run-2") == "run-1"  # nothing changed since run-1
    assert [r.partition_key for r in _tick(instance, resources).run_requests] == ["beta"]

    record_processed(db, "beta", model, "run-3")
    skipped = _tick(instance, resources)
    assert skipped.run_requests == []
    assert skipped.skip_reason.skip_message.startswith("2 projects unchanged (alpha, beta)")

    write_project(root, "alpha", n_scenes=3)  # an edit: alpha runs again
    assert [r.partition_key for r in _tick(instance, resources).run_requests] == ["alpha"]
    assert record_processed(db, "alpha", model, "run-4") == "run-4"
    assert processed_projects(db)["alpha"].run_id == "run-4"
    assert record_processed(db, "alpha", "another-embedder", "run-5") == "run-5"  # a model switch too
