"""Retries and hangs: a transient store error is retried and the run succeeds; a bad input
fails once, without retry; a hung step is ended by the run's max-runtime tag; a sensor
re-tick after a daemon crash launches no duplicate run."""

import logging
import os
import signal
import time
from datetime import timedelta

import pytest
import yaml
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy.exc import OperationalError

from helpers import reliability as h
from helpers import write_faults as faults
from cv_assets.store import Warehouse
from cv_assets.store.warehouse import WarehouseError

RETRIED_STEP_EVENTS = ["STEP_UP_FOR_RETRY", "STEP_RESTARTED"]


@pytest.fixture
def demo_store(tmp_path, tmp_path_factory):
    store = h.make_store(tmp_path / "store", h.demo_source(tmp_path_factory))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["demo"])
    yield store, instance
    faults.clear()


def test_transient_store_errors_mid_write_are_retried_and_the_run_succeeds(demo_store):
    store, instance = demo_store
    job = store.job()
    clean = job.execute_in_process(partition_key="demo", instance=instance)
    assert clean.success
    before = h.snapshot(store.settings, "demo")

    # Each error fires once, inside the write transaction, right after the DELETE of the
    # project's old rows: the retry must find those rows intact, then replace them.
    faults.fail_next("duckdb:frame_embeddings",
                     WarehouseError("could not open DuckDB warehouse within 60 s: Could not set lock (injected)"))
    faults.fail_next("sqlite:asset_appearances", OperationalError("DELETE", {}, Exception("database is locked (injected)")))
    faults.fail_next("duckdb:clips",
                     WarehouseError("could not open DuckDB warehouse within 60 s: Conflicting lock (injected)"))
    result = job.execute_in_process(partition_key="demo", instance=instance, raise_on_error=False)

    assert result.success
    assert faults.planned_failures("duckdb:frame_embeddings") == 0
    for step in ("video_assets", "frame_embeddings", "asset_appearances"):
        events = h.step_events(result, step)
        assert events.count("STEP_UP_FOR_RETRY") == 1 and events.count("STEP_RESTARTED") == 1, (step, events)
        assert events.count("STEP_SUCCESS") == 1 and "STEP_FAILURE" not in events, (step, events)
    for step in ("project_manifest", "reference_embeddings", "scene_continuity_scores", "project_report"):
        assert not set(RETRIED_STEP_EVENTS) & set(h.step_events(result, step)), step
    after = h.snapshot(store.settings, "demo")
    assert after == before
    assert h.counts(after) == h.counts(before) and h.counts(after)["clips"] == 4
    assert h.counts(after)["frame_embeddings"] == h.counts(after)["sampled_frames"] > 0
    assert h.counts(after)["appearances"] == h.counts(after)["appearance_embeddings"] > 0

    # An error that outlasts the retries fails the step (three attempts in all) and the run;
    # every attempt was rolled back, so the previous rows are all still there.
    lock_error = WarehouseError("could not open DuckDB warehouse within 60 s: Could not set lock (injected)")
    faults.fail_next("duckdb:frame_embeddings", *[lock_error] * 3)
    failed = job.execute_in_process(partition_key="demo", instance=instance, raise_on_error=False)
    assert not failed.success
    events = h.step_events(failed, "frame_embeddings")
    assert (events.count("STEP_UP_FOR_RETRY"), events.count("STEP_FAILURE")) == (2, 1), events
    assert "STEP_START" not in h.step_events(failed, "asset_appearances")  # downstream never started
    assert h.snapshot(store.settings, "demo") == before


def test_every_store_writing_step_of_a_project_run_has_a_retry_policy(demo_store):
    store, _ = demo_store
    job = store.job()
    asset_nodes = [n for n in job.graph.nodes if not n.name.endswith(tuple(c.name for c in store.defs.asset_checks
                                                                           for c in c.check_specs))]
    assert {n.name for n in asset_nodes} >= {"project_manifest", "video_assets", "reference_embeddings", "frame_embeddings",
                                             "asset_appearances", "scene_continuity_scores", "project_report"}
    for node in asset_nodes:
        # Every step writes a store (or the report file) and is retried the same way...
        assert node.definition.retry_policy is not None and node.definition.retry_policy.max_retries >= 1, node.name
        # ...and treats the run's termination as final (see defs/common.stop_on_termination).
        assert getattr(node.definition.compute_fn.decorated_fn, "__wrapped__", None) is not None, node.name


def test_a_broken_manifest_fails_once_without_retry(demo_store):
    store, instance = demo_store
    assert store.job().graph.node_named("project_manifest").definition.retry_policy is not None
    manifest = store.settings.storage.projects_root / "demo" / "project.yaml"
    spec = yaml.safe_load(manifest.read_text())
    spec["scenes"][0]["expected_assets"] = ["CHAR_99"]
    manifest.write_text(yaml.safe_dump(spec, sort_keys=False))

    result = store.job().execute_in_process(partition_key="demo", instance=instance, raise_on_error=False)

    assert not result.success
    events = h.step_events(result, "project_manifest")
    assert events.count("STEP_START") == 1 and events.count("STEP_FAILURE") == 1
    assert not set(RETRIED_STEP_EVENTS) & set(events)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "project.yaml" in message and "CHAR_99" in message
    # Nothing downstream ran, so nothing was written.
    assert h.counts(h.warehouse_rows(store.settings, "demo")) == {
        "clips": 0, "sampled_frames": 0, "frame_embeddings": 0, "appearance_embeddings": 0}


def test_an_unregistered_project_fails_every_partitioned_asset_without_retry(demo_store):
    store, instance = demo_store
    instance.add_dynamic_partitions("projects", ["ghost"])
    from dagster import materialize

    from cv_assets.defs.analysis import asset_appearances
    from cv_assets.defs.video import video_assets

    resources = dict(store.defs.resources)
    for asset_def in (video_assets, asset_appearances):
        result = materialize([asset_def], partition_key="ghost", instance=instance, resources=resources,
                             raise_on_error=False)
        events = h.step_events(result, asset_def.op.name)
        assert not result.success and events.count("STEP_FAILURE") == 1, events
        assert not set(RETRIED_STEP_EVENTS) & set(events), (asset_def.key, events)


def _run_worker_pid(instance, run_id) -> int | None:
    for entry in instance.all_logs(run_id):
        message = entry.message or ""
        if "Started process for run (pid: " in message:
            return int(message.split("pid: ")[1].rstrip(").").strip())
    return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_hung_step_is_ended_by_the_max_runtime_tag(tmp_path, tmp_path_factory, monkeypatch):
    """The production path: a code server (gRPC) loads the definitions, the default run
    launcher starts the run in its own process, the run hangs mid-write, and one pass of
    the run-monitoring daemon (enabled by the repo's dagster.yaml) terminates it."""
    from dagster._core.definitions.selector import JobSubsetSelector
    from dagster._core.storage.tags import PARTITION_NAME_TAG
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

    store_root = tmp_path / "store"
    h.copy_demo(h.demo_source(tmp_path_factory), store_root)
    config = h.write_config(store_root)
    home = h.write_dagster_home(tmp_path / "dagster_home")
    marker = tmp_path / "paused"
    defs_file = h.write_defs_file(tmp_path / "defs_file.py", config)
    # The code server and the run worker it starts inherit this environment.
    monkeypatch.setenv("CV_ASSETS_CONFIG", str(config))
    monkeypatch.setenv("TEST_PAUSE_AT", "duckdb:clips")
    monkeypatch.setenv("TEST_PAUSE_MARKER", str(marker))
    monkeypatch.setenv("TEST_PAUSE_MAX_SEC", "120")
    instance = DagsterInstance.from_config(str(home))
    assert instance.run_monitoring_enabled, "dagster.yaml must enable run_monitoring for max_runtime to be enforced"
    instance.add_dynamic_partitions("projects", ["demo"])
    max_runtime = 2
    worker_pid = None
    target = PythonFileTarget(python_file=str(defs_file), attribute="defs", working_directory=str(tmp_path),
                              location_name="cv_assets")
    try:
        with create_test_daemon_workspace_context(target, instance) as workspace:
            request = workspace.create_request_context()
            location = request.get_code_location("cv_assets")
            repo = next(iter(location.get_repositories().values()))
            remote_job = location.get_job(JobSubsetSelector(
                location_name="cv_assets", repository_name=repo.name, job_name="project_reprocess_job", op_selection=None))
            assert remote_job.run_tags["dagster/max_runtime"] == "7200"
            plan = location.get_execution_plan(remote_job, {}, step_keys_to_execute=None, known_state=None, instance=instance)
            run = instance.create_run(
                job_name=remote_job.name, run_id=None, run_config={}, resolved_op_selection=None,
                step_keys_to_execute=None, status=DagsterRunStatus.NOT_STARTED, op_selection=None, root_run_id=None,
                parent_run_id=None,
                tags={**remote_job.run_tags, PARTITION_NAME_TAG: "demo", "dagster/max_runtime": str(max_runtime)},
                job_snapshot=remote_job.job_snapshot, execution_plan_snapshot=plan.execution_plan_snapshot,
                parent_job_snapshot=remote_job.parent_job_snapshot, remote_job_origin=remote_job.get_remote_origin(),
                job_code_origin=remote_job.get_python_origin(), asset_selection=None, asset_check_selection=None,
                asset_graph=repo.asset_graph,
            )
            instance.launch_run(run.run_id, request)
            deadline = time.monotonic() + h.CHILD_TIMEOUT_SEC
            while not marker.exists():
                assert time.monotonic() < deadline, "the run never reached its pause point"
                assert not instance.get_run_by_id(run.run_id).is_finished, list(instance.all_logs(run.run_id))[-5:]
                time.sleep(0.1)
            worker_pid = _run_worker_pid(instance, run.run_id)
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
            started = instance.get_run_record_by_id(run.run_id).start_time
            time.sleep(max(0.0, started + max_runtime + 0.5 - time.time()))

            for _ in execute_run_monitoring_iteration(workspace, logging.getLogger("run-monitoring")):
                pass

            # The worker is interrupted inside the hung step and exits by itself.
            deadline = time.monotonic() + 60
            while _alive(worker_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(worker_pid), "the run worker kept running after termination:\n" + "\n".join(
                f"{e.dagster_event.event_type_value if e.dagster_event else ''} {e.message[:200]}" for e in instance.all_logs(run.run_id))
            final = instance.get_run_by_id(run.run_id)
            logs = [(e.dagster_event.event_type_value if e.dagster_event else None, e.message or "")
                    for e in instance.all_logs(run.run_id)]
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)

    assert final.status == DagsterRunStatus.FAILURE
    assert ("PIPELINE_CANCELING", f"Canceling due to exceeding maximum runtime of {max_runtime} seconds.") in logs
    assert ("PIPELINE_FAILURE", f"Exceeded maximum runtime of {max_runtime} seconds.") in logs
    assert any(kind == "STEP_FAILURE" and '"video_assets"' in msg for kind, msg in logs)
    # The interrupt is final: the step's RetryPolicy must not start it again.
    assert not [kind for kind, _ in logs if kind in RETRIED_STEP_EVENTS]
    # The hung write was rolled back: no half partition, and no lock left behind.
    wh = Warehouse(store_root / "warehouse.duckdb", open_timeout_sec=5)
    assert wh.count("clips", "demo") == 0


@pytest.mark.slow
def test_a_sensor_retick_after_a_daemon_crash_launches_no_duplicate_run(tmp_path, tmp_path_factory):
    """The sensor daemon dies (SIGKILL) right after creating the first run of a tick; a
    restarted daemon resumes the tick, dies again (an error) right after submitting, and a
    third start finishes it. Each manifest hash gets exactly one run, every one submitted."""
    from dagster._core.scheduler.instigation import TickStatus
    from dagster._core.test_utils import freeze_time
    from dagster._time import get_current_datetime

    from cv_assets.events.backfill import embedder_fingerprint
    from cv_assets.manifest import load_manifest
    from cv_assets.settings import load_settings

    store_root = tmp_path / "store"
    h.copy_demo(h.demo_source(tmp_path_factory), store_root, ("demo", "demo_b"))
    config = h.write_config(store_root)
    home = h.write_dagster_home(tmp_path / "dagster_home")
    defs_file = h.write_defs_file(tmp_path / "defs_file.py", config)
    projects = store_root / "projects"
    model = embedder_fingerprint(load_settings(config).embedder)
    run_keys = {key: f"{key}:{load_manifest(projects / key).content_hash}:{model}" for key in ("demo", "demo_b")}

    with h.children() as kids:
        kids.append(h.start_child([str(h.HERE), "sensor-tick", str(defs_file), "--crash-at", "RUN_CREATED"],
                                  h.child_env(config, DAGSTER_HOME=str(home)), tmp_path / "daemon.log"))
        code = kids[0].wait()
    assert code == -signal.SIGKILL, kids[0].output()[-3000:]

    instance = DagsterInstance.from_config(str(home))

    def runs_for(key):
        return instance.get_runs(filters=RunsFilter(tags={"dagster/run_key": run_keys[key]}))

    created = instance.get_runs()
    assert len(created) == 1 and created[0].status == DagsterRunStatus.NOT_STARTED  # created, never submitted
    assert set(instance.get_dynamic_partitions("projects")) == {"demo", "demo_b"}

    start = get_current_datetime()
    for step, crash in enumerate([("RUN_LAUNCHED", RuntimeError("daemon crashed (injected)")), (None, None), (None, None)]):
        # Each pass is a daemon restart: a fresh workspace, past the sensor's minimum interval.
        with freeze_time(start + timedelta(seconds=40 * (step + 1))):
            with h.in_process_workspace(defs_file, instance) as workspace:
                h.sensor_iteration(workspace, *crash)

    for key in ("demo", "demo_b"):
        runs = runs_for(key)
        assert len(runs) == 1, (key, [r.run_id for r in runs])
        assert runs[0].status == DagsterRunStatus.QUEUED  # submitted to the queue exactly once
        assert runs[0].tags["dagster/partition"] == key
    assert len(instance.get_runs()) == 2
    ticks = instance.get_ticks(instance.all_instigator_state()[0].instigator_origin_id,
                               instance.all_instigator_state()[0].selector_id)
    # Newest first: both run keys had runs; the retried tick submitted demo_b only; the
    # crashed tick, resumed and crashed again.
    assert [t.status for t in ticks] == [TickStatus.SKIPPED, TickStatus.SUCCESS, TickStatus.FAILURE]
    assert ticks[1].run_ids == [runs_for("demo_b")[0].run_id]

    # An edited manifest is a new run key: exactly one new run.
    manifest = projects / "demo" / "project.yaml"
    manifest.write_text(manifest.read_text().replace("name: ", "name: Edited ", 1))
    with freeze_time(start + timedelta(seconds=200)):
        with h.in_process_workspace(defs_file, instance) as workspace:
            h.sensor_iteration(workspace)
    assert len(instance.get_runs()) == 3
    assert len(runs_for("demo")) == 1 and len(runs_for("demo_b")) == 1
