"""Shared by the reliability tests: a temp store holding the demo project, project runs
in child processes that can be paused mid-write and killed, and row snapshots that let
two stores be compared.

Also a small command line the tests start as a child process (always with a timeout):

    python tests/helpers/reliability.py run-project CONFIG KEY [KEY ...] [--tags JSON]

runs `project_reprocess_job` for each KEY in turn (a backfill when there are several),
against DAGSTER_HOME's instance when it is set, and prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

if __package__ in (None, ""):  # run as a child-process script: make `helpers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import write_faults  # noqa: E402

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DAGSTER_YAML = REPO / "dagster.yaml"
# Demo scenes this long keep every scripted feature and a run short.
DEMO_SCENE_SECONDS = 3.0
DEMO_EVENTS = 30
CHILD_TIMEOUT_SEC = 240


# ------------------------------------------------------------------ stores and configs

_demo_cache: dict[str, Path] = {}


def demo_source(tmp_path_factory) -> Path:
    """The demo data, written once per test session; tests copy what they need from it."""
    if "root" not in _demo_cache:
        from cv_assets.demo import write_demo_data

        root = tmp_path_factory.mktemp("demo_source")
        write_demo_data(root, scene_seconds=DEMO_SCENE_SECONDS, n_events=DEMO_EVENTS)
        _demo_cache["root"] = root
    return _demo_cache["root"]


@dataclass
class Store:
    """One complete temp store: config, settings and Definitions built from them."""

    root: Path
    config: Path
    settings: object
    defs: object

    def job(self, name: str = "project_reprocess_job"):
        return self.defs.resolve_job_def(name)


def make_store(root: Path, demo_root: Path | None, keys: tuple[str, ...] = ("demo",), **config) -> Store:
    from cv_assets.definitions import build_definitions
    from cv_assets.settings import load_settings

    if demo_root is not None:
        copy_demo(demo_root, root, keys)
    path = write_config(root, **config)
    settings = load_settings(path, env={})
    return Store(root, path, settings, build_definitions(settings))


def step_events(result, step_key: str) -> list[str]:
    """The event types of one step in a run result, in order."""
    return [e.event_type_value for e in result.all_events if e.step_key == step_key]


def storage_section(root: Path) -> dict:
    return {
        "sqlite_url": f"sqlite:///{root / 'app.sqlite'}",
        "duckdb_path": str(root / "warehouse.duckdb"),
        "frames_dir": str(root / "frames"),
        "reports_dir": str(root / "reports"),
        "projects_root": str(root / "projects"),
        "thumbnails_root": str(root / "thumbnails"),
    }


def histogram_embedder(root: Path) -> dict:
    # No CLIP weights on CI machines: the explicit, separately versioned fallback.
    return {"model": str(root / "no-such-model"), "fallback": "color_histogram", "device": "cpu"}


def write_config(root: Path, *, embedder: dict | None = None, **sections) -> Path:
    """config.yaml in `root` with every store inside `root`; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"storage": storage_section(root), "embedder": embedder or histogram_embedder(root), **sections}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def copy_demo(demo_root: Path, root: Path, keys: tuple[str, ...] = ("demo",)) -> None:
    """The demo project (written once per session under `demo_root`) under each key in
    `root/projects`, with `project:` in each copy's project.yaml set to its key."""
    source = demo_root / "projects" / "demo"
    for key in keys:
        target = root / "projects" / key
        shutil.copytree(source, target)
        manifest_path = target / "project.yaml"
        manifest = yaml.safe_load(manifest_path.read_text())
        manifest["project"] = key
        manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    thumbnails = demo_root / "thumbnails"
    if thumbnails.is_dir() and not (root / "thumbnails").exists():
        shutil.copytree(thumbnails, root / "thumbnails")


def write_dagster_home(path: Path, extra: dict | None = None) -> Path:
    """A persistent Dagster instance directory using the repo's dagster.yaml (plus `extra`)."""
    path.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(DAGSTER_YAML.read_text()) or {}
    config.update(extra or {})
    (path / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------ child processes


def child_env(config: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CV_ASSETS_", "DAGSTER_HOME"))}
    env["CV_ASSETS_CONFIG"] = str(config)  # module-level loads read this config, not the repo's
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Child:
    """A child process whose output goes to a file (never a pipe that could fill up)."""

    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def results(self) -> list[dict]:
        """The JSON result lines printed by `run-project`."""
        lines = [line[len("RESULT "):] for line in self.output().splitlines() if line.startswith("RESULT ")]
        return [json.loads(line) for line in lines]

    def wait(self, timeout: float = CHILD_TIMEOUT_SEC) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"child {self.pid} ran past {timeout:g} s; output:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL, no clean-up in the child: what a crash or an OOM kill does."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def start_child(args: list[str], env: dict[str, str], log_path: Path) -> Child:
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen([sys.executable, *args], env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    return Child(proc, log_path)


def start_project_run(
    config: Path,
    keys: list[str] | tuple[str, ...],
    log_path: Path,
    *,
    pause_at: str | None = None,
    marker: Path | None = None,
    dagster_home: Path | None = None,
    tags: dict[str, str] | None = None,
    go_file: Path | None = None,
) -> Child:
    extra = {}
    if pause_at:
        extra |= {"TEST_PAUSE_AT": pause_at, "TEST_PAUSE_MARKER": str(marker), "TEST_PAUSE_MAX_SEC": "180"}
    if dagster_home:
        extra["DAGSTER_HOME"] = str(dagster_home)
    args = [str(HERE), "run-project", str(config), *keys]
    if tags:
        args += ["--tags", json.dumps(tags)]
    if go_file:
        args += ["--go", str(go_file)]
    return start_child(args, child_env(config, **extra), log_path)


def release_together(go_file: Path, kids: list[Child], timeout: float = CHILD_TIMEOUT_SEC) -> None:
    """Wait until every child started with `go_file` is ready (imports done, instance open),
    then let them all go at once."""
    deadline = time.monotonic() + timeout
    while not all(_ready_marker(go_file, kid.pid).exists() for kid in kids):
        for kid in kids:
            if kid.proc.poll() is not None:
                raise AssertionError(f"child {kid.pid} exited ({kid.proc.returncode}) before it was ready:\n{kid.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("children were not ready in time")
        time.sleep(0.05)
    go_file.touch()


def _ready_marker(go_file: Path, pid: int) -> Path:
    return go_file.with_name(f"{go_file.name}.ready.{pid}")


def _wait_for_go(go_file: str | None) -> None:
    if not go_file:
        return
    _ready_marker(Path(go_file), os.getpid()).touch()
    deadline = time.monotonic() + CHILD_TIMEOUT_SEC
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            raise SystemExit("never got the go signal")
        time.sleep(0.01)


@contextmanager
def children() -> Iterator[list[Child]]:
    """A list to put children in; every one still running is killed on the way out."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.kill()


def wait_for_marker(marker: Path, child: Child, timeout: float = CHILD_TIMEOUT_SEC) -> int:
    """Wait until the child reached its pause point (it wrote its pid to `marker`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            return int(marker.read_text())
        if child.proc.poll() is not None:
            raise AssertionError(
                f"child {child.pid} exited ({child.proc.returncode}) before its pause point; output:\n{child.output()[-4000:]}"
            )
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"child {child.pid} did not reach its pause point in {timeout:g} s:\n{child.output()[-4000:]}")


def assert_child_succeeded(child: Child, timeout: float = CHILD_TIMEOUT_SEC) -> list[dict]:
    code = child.wait(timeout)
    out = child.output()
    assert code == 0, f"child exited {code}:\n{out[-6000:]}"
    results = child.results()
    assert results and all(r["success"] for r in results), out[-6000:]
    return results


# ------------------------------------------------------------------ Dagster daemons, driven by hand


def write_defs_file(path: Path, config: Path) -> Path:
    """A code location file, as `dagster dev -f` would load it, for this config."""
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE.parents[1])!r})\n"
        "from helpers import write_faults\n"
        "from cv_assets.definitions import build_definitions\n"
        "from cv_assets.settings import load_settings\n"
        "write_faults.pause_from_environment()  # a test may pause a write in the run's process\n"
        f"defs = build_definitions(load_settings({str(config)!r}))\n"
    )
    return path


@contextmanager
def in_process_workspace(defs_file: Path, instance):
    """The daemon's view of the code location, loaded in this process (no gRPC server)."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, python_file=str(defs_file), attribute="defs",
                             working_directory=str(defs_file.parent)),
        location_name="cv_assets",
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as context:
        yield context


def sensor_iteration(workspace, crash_at: str | None = None, crash_with=None) -> None:
    """One pass of the sensor daemon (every running sensor ticks once). `crash_at` names a
    point of Dagster's own crash hooks (RUN_CREATED, RUN_LAUNCHED, ...) where the daemon
    dies: `crash_with` is a signal number (a real crash) or an exception."""
    import logging

    from dagster._daemon.sensor import execute_sensor_iteration

    flags = {"project_sensor": {crash_at: crash_with}} if crash_at else None
    for _ in execute_sensor_iteration(workspace, logging.getLogger("sensor-daemon"), None, None,
                                      debug_crash_flags=flags):
        pass


# ------------------------------------------------------------------ snapshots of stored rows


def _vector_digest(vector) -> str:
    """Vectors compare by their float32 bytes rounded to 1e-6 (the same input gives the
    same vector; a different one never matches)."""
    values = np.round(np.asarray(vector, dtype=np.float32), 6)
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


def _relative(path, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _frame_file(path, frames_dir: Path) -> str | None:
    """A frame file's path below its project's version folder (`<project>/v-<run>/...`):
    the version differs from run to run, the rest must not."""
    relative = _relative(path, frames_dir)
    parts = Path(relative).parts if relative else ()
    return str(Path(parts[0], *parts[2:])) if len(parts) > 2 and parts[1].startswith("v-") else relative


def warehouse_rows(settings, project: str) -> dict[str, list[tuple]]:
    """The project's rows in each warehouse table, without run-specific columns (timings,
    timestamps) and with paths relative to their store, sorted."""
    from cv_assets.store import Warehouse

    wh = Warehouse.from_settings(settings.storage)  # the DuckDB file, or the DuckLake at scale
    storage = settings.storage
    clips = wh.query(
        "SELECT scene_index, path, size_bytes, codec, width, height, fps, declared_frames, decoded_frames, "
        "duration_sec, status, reason, content_hash FROM clips WHERE project = ?", [project])
    frames = wh.query(
        "SELECT scene_index, frame_index, timestamp_sec, reasons, motion_score, image_path, width, height, content_hash "
        "FROM sampled_frames WHERE project = ?", [project])
    vectors = wh.query(
        "SELECT scene_index, frame_index, content_hash, model_version, embedding FROM frame_embeddings WHERE project = ?",
        [project])
    regions = wh.query(
        "SELECT scene_index, frame_index, asset_code, model_version, confidence, embedding "
        "FROM appearance_embeddings WHERE project = ?", [project])
    return {
        "clips": sorted(
            (int(r.scene_index), _relative(r.path, storage.projects_root), r.size_bytes, r.codec, r.width, r.height,
             round(float(r.fps), 6) if r.fps is not None else None, r.declared_frames, r.decoded_frames,
             round(float(r.duration_sec), 6) if r.duration_sec is not None else None, r.status, r.reason, r.content_hash)
            for r in clips.itertuples(index=False)
        ),
        "sampled_frames": sorted(
            (int(r.scene_index), int(r.frame_index), round(float(r.timestamp_sec), 6), tuple(r.reasons),
             None if r.motion_score is None or r.motion_score != r.motion_score else round(float(r.motion_score), 6),
             _frame_file(r.image_path, storage.frames_dir), r.width, r.height, r.content_hash)
            for r in frames.itertuples(index=False)
        ),
        "frame_embeddings": sorted(
            (int(r.scene_index), int(r.frame_index), r.content_hash, r.model_version, _vector_digest(r.embedding))
            for r in vectors.itertuples(index=False)
        ),
        "appearance_embeddings": sorted(
            (int(r.scene_index), int(r.frame_index), r.asset_code, r.model_version, round(float(r.confidence), 6),
             _vector_digest(r.embedding))
            for r in regions.itertuples(index=False)
        ),
    }


def app_rows(settings, project: str) -> dict[str, list[tuple]]:
    """The project's rows in the SQLite application tables, sorted, comparable across stores."""
    from sqlalchemy import select

    from cv_assets.store import AppDatabase
    from cv_assets.store.models import Asset, AssetAppearance, Project, SceneManifest

    db = AppDatabase(settings.storage.sqlite_url)
    with db.read() as session:
        project_id = session.scalar(select(Project.id).where(Project.key == project))
        if project_id is None:
            return {"assets": [], "scenes": [], "appearances": []}
        assets = session.execute(
            select(Asset.code, Asset.embedding_model_version, Asset.clip_embedding).where(Asset.project_id == project_id)
        ).all()
        scenes = session.execute(
            select(SceneManifest.scene_index, SceneManifest.continuity_score).where(SceneManifest.project_id == project_id)
        ).all()
        appearances = session.execute(
            select(Asset.code, AssetAppearance.scene_index, AssetAppearance.frame_index, AssetAppearance.timestamp_sec,
                   AssetAppearance.bbox, AssetAppearance.confidence, AssetAppearance.source)
            .join(Asset, Asset.id == AssetAppearance.asset_id)
            .where(AssetAppearance.project_id == project_id)
        ).all()
    db.dispose()
    return {
        "assets": sorted(
            (code, version, None if blob is None else _vector_digest(np.frombuffer(blob, np.float32)))
            for code, version, blob in assets
        ),
        "scenes": sorted((i, None if s is None else round(s, 6)) for i, s in scenes),
        "appearances": sorted(
            (code, s, f, round(t, 6), bbox, round(c, 6), src) for code, s, f, t, bbox, c, src in appearances
        ),
    }


def snapshot(settings, project: str) -> dict[str, list[tuple]]:
    return warehouse_rows(settings, project) | app_rows(settings, project)


def counts(snap: dict[str, list]) -> dict[str, int]:
    return {table: len(rows) for table, rows in snap.items()}


def assert_no_duplicates(snap: dict[str, list]) -> None:
    for table, rows in snap.items():
        assert len(rows) == len(set(rows)), f"{table} holds duplicate rows"


def frame_files(settings, project: str) -> list[str]:
    """The project's frame files, each below its version folder (all versions together)."""
    folder = settings.storage.frames_dir / project
    return sorted(str(Path(*p.relative_to(folder).parts[1:])) for p in folder.rglob("*.png")) if folder.is_dir() else []


# ------------------------------------------------------------------ command line for children


def _run_project(config: str, keys: list[str], tags: dict[str, str], go_file: str | None = None) -> int:
    from dagster import DagsterInstance

    from cv_assets.definitions import build_definitions
    from cv_assets.settings import load_settings

    write_faults.pause_from_environment()
    settings = load_settings(config)
    defs = build_definitions(settings)
    job = defs.resolve_job_def("project_reprocess_job")
    instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
    _wait_for_go(go_file)
    failed = 0
    for key in keys:
        if not instance.has_dynamic_partition("projects", key):
            instance.add_dynamic_partitions("projects", [key])
        started = time.perf_counter()
        result = job.execute_in_process(partition_key=key, instance=instance, tags=tags, raise_on_error=False)
        failed += not result.success
        errors = [str(e.event_specific_data.error.message)[:2000] for e in result.all_events
                  if e.event_type_value == "STEP_FAILURE"]
        line = {"partition": key, "success": result.success, "run_id": result.run_id,
                "seconds": round(time.perf_counter() - started, 2), "errors": errors}
        print("RESULT " + json.dumps(line), flush=True)
    return 1 if failed else 0


def _sensor_tick(defs_file: str, crash_at: str | None) -> int:
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    with in_process_workspace(Path(defs_file), instance) as workspace:
        sensor_iteration(workspace, crash_at, signal.SIGKILL if crash_at else None)
    print("RESULT " + json.dumps({"success": True}), flush=True)
    return 0


SHARED_FAILURES = [f"shared-{i}" for i in range(8)]  # every writer records a failure of these
SQLITE_TEST_VERSION = "concurrency-test-v1"


def _sqlite_writer(url: str, worker: int, iterations: int, go_file: str) -> int:
    """One of several processes hammering the app database at once: read-then-write
    failure counters on shared rows, new embedding rows, and plain reads."""
    from sqlalchemy import func, select

    from cv_assets.events.backfill import record_event_failures, write_event_embeddings
    from cv_assets.store.failures import record_failures
    from cv_assets.store import AppDatabase
    from cv_assets.store.models import EventEmbedding

    db = AppDatabase(url)
    rng = np.random.default_rng(worker)
    errors: list[str] = []
    _wait_for_go(go_file)  # start together, so the writes really collide
    started = time.perf_counter()
    for k in range(iterations):
        steps = [
            lambda s: record_event_failures(s, SQLITE_TEST_VERSION, {e: f"event {e}: worker {worker} pass {k}" for e in SHARED_FAILURES}),
            lambda s: write_event_embeddings(s, SQLITE_TEST_VERSION, {f"w{worker}-{k}": rng.normal(size=512).astype(np.float32)}),
            lambda s: record_failures(s, "frame", SQLITE_TEST_VERSION, {f"demo/0/{i}": f"worker {worker}" for i in range(4)}),
        ]
        for step in steps:
            try:
                with db.write() as session:
                    step(session)
            except Exception as exc:  # counted and reported: the test wants zero
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        try:
            with db.read() as session:
                session.scalar(select(func.count()).select_from(EventEmbedding))
        except Exception as exc:
            errors.append(f"read: {type(exc).__name__}: {exc}"[:300])
    print("RESULT " + json.dumps({"success": not errors, "worker": worker, "errors": errors,
                                  "seconds": round(time.perf_counter() - started, 2)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability_helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-project")
    run.add_argument("config")
    run.add_argument("keys", nargs="+")
    run.add_argument("--tags", default="{}")
    run.add_argument("--go", default=None, help="wait for this file to exist before the first run")
    tick = sub.add_parser("sensor-tick", help="one sensor daemon iteration against DAGSTER_HOME")
    tick.add_argument("defs_file")
    tick.add_argument("--crash-at", default=None, help="SIGKILL this process at this Dagster crash point")
    writer = sub.add_parser("sqlite-writer", help="concurrent app-database writes")
    writer.add_argument("url")
    writer.add_argument("worker", type=int)
    writer.add_argument("iterations", type=int)
    writer.add_argument("go_file")
    args = parser.parse_args(argv)
    if args.command == "sqlite-writer":
        return _sqlite_writer(args.url, args.worker, args.iterations, args.go_file)
    if args.command == "run-project":
        return _run_project(args.config, args.keys, json.loads(args.tags), args.go)
    if args.command == "sensor-tick":
        return _sensor_tick(args.defs_file, args.crash_at)
    return 2


if __name__ == "__main__":
    sys.exit(main())
