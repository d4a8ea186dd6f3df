"""A project run killed (SIGKILL) in the middle of a write: both databases still open, every
partition holds its previous complete rows or none (never part of a set), no lock is left
behind, and a re-run writes every expected row exactly once."""

import hashlib
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import text

from helpers import reliability as h
from cv_assets.store import AppDatabase, Warehouse

EMPTY_ANALYSIS = {"frame_embeddings": 0, "appearance_embeddings": 0, "appearances": 0}


def _kill_at(store: h.Store, pause_at: str, tmp_path: Path, name: str) -> int:
    """Start a project run in a child process, wait until it is paused mid-transaction at
    `pause_at`, then SIGKILL it. Returns the child's pid."""
    marker = tmp_path / f"{name}.paused"
    with h.children() as kids:
        child = h.start_project_run(store.config, ["demo"], tmp_path / f"{name}.log", pause_at=pause_at, marker=marker)
        kids.append(child)
        pid = h.wait_for_marker(marker, child)
        assert pid == child.pid
        child.kill()
    assert child.proc.returncode == -9
    return pid


def _stores_open_without_waiting(store: h.Store) -> None:
    """Both databases open and accept a write at once: nothing holds a stale lock."""
    wh = Warehouse(store.settings.storage.duckdb_path, open_timeout_sec=2)
    with wh.transaction() as con:
        con.execute("SELECT count(*) FROM frame_embeddings").fetchone()
    db = AppDatabase(store.settings.storage.sqlite_url)
    with db.write() as session:
        assert session.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
    db.dispose()


def _frame_file_digests(store: h.Store) -> dict[str, str]:
    """The digest of every frame file the project's rows point to."""
    rows = Warehouse(store.settings.storage.duckdb_path).query("SELECT image_path FROM sampled_frames WHERE project = 'demo'")
    return {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in sorted(rows.image_path)}


def _frame_files_match_rows(store: h.Store, snap: dict) -> None:
    on_disk = h.frame_files(store.settings, "demo")
    in_rows = sorted(str(Path(row[5]).relative_to("demo")) for row in snap["sampled_frames"])
    assert on_disk == in_rows


@pytest.mark.slow
def test_killed_runs_leave_whole_partitions_and_a_rerun_completes(tmp_path, tmp_path_factory):
    store = h.make_store(tmp_path / "store", h.demo_source(tmp_path_factory))

    # 1. The very first run dies while replacing frame_embeddings (its DELETE done, its
    #    INSERT not): the assets before it are complete, frame_embeddings has no rows.
    _kill_at(store, "duckdb:frame_embeddings", tmp_path, "first")
    _stores_open_without_waiting(store)
    after_first = h.snapshot(store.settings, "demo")
    counts = h.counts(after_first)
    assert counts["clips"] == 4 and all(row[10] == "ok" for row in after_first["clips"])
    assert 4 * 3 <= counts["sampled_frames"] <= 4 * 8
    assert {k: counts[k] for k in EMPTY_ANALYSIS} == EMPTY_ANALYSIS
    assert {row[0] for row in after_first["sampled_frames"]} == {0, 1, 2, 3}
    _frame_files_match_rows(store, after_first)

    # 2. A re-run (another process: this one) completes and writes every row once.
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("projects", ["demo"])
    assert store.job().execute_in_process(partition_key="demo", instance=instance).success
    complete = h.snapshot(store.settings, "demo")
    h.assert_no_duplicates(complete)
    full = h.counts(complete)
    assert full["clips"] == 4 and full["sampled_frames"] == counts["sampled_frames"]
    assert full["frame_embeddings"] == full["sampled_frames"]
    assert {r[:2] for r in complete["frame_embeddings"]} == {r[:2] for r in complete["sampled_frames"]}
    assert full["appearances"] == full["appearance_embeddings"] > 0
    assert full["assets"] == 4 and all(version for _, version, _ in complete["assets"])
    assert full["scenes"] == 4 and all(score is not None for _, score in complete["scenes"])

    # 3. A run dies inside the SQLite transaction that replaces the appearances: the
    #    previous complete set is still there (not none, not part).
    _kill_at(store, "sqlite:asset_appearances", tmp_path, "sqlite")
    _stores_open_without_waiting(store)
    assert h.snapshot(store.settings, "demo") == complete

    # 4. A clip changes, and the run that re-samples it dies inside the DuckDB transaction
    #    replacing clips and sampled_frames: the previous rows are all there, and so are the
    #    frame files they point to (the new frames went to a folder of their own).
    files_before = _frame_file_digests(store)
    clips = store.settings.storage.projects_root / "demo" / "clips"
    (clips / "scene_00.mp4").write_bytes((clips / "scene_01.mp4").read_bytes())
    _kill_at(store, "duckdb:sampled_frames", tmp_path, "frames")
    _stores_open_without_waiting(store)
    assert h.snapshot(store.settings, "demo") == complete
    assert _frame_file_digests(store) == files_before

    # 5. The re-run leaves exactly the rows of a complete run of the new clips, each once.
    assert store.job().execute_in_process(partition_key="demo", instance=instance).success
    final = h.snapshot(store.settings, "demo")
    h.assert_no_duplicates(final)
    _frame_files_match_rows(store, final)
    assert h.counts(final)["clips"] == 4
    assert {r[:2] for r in final["frame_embeddings"]} == {r[:2] for r in final["sampled_frames"]}
    frames_of = lambda snap, scene: [r[1:] for r in snap["sampled_frames"] if r[0] == scene]
    assert [r[:-4] + r[-1:] for r in frames_of(final, 0)] == [r[:-4] + r[-1:] for r in frames_of(final, 1)]
    assert frames_of(final, 0) != frames_of(complete, 0)
    assert [r for r in final["sampled_frames"] if r[0] != 0] == [r for r in complete["sampled_frames"] if r[0] != 0]
    history = Warehouse(store.settings.storage.duckdb_path).query(
        "SELECT run_id, count(*) AS n FROM continuity_history WHERE project = 'demo' GROUP BY run_id")
    # Only the two runs that finished appended history, one row per scene each.
    assert sorted(history["n"].tolist()) == [4, 4]
