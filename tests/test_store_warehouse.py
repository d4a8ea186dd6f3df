"""The DuckDB warehouse: partition replace, atomicity, vector type, cross-process writes."""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from cv_assets.store.warehouse import EMBEDDING_DIM, Warehouse, WarehouseError

JOIN_TIMEOUT_SEC = 60


def clips_frame(project: str, n: int, generation: str = "g0") -> pd.DataFrame:
    """`n` clip rows of one project; `path` carries the generation that wrote them."""
    return pd.DataFrame({
        "project": [project] * n,
        "scene_index": list(range(n)),
        "path": [f"{generation}/scene_{i:02d}.mp4" for i in range(n)],
        "width": [320] * n,
        "height": [180] * n,
        "fps": [24.0] * n,
        "status": ["ok"] * n,
    })


def embeddings_frame(project: str, vectors: list, model_version: str = "clip-test") -> pd.DataFrame:
    n = len(vectors)
    return pd.DataFrame({
        "project": [project] * n,
        "scene_index": [0] * n,
        "frame_index": list(range(n)),
        "content_hash": [f"h{i}" for i in range(n)],
        "model_version": [model_version] * n,
        "embedding": vectors,
    })


def history_row(project: str, scene_index: int, score: float) -> pd.DataFrame:
    return pd.DataFrame({"project": [project], "scene_index": [scene_index], "run_id": ["r"], "score": [score]})


def paths_by_project(wh: Warehouse, table: str = "clips") -> dict[str, list[str]]:
    df = wh.query(f"SELECT project, path FROM {table} ORDER BY project, scene_index")
    return {p: list(g["path"]) for p, g in df.groupby("project")}


@pytest.fixture()
def wh(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.duckdb", open_timeout_sec=5.0)


# --- schema -------------------------------------------------------------------------


def test_new_file_has_every_table(wh):
    tables = set(wh.query("SELECT table_name FROM information_schema.tables")["table_name"])
    assert {"clips", "sampled_frames", "frame_embeddings", "continuity_history"} <= tables
    assert wh.count("clips") == 0
    assert wh.lock_path.exists()


def test_frame_embedding_is_float_512(wh):
    types = wh.query("SELECT column_name, data_type FROM information_schema.columns "
                     "WHERE table_name = 'frame_embeddings'").set_index("column_name")["data_type"]
    assert types["embedding"] == f"FLOAT[{EMBEDDING_DIM}]"

    vector = np.linspace(-1, 1, EMBEDDING_DIM, dtype=np.float32)
    assert wh.replace_partition("frame_embeddings", "a", embeddings_frame("a", [vector, vector.tolist()])) == 2
    stored = wh.query("SELECT embedding, typeof(embedding) AS t FROM frame_embeddings ORDER BY frame_index")
    assert list(stored["t"]) == [f"FLOAT[{EMBEDDING_DIM}]"] * 2
    np.testing.assert_array_equal(np.asarray(stored["embedding"][0], dtype=np.float32), vector)
    similarity = wh.query("SELECT array_cosine_similarity(embedding, embedding) AS s FROM frame_embeddings")["s"]
    assert np.allclose(similarity, 1.0)


def test_a_511_long_embedding_is_refused_and_names_the_table(wh):
    with pytest.raises(WarehouseError, match="frame_embeddings") as info:
        wh.append("frame_embeddings", embeddings_frame("a", [[0.1] * (EMBEDDING_DIM - 1)]))
    # The real cause is reported, not a follow-up "transaction is aborted" error.
    assert "aborted" not in str(info.value)
    assert wh.count("frame_embeddings") == 0


def test_reasons_are_stored_as_a_list(wh):
    frames = pd.DataFrame({"project": ["a", "a"], "scene_index": [0, 0], "frame_index": [0, 48],
                           "timestamp_sec": [0.0, 2.0], "reasons": [["base"], ["base", "motion"]],
                           "motion_score": [None, 0.31]})
    assert wh.replace_partition("sampled_frames", "a", frames) == 2
    stored = wh.query("SELECT frame_index, reasons, motion_score FROM sampled_frames ORDER BY frame_index")
    assert [list(r) for r in stored["reasons"]] == [["base"], ["base", "motion"]]
    assert stored["motion_score"].iloc[1] == pytest.approx(0.31)


def test_unknown_table_is_refused(wh):
    with pytest.raises(WarehouseError, match="unknown warehouse table 'users'"):
        wh.replace_partition("users", "a", clips_frame("a", 1))


# --- partition replace --------------------------------------------------------------


def test_replace_partition_keeps_exactly_one_copy_and_leaves_other_projects(wh):
    assert wh.replace_partition("clips", "a", clips_frame("a", 3, "first")) == 3
    assert wh.replace_partition("clips", "b", clips_frame("b", 2, "b")) == 2
    assert wh.replace_partition("clips", "a", clips_frame("a", 3, "second")) == 3
    assert wh.replace_partition("clips", "a", clips_frame("a", 3, "second")) == 3
    assert paths_by_project(wh) == {
        "a": [f"second/scene_{i:02d}.mp4" for i in range(3)],
        "b": ["b/scene_00.mp4", "b/scene_01.mp4"],
    }
    assert wh.count("clips") == 5


def test_replace_with_an_empty_frame_clears_only_that_project(wh):
    wh.replace_partition("clips", "a", clips_frame("a", 3))
    wh.replace_partition("clips", "b", clips_frame("b", 2))
    assert wh.replace_partition("clips", "a", clips_frame("a", 0)) == 0
    assert wh.count("clips", "a") == 0
    assert wh.count("clips", "b") == 2


def test_append_adds_rows_each_time(wh):
    for score in (6.0, 7.5):
        assert wh.append("continuity_history", history_row("a", 0, score)) == 1
    assert wh.append("continuity_history", pd.DataFrame()) == 0
    assert sorted(wh.query("SELECT score FROM continuity_history")["score"]) == [6.0, 7.5]


@pytest.mark.parametrize(
    "break_frame",
    [
        pytest.param(lambda df: df.assign(status=[None] * len(df)), id="not-null"),
        pytest.param(lambda df: df.assign(width=["wide"] * len(df)), id="wrong-type"),
        pytest.param(lambda df: pd.concat([df, df]), id="duplicate-key"),
    ],
)
def test_a_failing_insert_leaves_the_previous_partition_intact(wh, break_frame):
    wh.replace_partition("clips", "a", clips_frame("a", 3, "good"))
    with pytest.raises(WarehouseError, match="clips"):
        wh.replace_partition("clips", "a", break_frame(clips_frame("a", 4, "bad")))
    assert paths_by_project(wh) == {"a": [f"good/scene_{i:02d}.mp4" for i in range(3)]}


def test_transaction_rolls_back_when_the_block_raises(wh):
    wh.replace_partition("clips", "a", clips_frame("a", 2))
    with pytest.raises(RuntimeError, match="stop"):
        with wh.transaction() as con:
            con.execute("DELETE FROM clips")
            raise RuntimeError("stop")
    assert wh.count("clips") == 2


def test_nested_access_from_one_thread_fails_fast_instead_of_deadlocking(wh):
    outcome: list[BaseException | None] = []

    def nested() -> None:
        try:
            with wh.transaction():
                wh.count("clips")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "nested warehouse access deadlocked"
    assert isinstance(outcome[0], WarehouseError)
    assert "nested access" in str(outcome[0]) and str(wh.path) in str(outcome[0])
    assert wh.count("clips") == 0  # the lock was released afterwards


# --- several processes --------------------------------------------------------------

ROWS_PER_PARTITION = 4
WRITES_PER_PROCESS = 30


def _writer(path: str, project: str, start, errors) -> None:
    try:
        wh = Warehouse(path, open_timeout_sec=30)
        start.wait(timeout=30)
        for i in range(WRITES_PER_PROCESS):
            if i % 2 == 0:
                wh.replace_partition("clips", project, clips_frame(project, ROWS_PER_PARTITION, f"gen{i:02d}"))
            else:
                wh.append("continuity_history", history_row(project, i, float(i)))
    except BaseException:
        errors.put(f"writer {project}: {traceback.format_exc()}")
        raise


def _reader(path: str, start, stop, errors, reads) -> None:
    try:
        wh = Warehouse(path, open_timeout_sec=30)
        start.wait(timeout=30)
        n = 0
        while not stop.is_set():
            df = wh.query("SELECT project, path FROM clips")
            for project, group in df.groupby("project"):
                generations = {p.split("/")[0] for p in group["path"]}
                # A reader sees a whole partition from one write, never half of one.
                if len(group) != ROWS_PER_PARTITION or len(generations) != 1:
                    raise AssertionError(f"torn partition {project}: {sorted(group['path'])}")
            n += 1
        reads.value = n
    except BaseException:
        errors.put(f"reader: {traceback.format_exc()}")
        raise


def _stop_all(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _drain(queue) -> list[str]:
    out = []
    while True:
        try:
            out.append(queue.get(timeout=0.2))
        except Exception:  # noqa: BLE001 - queue.Empty
            return out


def test_two_writer_processes_and_a_reader_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.duckdb")
    Warehouse(path)
    ctx = multiprocessing.get_context("spawn")
    start, stop, errors, reads = ctx.Barrier(3), ctx.Event(), ctx.Queue(), ctx.Value("i", -1)
    writers = [ctx.Process(target=_writer, args=(path, project, start, errors)) for project in ("a", "b")]
    reader = ctx.Process(target=_reader, args=(path, start, stop, errors, reads))
    procs = [*writers, reader]
    try:
        for proc in procs:
            proc.start()
        for proc in writers:
            proc.join(timeout=JOIN_TIMEOUT_SEC)
        stop.set()
        reader.join(timeout=JOIN_TIMEOUT_SEC)
        hung = [p.name for p in procs if p.is_alive()]
    finally:
        stop.set()
        _stop_all(procs)
    reported = _drain(errors)
    assert not hung, f"processes hung: {hung}"
    assert [p.exitcode for p in procs] == [0, 0, 0], reported
    assert reads.value > 0

    wh = Warehouse(path)
    last = f"gen{WRITES_PER_PROCESS - 2:02d}"
    assert paths_by_project(wh) == {
        p: [f"{last}/scene_{i:02d}.mp4" for i in range(ROWS_PER_PARTITION)] for p in ("a", "b")
    }
    history = wh.query("SELECT project, count(*) AS n, sum(score) AS total FROM continuity_history "
                       "GROUP BY project ORDER BY project")
    odd = [i for i in range(WRITES_PER_PROCESS) if i % 2 == 1]
    assert list(history["n"]) == [len(odd), len(odd)]
    assert list(history["total"]) == [float(sum(odd))] * 2


def _outside_holder(path: str, opened, hold_sec: float) -> None:
    """A program that is not ours: opens the file read-write, ignoring our lock file."""
    con = duckdb.connect(path)
    opened.set()
    time.sleep(hold_sec)
    con.close()


def _start_holder(path: Path, hold_sec: float):
    ctx = multiprocessing.get_context("spawn")
    opened = ctx.Event()
    holder = ctx.Process(target=_outside_holder, args=(str(path), opened, hold_sec))
    holder.start()
    if not opened.wait(timeout=JOIN_TIMEOUT_SEC):
        _stop_all([holder])
        pytest.fail("the outside holder never opened the warehouse")
    return holder


def test_an_outside_holder_makes_a_write_wait_then_succeed(wh):
    holder = _start_holder(wh.path, hold_sec=1.0)
    try:
        started = time.monotonic()
        assert wh.replace_partition("clips", "a", clips_frame("a", 2)) == 2
        waited = time.monotonic() - started
        holder.join(timeout=JOIN_TIMEOUT_SEC)
    finally:
        _stop_all([holder])
    assert holder.exitcode == 0
    assert waited > 0.3  # it really had to retry while the file was held
    assert wh.count("clips", "a") == 2


def test_an_outside_holder_past_the_timeout_gives_an_error_naming_the_file(tmp_path):
    wh = Warehouse(tmp_path / "held.duckdb", open_timeout_sec=0.5)
    holder = _start_holder(wh.path, hold_sec=20.0)
    try:
        with pytest.raises(WarehouseError) as info:
            wh.append("continuity_history", history_row("a", 0, 1.0))
        with pytest.raises(WarehouseError, match="held.duckdb"):
            wh.query("SELECT 1")
    finally:
        _stop_all([holder])
    message = str(info.value)
    assert str(wh.path) in message
    assert "within 0.5 s" in message and "lock" in message.lower()
    assert wh.count("continuity_history") == 0  # usable again once the holder is gone
