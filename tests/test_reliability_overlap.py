"""Overlapping runs on one warehouse: two project runs and a backfill of several partitions
(one of them a partition another run is processing at the same moment), all in separate
processes against the same DuckDB file, SQLite file and Dagster instance. No lock error
reaches anyone, and the final rows equal those of the same runs made one after another."""

import pytest
from dagster import DagsterInstance

from helpers import reliability as h
from cv_assets.store import Warehouse

PROJECTS = ("demo", "demo_b", "demo_c")
LOCK_MESSAGES = ("Could not set lock", "Conflicting lock", "database is locked", "LockReentryError", "could not open DuckDB")


@pytest.mark.slow
def test_overlapping_runs_end_with_the_rows_of_sequential_runs(tmp_path, tmp_path_factory):
    demo = h.demo_source(tmp_path_factory)
    shared = h.make_store(tmp_path / "shared", demo, PROJECTS)
    home = h.write_dagster_home(tmp_path / "dagster_home")
    # The instance's own storage is created once, as `dagster dev` does before any run
    # (Dagster's SQLite schema set-up is not safe for several processes at once).
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("projects", list(PROJECTS))

    with h.children() as kids:
        runs = {"run_demo": ["demo"], "run_demo_b": ["demo_b"], "backfill": ["demo", "demo_c"]}
        go = tmp_path / "go"
        for name, keys in runs.items():
            kids.append(h.start_project_run(shared.config, keys, tmp_path / f"{name}.log", dagster_home=home, go_file=go))
        h.release_together(go, kids)
        results = {name: h.assert_child_succeeded(kid) for name, kid in zip(runs, kids)}
        outputs = {name: kid.output() for name, kid in zip(runs, kids)}

    for name, output in outputs.items():
        for message in LOCK_MESSAGES:
            assert message not in output, f"{name}: {message!r} reached the run's log"
    assert [r["partition"] for r in results["backfill"]] == ["demo", "demo_c"]
    assert sorted(r.status.value for r in instance.get_runs()) == ["SUCCESS"] * 4
    # The runs really overlapped, two of them on the same partition.
    records = instance.get_run_records()
    spans = {r.dagster_run.run_id: (r.start_time, r.end_time, r.dagster_run.tags["dagster/partition"]) for r in records}
    firsts = [spans[results[name][0]["run_id"]] for name in runs]
    assert max(s for s, _, _ in firsts) < min(e for _, e, _ in firsts), f"the three runs did not overlap: {firsts}"
    assert [p for _, _, p in firsts] == ["demo", "demo_b", "demo"]
    # No step needed a retry to get there: the store's locks made them wait, not fail.
    for run in instance.get_runs():
        retried = [e for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"]
        assert not retried, [e.message for e in retried]

    # The same partitions, one after another, in a store of their own.
    sequential = h.make_store(tmp_path / "sequential", demo, PROJECTS)
    seq_instance = DagsterInstance.ephemeral()
    seq_instance.add_dynamic_partitions("projects", list(PROJECTS))
    job = sequential.job()
    for key in PROJECTS:
        assert job.execute_in_process(partition_key=key, instance=seq_instance).success

    for key in PROJECTS:
        got, want = h.snapshot(shared.settings, key), h.snapshot(sequential.settings, key)
        h.assert_no_duplicates(got)
        assert h.counts(got) == h.counts(want), key
        assert h.counts(got)["clips"] == 4 and h.counts(got)["frame_embeddings"] == h.counts(got)["sampled_frames"] > 0
        for table in got:
            assert got[table] == want[table], (key, table)
        assert h.frame_files(shared.settings, key) == h.frame_files(sequential.settings, key)
    # The projects differ only by key: each got its own complete copy of the same rows.
    demo_rows = h.warehouse_rows(shared.settings, "demo")
    assert all(h.warehouse_rows(shared.settings, key)["frame_embeddings"] == demo_rows["frame_embeddings"] for key in PROJECTS)
    history = Warehouse(shared.settings.storage.duckdb_path).query(
        "SELECT project, count(*) AS n FROM continuity_history GROUP BY project ORDER BY project")
    assert dict(zip(history["project"], history["n"])) == {"demo": 8, "demo_b": 4, "demo_c": 4}
    leftovers = [p.name for p in shared.settings.storage.frames_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging folders left behind: {leftovers}"
