"""Scale-out end to end (issue 13, item 5): several OS processes, standing in for pods, run
at once against PostgreSQL (application database), DuckLake (catalog in PostgreSQL, data
files on a shared path) and a PostgreSQL Dagster instance configured like
deploy/dagster.yaml. Each project worker materialises its own project partition through
`project_reprocess_job`; backfill workers run `event_embedding_backfill_job` batch after
batch; one backfill worker is SIGKILLed while it holds a claimed batch.

Afterwards every row equals that of the same work done one step after another on the local
default (SQLite + DuckDB file): clips, sampled frames, frame and region vectors (to 1e-6),
reference vectors, appearances, continuity (scores and history), event vectors and
failures, recurring visitors after the nightly re-grouping. Each event is embedded exactly
once, the killed worker's batch is embedded by another worker, no process met a lock error,
and the instance recorded every run as a success (the killed one stays STARTED)."""

from __future__ import annotations

import json
import multiprocessing
import signal
import time

import pytest
from dagster import DagsterInstance, RunConfig
from test_scale_backfill import vector_rows

from helpers import reliability as h
from helpers import scale_out as so

from cv_assets.defs.events import RecurringVisitorsConfig
from cv_assets.store import AppDatabase

pytest.importorskip("dagster_postgres")
pytest.importorskip("duckdb_extension_ducklake")

N_GOOD = 60
BAD_AT = (25, 47)  # two events whose thumbnail is not an image, among the good ones in time
BATCH = 10  # events.max_batch: the held batch is the 10 oldest events, none of them bad
MAX_ATTEMPTS = 3
BACKFILL_WORKERS = 2  # besides the one that is killed
LOCK_MESSAGES = ("Could not set lock", "Conflicting lock", "database is locked", "LockReentryError",
                 "could not open DuckDB", "deadlock detected", "could not obtain lock")
EVENTS = {"max_batch": BATCH, "max_attempts": MAX_ATTEMPTS}
WAIT_SEC = 120


@pytest.fixture
def scale_databases(pg_server):
    """The DuckLake catalog and the Dagster instance, each a database of its own on the
    session's PostgreSQL (the application database is `postgres_url`)."""
    names = {"lake": so.create_database(pg_server, "lake"), "dagster": so.create_database(pg_server, "dagster")}
    yield names
    for name in names.values():
        so.drop_database(pg_server, name)


def full_recluster(store) -> None:
    """The nightly re-grouping of recurring visitors, in this process."""
    config = RunConfig(ops={"recurring_visitors": RecurringVisitorsConfig(full_recluster=True)})
    job = store.job("recurring_visitors_job")
    assert job.execute_in_process(instance=DagsterInstance.ephemeral(), run_config=config).success


def wait_for_a_stored_batch(ids_logs, kids) -> None:
    deadline = time.monotonic() + WAIT_SEC
    while not any(so.logged_batches(path) for path in ids_logs):
        for kid in kids:
            assert kid.proc.poll() in (None, 0), f"child {kid.pid} exited {kid.proc.returncode}:\n{kid.output()[-6000:]}"
        assert time.monotonic() < deadline, "no backfill worker stored a batch in time"
        time.sleep(0.05)


def test_processes_creating_a_new_ducklake_catalog_at_once_all_attach(pg_server, scale_databases, tmp_path):
    """The first use of a new DuckLake creates its catalog tables; pods starting together
    all do that at once, and all but one used to fail (duplicate key in PostgreSQL's pg_type)."""
    lake = {"path": tmp_path / "unused.duckdb", "ducklake_data_path": str(tmp_path / "lake"),
            "ducklake_catalog_url": f"postgresql://postgres@/{scale_databases['lake']}?host={so.socket_dir(pg_server)}"}
    ctx = multiprocessing.get_context("spawn")
    start, errors = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=so.attach_new_lake, args=(lake, start, errors)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=WAIT_SEC)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    reported = [errors.get(timeout=1) for _ in range(errors.qsize())] if not errors.empty() else []
    assert [p.exitcode for p in procs] == [0, 0, 0], reported


@pytest.mark.slow
def test_workers_on_postgresql_and_ducklake_store_the_rows_of_a_sequential_local_run(
        pg_server, postgres_url, scale_databases, tmp_path, tmp_path_factory):
    demo = so.tiny_demo_source(tmp_path_factory)

    # ---- the same work one step after another, on the local default (SQLite + DuckDB file)
    local = h.make_store(tmp_path / "local", None, events=EVENTS)
    keys = so.write_projects(demo, local.settings.storage.projects_root)
    good, bad = so.add_test_events(AppDatabase(local.settings.storage.database_url), N_GOOD, BAD_AT)
    local_instance = DagsterInstance.ephemeral()
    local_instance.add_dynamic_partitions("projects", keys)
    for key in keys:
        assert local.job().execute_in_process(partition_key=key, instance=local_instance).success
    local_runs = so.backfill_until_done(local.job("event_embedding_backfill_job"), local_instance)
    assert all(r["success"] for r in local_runs) and local_runs[-1]["remaining"] == 0

    # ---- the same inputs at scale
    root = tmp_path / "scale"
    lake_url = f"postgresql://postgres@/{scale_databases['lake']}?host={so.socket_dir(pg_server)}"
    scaled = h.make_store(root, None, storage=so.scale_out_storage(root, postgres_url, lake_url), events=EVENTS)
    assert so.write_projects(demo, scaled.settings.storage.projects_root) == keys
    db = AppDatabase(postgres_url)
    assert so.add_test_events(db, N_GOOD, BAD_AT) == (good, bad)
    home = so.write_postgres_dagster_home(
        tmp_path / "dagster_home",
        f"postgresql+psycopg2://postgres@/{scale_databases['dagster']}?host={so.socket_dir(pg_server)}")
    # The instance's schema is created once, as the deployed webserver/daemon do before any run.
    instance = DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    instance.add_dynamic_partitions("projects", keys)

    go, marker = tmp_path / "go", tmp_path / "held"
    ids_logs = {f"b{i}": tmp_path / f"b{i}.ids" for i in range(BACKFILL_WORKERS)}
    with h.children() as kids:
        # The worker to be killed claims the oldest batch and stops inside it, rows locked,
        # while the others start up and wait for the go.
        holder = so.start_backfill_worker(scaled.config, home, tmp_path / "holder.ids", tmp_path / "holder.log",
                                          hold=marker)
        projects = {key: h.start_project_run(scaled.config, [key], tmp_path / f"project_{key}.log",
                                             dagster_home=home, go_file=go) for key in keys}
        workers = {name: so.start_backfill_worker(scaled.config, home, path, tmp_path / f"{name}.log", go_file=go)
                   for name, path in ids_logs.items()}
        kids += [holder, *projects.values(), *workers.values()]
        h.wait_for_marker(marker, holder, WAIT_SEC)
        claimed = json.loads(marker.with_name(marker.name + ".ids.json").read_text())
        assert claimed == good[:BATCH]
        h.release_together(go, [*projects.values(), *workers.values()], WAIT_SEC)
        # Killed mid-batch once another worker has stored a batch (passing over the held rows).
        wait_for_a_stored_batch(ids_logs.values(), [*projects.values(), *workers.values()])
        before_kill = [i for path in ids_logs.values() for batch in so.logged_batches(path) for i in batch]
        holder.kill()
        assert holder.proc.returncode == -signal.SIGKILL
        project_results = {key: h.assert_child_succeeded(kid, WAIT_SEC) for key, kid in projects.items()}
        worker_results = {name: h.assert_child_succeeded(kid, WAIT_SEC) for name, kid in workers.items()}
        outputs = {f"project {key}": kid.output() for key, kid in projects.items()}
        outputs |= {f"backfill {name}": kid.output() for name, kid in workers.items()}
        outputs["killed backfill"] = holder.output()

    # ---- no lock error reached any process
    for name, output in outputs.items():
        for message in LOCK_MESSAGES:
            assert message not in output, f"{name}: {message!r} in its output:\n{output[-4000:]}"

    # ---- each event embedded exactly once; the killed worker's batch by another worker
    batches = {name: [i for batch in so.logged_batches(path) for i in batch] for name, path in ids_logs.items()}
    stored = [i for ids in batches.values() for i in ids]
    assert sorted(stored) == sorted(good)  # by exactly one worker, once
    assert vector_rows(db) == (len(good), len(good), len(good))  # no vector row ever written twice
    assert not set(claimed) & set(before_kill)  # passed over while held
    assert set(claimed) <= set(stored)  # then embedded by the others
    assert so.logged_batches(tmp_path / "holder.ids") == []
    assert all(batches.values()), f"a backfill worker stored nothing: {batches}"  # the work was shared

    # ---- the instance in PostgreSQL recorded every run
    runs = instance.get_runs()
    project_runs = [r for r in runs if r.job_name == "project_reprocess_job"]
    backfill_runs = [r for r in runs if r.job_name == "event_embedding_backfill_job"]
    assert len(runs) == len(project_runs) + len(backfill_runs)
    assert sorted(r.tags["dagster/partition"] for r in project_runs) == sorted(keys)
    assert {r.run_id for r in project_runs} == {res[0]["run_id"] for res in project_results.values()}
    assert all(r.status.value == "SUCCESS" for r in project_runs)
    worker_run_ids = {line["run_id"] for lines in worker_results.values() for line in lines}
    assert {r.run_id for r in backfill_runs if r.status.value == "SUCCESS"} == worker_run_ids
    assert [r.status.value for r in backfill_runs if r.run_id not in worker_run_ids] == ["STARTED"]  # the killed one
    for run in runs:
        bad_steps = [e for e in instance.all_logs(run.run_id) if e.dagster_event
                     and e.dagster_event.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_FAILURE")]
        assert not bad_steps, (run.job_name, [e.message for e in bad_steps])
    # The project runs overlapped one another, and backfill runs ran beside them.
    records = {r.dagster_run.run_id: r for r in instance.get_run_records()}
    spans = [(records[r.run_id].start_time, records[r.run_id].end_time) for r in project_runs]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the project runs did not overlap: {spans}"
    assert min(records[i].start_time for i in worker_run_ids) < min(e for _, e in spans)
    instance.dispose()

    # ---- every row equals the sequential local run's
    for key in keys:
        got, want = h.snapshot(scaled.settings, key), h.snapshot(local.settings, key)
        h.assert_no_duplicates(got)
        assert h.counts(got) == h.counts(want), key
        assert want["sampled_frames"] and want["appearances"] and want["scenes"], key
        for table in want:
            assert got[table] == want[table], (key, table)
        assert so.continuity_rows(scaled.settings, key) == so.continuity_rows(local.settings, key), key
        assert h.frame_files(scaled.settings, key) == h.frame_files(local.settings, key), key
    # Distinct projects: rows written under another partition's key could not have matched.
    assert len({tuple(h.warehouse_rows(local.settings, key)["frame_embeddings"]) for key in keys}) == len(keys)
    got, want = so.event_rows(postgres_url), so.event_rows(local.settings.storage.database_url)
    assert got == want
    assert len(want["event_embeddings"]) == len(good)
    assert sorted((f[1], f[3]) for f in want["embedding_failures"]) == [(b, MAX_ATTEMPTS) for b in sorted(bad)]
    # Recurring visitors, grouped incrementally by concurrent runs: every embedded event in one
    # group; after the nightly full re-grouping, the same groups as the local run's.
    assert sorted(i for group in so.visitor_groups(postgres_url) for i in group) == sorted(good)
    full_recluster(scaled)
    full_recluster(local)
    assert so.visitor_groups(postgres_url) == so.visitor_groups(local.settings.storage.database_url)
