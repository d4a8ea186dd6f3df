"""Every step stands on its own: the demo project gives the same rows whether its steps
run in one process or each in its own (the multiprocess executor), because each step
reads only what the step before persisted."""

import os

from dagster import DagsterInstance, execute_job, reconstructable

from cv_assets.definitions import project_job_from_env
from helpers.reliability import demo_source, make_store, snapshot

ASSET_STEPS = ["project_manifest", "video_assets", "reference_embeddings", "frame_embeddings", "asset_appearances",
               "scene_continuity_scores", "project_report"]


def test_in_process_and_multiprocess_executors_give_the_same_rows(tmp_path, tmp_path_factory, monkeypatch):
    demo = demo_source(tmp_path_factory)
    one = make_store(tmp_path / "in_process", demo)
    many = make_store(tmp_path / "multiprocess", demo, runs={"executor": "multiprocess"})
    for store in (one, many):
        (store.root / "dagster_home").mkdir()
        store.instance = DagsterInstance.local_temp(str(store.root / "dagster_home"))
        store.instance.add_dynamic_partitions("projects", ["demo"])

    assert one.job().execute_in_process(partition_key="demo", instance=one.instance).success

    monkeypatch.setenv("CV_ASSETS_CONFIG", str(many.config))
    # The asset steps only (the checks read, they write nothing): each process costs an interpreter start.
    result = execute_job(reconstructable(project_job_from_env), instance=many.instance, tags={"dagster/partition": "demo"},
                         op_selection=ASSET_STEPS)
    assert result.success
    # Each step ran in a process of its own.
    step_pids = {e.pid for e in result.all_events if e.step_key and e.event_type_value == "STEP_START"}
    assert len(step_pids) == len(ASSET_STEPS) and os.getpid() not in step_pids

    expected, actual = snapshot(one.settings, "demo"), snapshot(many.settings, "demo")
    assert {t: len(rows) for t, rows in actual.items()} == {t: len(rows) for t, rows in expected.items()}
    assert len(expected["sampled_frames"]) > 0 and len(expected["appearances"]) > 0
    for table in expected:
        assert actual[table] == expected[table], f"{table} differs between executors"
