"""The warehouse on DuckLake (catalog in a real PostgreSQL, Parquet files in tmp_path):
same API and guarantees as the DuckDB file, no file lock, several writer processes at once."""

from __future__ import annotations

import multiprocessing
import traceback
import uuid

import numpy as np
import pytest
from test_store_warehouse import clips_frame, embeddings_frame, history_row, paths_by_project

from cv_assets.settings import StorageSettings
from cv_assets.store.warehouse import EMBEDDING_DIM, PARTITIONED_TABLES, Warehouse, WarehouseError, ducklake_schema

pytest.importorskip("duckdb_extension_ducklake")
JOIN_TIMEOUT_SEC = 120
WRITES = 6
ROWS = 4


@pytest.fixture
def lake(pg_server, tmp_path) -> dict:
    from urllib.parse import parse_qs, urlparse

    name = f"lake_{uuid.uuid4().hex[:10]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    socket_dir = parse_qs(urlparse(pg_server.get_uri()).query)["host"][0]
    yield {"path": tmp_path / "unused.duckdb", "ducklake_catalog_url": f"postgresql://postgres@/{name}?host={socket_dir}",
           "ducklake_data_path": str(tmp_path / "lake")}
    pg_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


def test_ducklake_schema_has_no_keys_and_open_vectors():
    statements = ducklake_schema()
    assert not any("PRIMARY KEY" in s for s in statements)
    assert not any(f"FLOAT[{EMBEDDING_DIM}]" in s for s in statements)
    assert sum("FLOAT[]" in s for s in statements) == 2


def test_from_settings_picks_the_backend(lake):
    storage = StorageSettings(warehouse="ducklake", ducklake_catalog_url=lake["ducklake_catalog_url"],
                              ducklake_data_path=lake["ducklake_data_path"], duckdb_path=lake["path"])
    wh = Warehouse.from_settings(storage)
    assert wh.lake is not None
    assert not lake["path"].exists() and not wh.lock_path.exists()  # no DuckDB file, no lock file


def test_partitions_replace_atomically_and_vectors_round_trip(lake):
    wh = Warehouse(**lake)
    tables = set(wh.query("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'lake'")["table_name"])
    assert set(PARTITIONED_TABLES) | {"continuity_history"} <= tables
    wh.replace_partition("clips", "a", clips_frame("a", 3, "first"))
    wh.replace_partition("clips", "b", clips_frame("b", 2, "b"))
    wh.replace_partition("clips", "a", clips_frame("a", 3, "second"))
    assert paths_by_project(wh) == {"a": [f"second/scene_{i:02d}.mp4" for i in range(3)],
                                    "b": ["b/scene_00.mp4", "b/scene_01.mp4"]}
    with pytest.raises(WarehouseError, match="clips"):  # NOT NULL still holds; the old partition stays
        wh.replace_partition("clips", "a", clips_frame("a", 4, "bad").assign(status=[None] * 4))
    assert paths_by_project(wh)["a"] == [f"second/scene_{i:02d}.mp4" for i in range(3)]
    vectors = [np.random.default_rng(i).standard_normal(EMBEDDING_DIM).astype(np.float32) for i in range(3)]
    wh.replace_partition("frame_embeddings", "a", embeddings_frame("a", vectors))
    stored = wh.query("SELECT embedding FROM frame_embeddings ORDER BY frame_index")["embedding"]
    assert all(np.array_equal(np.asarray(s, dtype=np.float32), v) for s, v in zip(stored, vectors))
    assert wh.append("continuity_history", history_row("a", 0, 7.5)) == 1


def _lake_writer(lake: dict, project: str, start, errors) -> None:
    try:
        wh = Warehouse(**lake)
        start.wait(timeout=60)
        for i in range(WRITES):
            wh.replace_partition("clips", project, clips_frame(project, ROWS, f"gen{i:02d}"))
            wh.append("continuity_history", history_row(project, i, float(i)))
    except BaseException:
        errors.put(f"writer {project}: {traceback.format_exc()}")
        raise


def test_writer_processes_share_one_lake_without_a_lock(lake):
    Warehouse(**lake)
    ctx = multiprocessing.get_context("spawn")
    projects = ("a", "b", "c")
    start, errors = ctx.Barrier(len(projects)), ctx.Queue()
    procs = [ctx.Process(target=_lake_writer, args=(lake, p, start, errors)) for p in projects]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=JOIN_TIMEOUT_SEC)
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
    reported = [errors.get(timeout=1) for _ in range(errors.qsize())] if not errors.empty() else []
    assert not hung and [p.exitcode for p in procs] == [0] * len(projects), reported
    wh = Warehouse(**lake)
    last = f"gen{WRITES - 1:02d}"
    assert paths_by_project(wh) == {p: [f"{last}/scene_{i:02d}.mp4" for i in range(ROWS)] for p in projects}
    history = wh.query("SELECT project, count(*) AS n FROM continuity_history GROUP BY project ORDER BY project")
    assert list(history["n"]) == [WRITES] * len(projects)
