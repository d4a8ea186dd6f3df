"""Hardening (issue 12): each case as a user meets it, through the CLI, the sensor or Dagster.

Key ownership, manifest caps, symlinked or special project.yaml files, control characters,
config validated at load, absurd clip headers, unusable stores and stop signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, SkipReason, build_sensor_context, materialize
from PIL import Image
from sqlalchemy import func, select

from cv_assets.cli import main as cli_main
from cv_assets.defs.projects import project_sensor
from cv_assets.defs.resources import SettingsResource, build_resources
from cv_assets.defs.video import VIDEO_ASSETS, VIDEO_CHECKS
from cv_assets.settings import ContinuityWeights, load_settings
from cv_assets.store import AppDatabase, Warehouse
from cv_assets.store.models import Asset, AssetAppearance, Project, SceneManifest
from helpers.video import register_project, settings_yaml, write_clip

REPO = Path(__file__).resolve().parent.parent
RAW_CONTROL = ("\x1b", "\x00", "\x07")


# ---------------------------------------------------------------- helpers


def write_project(root: Path, folder: str, key: str | None = None, n_scenes: int = 1, clip: Path | None = None,
                  name: str | None = None, codes=("CHAR_01",)) -> Path:
    """A project folder with reference images; the clip is copied in when given."""
    project = root / folder
    (project / "refs").mkdir(parents=True, exist_ok=True)
    for code in codes:
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(project / "refs" / f"{code}.png")
    if clip is not None:
        (project / "clips").mkdir(exist_ok=True)
        (project / "clips" / "scene_00.mp4").write_bytes(clip.read_bytes())
    manifest = {
        "project": key or folder,
        "name": name or f"Project {folder}",
        "assets": [{"code": c, "kind": "character", "name": c.lower(), "reference_image": f"refs/{c}.png"} for c in codes],
        "scenes": [{"index": i, "clip": "clips/scene_00.mp4", "expected_assets": [codes[0]]} for i in range(n_scenes)],
    }
    (project / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return project


def cli(*argv, capsys) -> tuple[int, str, str]:
    status = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def run_cli(*argv, env_extra: dict | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python -m cv_assets.cli ...` in a child process (the way a user runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CV_ASSETS")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "cv_assets.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def tick(settings, capsys, instance=None):
    """One sensor evaluation and what it logged (Dagster's console logger writes to stderr)."""
    resources = {"settings": SettingsResource.from_settings(settings),
                 "app_db": build_resources(settings)["app_db"]}
    capsys.readouterr()
    with build_sensor_context(instance=instance or DagsterInstance.ephemeral(), resources=resources) as ctx:
        result = project_sensor(ctx)
    return result, capsys.readouterr().err


def assert_no_raw_control(text: str) -> None:
    for char in RAW_CONTROL:
        assert char not in text, repr(text)


@pytest.fixture
def small_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", n_frames=20)


# ---------------------------------------------------------------- 1. project keys


def test_folder_name_and_key_must_agree_in_validate_and_sensor(settings_factory, capsys):
    settings, config = settings_factory()
    root = settings.storage.projects_root
    write_project(root, "keymismatch", key="other_key")
    write_project(root, "fine")
    status, out, _ = cli("--config", config, "projects", "validate", capsys=capsys)
    assert status == 1
    assert "ok       fine" in out
    assert "INVALID  keymismatch" in out
    assert "project key 'other_key' differs from its folder name 'keymismatch'" in out
    result, log = tick(settings, capsys)
    assert [r.partition_key for r in result.run_requests] == ["fine"]
    assert "project keymismatch skipped" in log and "differs from its folder name" in log


def _register_with_results(settings, folder: Path) -> int:
    """Register the project from `folder` through the sensor and give it analysis rows."""
    db = AppDatabase(settings.storage.sqlite_url)
    from cv_assets.manifest import load_manifest
    from cv_assets.store.projects import upsert_project

    project_id = upsert_project(db, load_manifest(folder)).project_id
    with db.write() as session:
        asset = session.scalar(select(Asset).where(Asset.project_id == project_id))
        scene = session.scalar(select(SceneManifest).where(SceneManifest.project_id == project_id))
        scene.continuity_score = 8.5
        session.add(AssetAppearance(asset_id=asset.id, project_id=project_id, scene_index=0, frame_index=3,
                                    timestamp_sec=0.1, bbox="[0, 0, 1, 1]", confidence=0.9, source="clip_match"))
    return project_id


def _project_rows(settings) -> tuple:
    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as session:
        project = session.scalar(select(Project).where(Project.key == "demo"))
        return (project.name, project.root_path,
                sorted(session.scalars(select(Asset.reference_image_path))),
                sorted(session.scalars(select(SceneManifest.clip_path))),
                session.scalar(select(SceneManifest.continuity_score)),
                session.scalar(select(func.count()).select_from(AssetAppearance)))


def test_a_second_folder_declaring_a_registered_key_is_refused_everywhere(settings_factory, tmp_path, capsys):
    """The key belongs to the folder that registered it first. A second projects root with a
    folder of the same name (the issue's take-over) is invalid for the sensor, `projects
    validate` and `run-demo`, and the registered project's rows stay as they were."""
    first, _ = settings_factory()
    original = write_project(first.storage.projects_root, "demo", name="The real demo")
    _register_with_results(first, original)
    before = _project_rows(first)
    assert before[0] == "The real demo" and before[-1] == 1

    other_root = tmp_path / "elsewhere" / "projects"
    intruder = write_project(other_root, "demo", name="Intruder", n_scenes=3, codes=("PROP_07",))
    write_project(other_root, "evil\x1b]0;owned\x07", key="evil")  # control characters in a folder name
    second, config = settings_factory(storage={"projects_root": str(other_root)})

    result, log = tick(second, capsys)
    assert isinstance(result, SkipReason) and "2 invalid" in str(result.skip_message)
    assert f"registered to the folder {original.resolve()}, not {intruder.resolve()}" in log
    assert _project_rows(first) == before

    status, out, _ = cli("--config", config, "projects", "validate", capsys=capsys)
    assert status == 1 and "INVALID  demo" in out and str(original.resolve()) in out and str(intruder.resolve()) in out

    # run-demo in its own process; a broken $CV_ASSETS_CONFIG must not matter when --config is given (item 7).
    broken = tmp_path / "broken.yaml"
    broken.write_text("events: {backfill_cron: 'not a cron'}\n")
    done = run_cli("--config", config, "run-demo", env_extra={"CV_ASSETS_CONFIG": str(broken),
                                                              "DAGSTER_HOME": str(tmp_path / "dagster_home")})
    assert "skipped invalid project demo" in done.stdout, done.stdout + done.stderr
    assert "registered to the folder" in done.stdout
    assert_no_raw_control(done.stdout + done.stderr)
    assert "skipped invalid project evil\\x1b]0;owned\\x07" in done.stdout
    assert not [line for line in done.stdout.splitlines() if line.startswith("project demo:")]
    assert _project_rows(first) == before


def test_a_moved_project_takes_its_key_over_only_when_told(settings_factory, tmp_path, capsys):
    first, _ = settings_factory()
    original = write_project(first.storage.projects_root, "demo", name="The real demo")
    _register_with_results(first, original)
    moved_root = tmp_path / "moved" / "projects"
    moved_root.mkdir(parents=True)
    original.rename(moved_root / "demo")
    second, config = settings_factory(storage={"projects_root": str(moved_root)})
    status, out, _ = cli("--config", config, "projects", "validate", capsys=capsys)
    assert status == 1 and "cv-assets projects reassign demo" in out

    status, out, _ = cli("--config", config, "projects", "reassign", "demo", capsys=capsys)
    assert status == 0 and f"now belongs to {moved_root.resolve() / 'demo'} (was {original.resolve()})" in out
    assert cli("--config", config, "projects", "validate", capsys=capsys)[0] == 0
    result, _ = tick(second, capsys)
    assert [r.partition_key for r in result.run_requests] == ["demo"]
    name, root_path, *_, appearances = _project_rows(second)
    assert (name, root_path, appearances) == ("The real demo", str(moved_root.resolve() / "demo"), 1)


def test_registered_folder_keeps_its_key_on_later_ticks(settings_factory, capsys):
    settings, _ = settings_factory()
    write_project(settings.storage.projects_root, "alpha")
    first, _ = tick(settings, capsys)
    again, log = tick(settings, capsys)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    assert "skipped" not in log


# ---------------------------------------------------------------- 4. manifest caps


def test_manifest_caps_refuse_before_parsing_and_others_go_on(settings_factory, capsys):
    settings, config = settings_factory(manifests={"max_bytes": 8192, "max_scenes": 5})
    root = settings.storage.projects_root
    write_project(root, "good")
    huge = root / "huge"
    huge.mkdir(parents=True)
    # Not YAML at all: a parser would complain about it, the size check must come first.
    (huge / "project.yaml").write_text("project: [" + "x, " * 4000)
    write_project(root, "many", n_scenes=6)
    bomb = root / "bomb"
    bomb.mkdir()
    layers = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    layers += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
               for i in range(1, 8)]
    (bomb / "project.yaml").write_text("\n".join(layers) + "\nproject: bomb\nscenes: [{index: 0, clip: a.mp4, "
                                       "expected_assets: *a7}]\n")
    deep = root / "deep"
    deep.mkdir()
    (deep / "project.yaml").write_text("project: deep\nscenes: " + "[" * 1500 + "]" * 1500 + "\n")
    digits = root / "digits"
    digits.mkdir()
    (digits / "project.yaml").write_text("project: digits\nscenes: [{index: " + "9" * 5000 + ", clip: a.mp4}]\n")

    started = time.perf_counter()
    status, out, err = cli("--config", config, "projects", "validate", capsys=capsys)
    assert time.perf_counter() - started < 30
    assert status == 1 and err == ""
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["good"].startswith("ok")
    assert "bytes, above the limit manifests.max_bytes=8192" in lines["huge"] and "YAML" not in lines["huge"]
    assert "6 scenes, above the limit manifests.max_scenes=5" in lines["many"]
    assert "aliases expand to more than 8192 values" in lines["bomb"]
    assert "INVALID" in lines["deep"] and "deep/project.yaml" in lines["deep"]
    assert "not valid YAML: Exceeds the limit (4300 digits)" in lines["digits"]

    result, log = tick(settings, capsys)
    assert [r.partition_key for r in result.run_requests] == ["good"]
    assert "above the limit manifests.max_bytes=8192" in log and "manifests.max_scenes=5" in log


def test_manifest_cap_defaults():
    manifests = load_settings(env={}).manifests
    assert (manifests.max_bytes, manifests.max_scenes) == (1024 * 1024, 10_000)


# ---------------------------------------------------------------- 10. symlinks and special files


def test_symlinked_or_special_project_yaml_is_reported_unread(settings_factory, tmp_path):
    settings, config = settings_factory()
    root = settings.storage.projects_root
    write_project(root, "good")
    secret = tmp_path / "secret.txt"
    secret.write_text("db_password: TOP-SECRET-VALUE\n[broken\n")
    (root / "escape").mkdir(parents=True)
    (root / "escape" / "project.yaml").symlink_to(secret)
    (root / "zero").mkdir()
    (root / "zero" / "project.yaml").symlink_to("/dev/zero")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "project.yaml")
    device = root / "device" / "project.yaml"
    device.parent.mkdir()
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # like /dev/zero, inside the folder
    except (PermissionError, OSError):
        device = None  # creating device nodes needs CAP_MKNOD
    (root / "dangling").mkdir()
    (root / "dangling" / "project.yaml").symlink_to(tmp_path / "nowhere.yaml")

    done = run_cli("--config", config, "projects", "validate", timeout=60)  # a FIFO read would hang: the timeout fails it
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "TOP-SECRET" not in out + done.stderr and "db_password" not in out
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["good"].startswith("ok")
    assert f"is a symlink to {secret}, outside the project folder; refused unread" in lines["escape"]
    assert "outside the project folder" in lines["zero"]
    assert "is a FIFO (named pipe), not a regular file" in lines["fifo"]
    assert "a symlink whose target does not exist" in lines["dangling"]
    if device is not None:
        assert "is a device file, not a regular file; refused unread" in lines["device"]


# ---------------------------------------------------------------- 11. control characters


def test_control_characters_are_escaped_in_cli_and_sensor_messages(settings_factory, capsys):
    settings, config = settings_factory()
    root = settings.storage.projects_root
    write_project(root, "good")
    write_project(root, "evil\x1b[2J\x07", key="evil")
    folder = root / "badkey"
    folder.mkdir()
    (folder / "project.yaml").write_text('project: "bad\\e[31m\\0key"\nscenes: [{index: 0, clip: "a\\e.mp4", '
                                         '"colour\\e": 1}]\n')
    status, out, err = cli("--config", config, "projects", "validate", capsys=capsys)
    assert status == 1
    assert_no_raw_control(out + err)
    assert "evil\\x1b[2J\\x07" in out
    assert "scenes[0].colour\\x1b: unknown field" in out

    done = cli("--config", config, "projects", "list", "--json", capsys=capsys)[1]
    assert_no_raw_control(done)
    assert "badkey" in json.loads(done)["invalid"]

    _, log = tick(settings, capsys)
    assert_no_raw_control(log)
    assert "evil\\x1b[2J" in log


# ---------------------------------------------------------------- 7. configuration at load


@pytest.mark.parametrize("section, key_text", [
    ({"events": {"backfill_cron": "not a cron"}}, "events.backfill_cron: not a cron expression"),
    ({"events": {"visitor_recluster_cron": "61 * * * *"}}, "events.visitor_recluster_cron: not a cron expression"),
    ({"continuity": {"weights": {"identity": float("inf")}}}, "continuity.weights.identity: Input should be a finite number"),
    ({"continuity": {"weights": {"adherence": float("nan")}}}, "continuity.weights.adherence: Input should be a finite number"),
    ({"continuity": {"weights": {name: 0 for name in ContinuityWeights.model_fields}}}, "continuity.weights: at least one of"),
])
def test_config_is_validated_at_load(settings_factory, tmp_path, capsys, section, key_text):
    _, config = settings_factory()
    data = yaml.safe_load(config.read_text())
    data.update(section)
    config.write_text(yaml.safe_dump(data))
    for command in (["projects", "list"], ["db", "current"], ["events", "status", "e1"]):
        status, out, err = cli("--config", config, *command, capsys=capsys)
        assert status != 0, (command, out, err)
        assert key_text in err and "Traceback" not in err


def test_config_flag_wins_over_the_environment_for_every_command(settings_factory, tmp_path, capsys, monkeypatch):
    settings, config = settings_factory()
    write_project(settings.storage.projects_root, "fine")
    broken = tmp_path / "broken.yaml"
    broken.write_text("continuity: {weights: {identity: .inf}}\n")
    monkeypatch.setenv("CV_ASSETS_CONFIG", str(broken))
    assert cli("--config", config, "projects", "validate", capsys=capsys)[0] == 0
    status, out, _ = cli("--config", config, "db", "upgrade", capsys=capsys)
    assert status == 0 and str(tmp_path / "app.sqlite") in out
    status, _, err = cli("--config", config, "events", "status", "e1", capsys=capsys)
    assert status == 1 and "e1" in err and "identity" not in err
    monkeypatch.setenv("CV_ASSETS_CONFIG", str(broken))  # (main() exported --config for its own process)
    assert "identity" in cli("projects", "list", capsys=capsys)[2]  # without --config the variable is used


# ---------------------------------------------------------------- 8. absurd clip headers


def test_absurd_y4m_resolution_is_above_the_limit(tmp_path):
    config = settings_yaml(tmp_path)
    settings = load_settings(config, env={})
    root = tmp_path / "projects" / "p1"
    good = write_clip(root / "clips" / "good.mp4", n_frames=10)
    huge = root / "clips" / "huge.y4m"
    huge.write_bytes(b"YUV4MPEG2 W100000 H100000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(4096))
    register_project(AppDatabase(settings.storage.sqlite_url), "p1", root, [good, huge])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["p1"])
    result = materialize([*VIDEO_ASSETS, *VIDEO_CHECKS], partition_key="p1", resources=build_resources(settings),
                         instance=instance)
    assert result.success
    clips = Warehouse(settings.storage.duckdb_path).query("SELECT status, reason FROM clips ORDER BY scene_index")
    assert list(clips.status) == ["ok", "failed"]
    assert "declared resolution 100000x100000 is above the limit 7680x4320 (sampling.max_width/max_height)" in clips.reason[1]
    assert "busy" not in clips.reason[1]


# ---------------------------------------------------------------- 9. unusable stores


def _read_only_sqlite_url(tmp_path: Path) -> str:
    """A location this user cannot write. As root, permission bits do not stop writes; sysfs
    refuses every new file to everyone."""
    if os.geteuid() == 0:
        return "sqlite:////sys/cv_assets_app.sqlite"
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return f"sqlite:///{folder / 'app.sqlite'}"


def test_db_upgrade_on_a_read_only_location_is_one_line(settings_factory, tmp_path):
    _, config = settings_factory(storage={"database_url": _read_only_sqlite_url(tmp_path)})
    done = run_cli("--config", config, "db", "upgrade", timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot migrate the application database") and "writable" in line


def test_corrupt_duckdb_says_so_and_what_to_do(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    path.write_bytes(b"this is not a duckdb file\n" * 100)
    with pytest.raises(Exception) as err:
        Warehouse(path)
    message = str(err.value)
    assert "corrupt or not a DuckDB database" in message
    assert f"mv {path} {path}.broken" in message and "re-materialise" in message


# ---------------------------------------------------------------- run-demo end to end (items 5, 9)


def _demo_config(settings_factory, tmp_path, small_clip):
    settings, config = settings_factory()
    write_project(settings.storage.projects_root, "alpha", clip=small_clip)
    write_project(settings.storage.projects_root, "beta", clip=small_clip)
    events = tmp_path / "events"
    events.mkdir()
    (events / "events.jsonl").write_text("\n".join(
        json.dumps({"id": f"e{i}", "camera_id": "front", "started_at": "2026-01-01T00:00:00+00:00", "label": "person"})
        for i in range(5)) + "\n")
    return settings, config


def test_run_demo_failure_prints_the_failing_step_not_old_figures(settings_factory, tmp_path, small_clip):
    settings, config = settings_factory()
    folder = write_project(settings.storage.projects_root, "alpha", clip=small_clip)
    _register_with_results(settings, folder)  # a previous run's figures: 1 appearance, continuity 8.5
    settings.storage.duckdb_path.write_bytes(b"garbage, not DuckDB\n" * 200)
    done = run_cli("--config", config, "run-demo", env_extra={"DAGSTER_HOME": str(tmp_path / "dagster_home")})
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [l for l in done.stdout.splitlines() if l.startswith("project alpha")]
    assert "FAILED" in line and "appearances" not in line and "8.5" not in line
    assert "step " in line and "corrupt or not a DuckDB database" in line and "move it aside" in line


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_ends_run_demo_and_cancels_the_run_in_flight(settings_factory, tmp_path, small_clip,
                                                                   monkeypatch, signum, status):
    settings, config = _demo_config(settings_factory, tmp_path, small_clip)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CV_ASSETS")}
    child = subprocess.Popen([sys.executable, "-m", "cv_assets.cli", "--config", str(config), "run-demo"], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        instance = DagsterInstance.get()
        deadline = time.monotonic() + 180
        while not [r for r in instance.get_runs() if r.status == DagsterRunStatus.STARTED]:
            assert child.poll() is None and time.monotonic() < deadline, "no run started"
            time.sleep(0.05)
        signalled = time.monotonic()
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == status, out + err
    assert time.monotonic() - signalled < 30
    assert f"run-demo stopped by {signal.Signals(signum).name}" in err and "nothing further was started" in err
    runs = instance.get_runs()
    assert len(runs) == 1, [(r.job_name, r.status) for r in runs]  # beta, the backfill and visitors never started
    assert runs[0].status == DagsterRunStatus.CANCELED and f"run {runs[0].run_id}" in err
    assert AppDatabase(settings.storage.sqlite_url).engine.connect().exec_driver_sql(
        "SELECT count(*) FROM events").scalar() == 0  # the import never started
