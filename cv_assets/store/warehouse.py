"""The DuckDB warehouse: clips, sampled frames, frame embeddings, continuity history.

Two backends behind one small class (`storage.warehouse`):

- `duckdb` (default): a local DuckDB file, as described below.
- `ducklake`: DuckDB with a DuckLake catalog in PostgreSQL (`storage.ducklake_catalog_url`)
  and Parquet data files under `storage.ducklake_data_path` (a shared folder or an object
  store). Many processes on many machines write at once through their own in-memory DuckDB;
  the catalog's transactions keep partitions whole, so no file lock is taken. The
  extensions are installed offline from the `duckdb-extension-ducklake` and
  `duckdb-extension-postgres` pip packages. DuckLake has no PRIMARY KEY constraints and no
  fixed-size arrays: the same schema is created without them and with `FLOAT[]` vectors
  (the replace-a-partition writes are what keeps keys unique).

The local file: DuckDB allows one writing process per file, and a process cannot even open the file
read-only while another holds it read-write. So no caller ever holds a connection
while computing: every read and write opens the file for one short transaction under
a cross-process file lock (shared for reads, exclusive for writes) and closes it.
If a process outside this package holds the file (a notebook, the DuckDB CLI), the
open is retried with backoff before a clear error is raised.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import pandas as pd

from cv_assets.store.locks import file_lock, held_by_this_thread

EMBEDDING_DIM = 512

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS clips (
    project VARCHAR NOT NULL,
    scene_index INTEGER NOT NULL,
    path VARCHAR,
    size_bytes BIGINT,
    codec VARCHAR,
    width INTEGER,
    height INTEGER,
    fps DOUBLE,
    declared_frames BIGINT,
    decoded_frames BIGINT,
    duration_sec DOUBLE,
    status VARCHAR NOT NULL,          -- ok | partial | failed
    reason VARCHAR,
    decode_ms DOUBLE,
    content_hash VARCHAR,
    probed_at TIMESTAMP DEFAULT current_timestamp,
    cuts JSON,                        -- hard cuts inside the clip: a list of (frame_index, timestamp_sec, change)
    PRIMARY KEY (project, scene_index)
);
ALTER TABLE clips ADD COLUMN IF NOT EXISTS cuts JSON;
CREATE TABLE IF NOT EXISTS sampled_frames (
    project VARCHAR NOT NULL,
    scene_index INTEGER NOT NULL,
    frame_index BIGINT NOT NULL,
    timestamp_sec DOUBLE NOT NULL,
    reasons VARCHAR[] NOT NULL,       -- base | last | motion
    motion_score DOUBLE,
    image_path VARCHAR,
    width INTEGER,
    height INTEGER,
    content_hash VARCHAR,             -- sha256 of the decoded pixels
    PRIMARY KEY (project, scene_index, frame_index)
);
CREATE TABLE IF NOT EXISTS frame_embeddings (
    project VARCHAR NOT NULL,
    scene_index INTEGER NOT NULL,
    frame_index BIGINT NOT NULL,
    content_hash VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    embedding FLOAT[{EMBEDDING_DIM}] NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (project, scene_index, frame_index)
);
CREATE TABLE IF NOT EXISTS appearance_embeddings (
    project VARCHAR NOT NULL,
    scene_index INTEGER NOT NULL,
    frame_index BIGINT NOT NULL,
    asset_code VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    confidence DOUBLE NOT NULL,
    embedding FLOAT[{EMBEDDING_DIM}] NOT NULL,  -- the matched region, for identity consistency
    PRIMARY KEY (project, scene_index, frame_index, asset_code)
);
CREATE TABLE IF NOT EXISTS continuity_history (
    project VARCHAR NOT NULL,
    scene_index INTEGER NOT NULL,
    run_id VARCHAR,
    computed_at TIMESTAMP DEFAULT current_timestamp,
    model_version VARCHAR,
    score DOUBLE,                     -- NULL: the scene's clip failed, nothing to score
    adherence DOUBLE,
    identity DOUBLE,
    boundary DOUBLE,
    intra_scene DOUBLE,
    needs_review BOOLEAN,
    details JSON
);
ALTER TABLE continuity_history ALTER COLUMN score DROP NOT NULL;
ALTER TABLE continuity_history ADD COLUMN IF NOT EXISTS intra_scene DOUBLE;
"""

PARTITIONED_TABLES = ("clips", "sampled_frames", "frame_embeddings", "appearance_embeddings")
LOCK_ERRORS = ("Could not set lock", "Conflicting lock", "database is locked")
# What DuckDB says about a damaged file or one that is not a DuckDB database.
CORRUPT_ERRORS = ("not a valid DuckDB database", "Corrupt database file", "checksum", "is not a DuckDB")


# A concurrent DuckLake commit touched the same table: the whole write is retried.
CONFLICT_ERRORS = ("Transaction conflict", "conflict")
CONFLICT_RETRIES = 20
# Several processes attaching a catalog that does not exist yet: all but the first fail to create it.
CATALOG_INIT_ERROR = "Failed to initialize DuckLake"
CATALOG_INIT_RETRIES = 10


class WarehouseError(RuntimeError):
    pass


def ducklake_schema(schema: str = SCHEMA) -> list[str]:
    """SCHEMA as DuckLake takes it: no PRIMARY KEY clauses, `FLOAT[]` for `FLOAT[512]`, and
    without the upgrade statements a new table does not need."""
    # The comma before the clause goes too (a comment may sit between them).
    schema = re.sub(r",([ \t]*--[^\n]*)?\s*PRIMARY KEY\s*\([^)]*\)", lambda m: m.group(1) or "", schema)
    schema = schema.replace(f"FLOAT[{EMBEDDING_DIM}]", "FLOAT[]")
    statements = [s.strip() for s in schema.split(";")]
    return [s for s in statements if s and "DROP NOT NULL" not in s]


def duckdb_extension_file(name: str) -> str:
    """The extension file a `duckdb-extension-<name>` pip package ships for this DuckDB."""
    import importlib

    try:
        package = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        raise WarehouseError(
            f"storage.warehouse ducklake needs the {name} DuckDB extension: pip install "
            f"duckdb-extension-{name}=={duckdb.__version__} (or cv_assets[deploy])") from None
    folder = os.path.join(os.path.dirname(package.__file__), "extensions")
    wanted = os.path.join(folder, f"v{duckdb.__version__}", f"{name}.duckdb_extension")
    if os.path.isfile(wanted):
        return wanted
    found = glob.glob(os.path.join(folder, "*", f"{name}.duckdb_extension"))
    raise WarehouseError(
        f"duckdb-extension-{name} ships {', '.join(found) or 'no extension'} but DuckDB is {duckdb.__version__}: "
        f"install duckdb-extension-{name}=={duckdb.__version__}")


class DuckLake:
    """One process's attachment to a DuckLake: an in-memory DuckDB with the catalog attached
    as `lake`. Made once per process (and again after a fork); each use takes a cursor."""

    _attached: dict[tuple[str, str, int], duckdb.DuckDBPyConnection] = {}
    _guard = threading.Lock()

    def __init__(self, catalog_url: str, data_path: str):
        self.catalog_url = catalog_url.replace("postgresql+psycopg://", "postgresql://")
        self.data_path = data_path

    def cursor(self) -> duckdb.DuckDBPyConnection:
        key = (self.catalog_url, self.data_path, os.getpid())
        with self._guard:
            base = self._attached.get(key)
            if base is None:
                base = self._attached[key] = self._attach()
        cursor = base.cursor()
        cursor.execute("USE lake")
        return cursor

    def _attach(self) -> duckdb.DuckDBPyConnection:
        if "://" not in self.data_path:
            os.makedirs(self.data_path, exist_ok=True)
        con = duckdb.connect()
        for name in ("ducklake", "postgres"):
            con.execute(f"INSTALL '{duckdb_extension_file(name)}'")
            con.execute(f"LOAD {name}")
        delay = 0.05
        for attempt in range(CATALOG_INIT_RETRIES):
            try:
                con.execute(f"ATTACH 'ducklake:postgres:{self.catalog_url}' AS lake (DATA_PATH '{self.data_path}')")
                return con
            except duckdb.Error as exc:
                # The first ATTACH of a new catalog creates its tables; processes doing that at once
                # collide in PostgreSQL (duplicate key in pg_type) and all but one fail. Attaching
                # again finds the catalog the winner created.
                if attempt < CATALOG_INIT_RETRIES - 1 and CATALOG_INIT_ERROR in str(exc):
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                con.close()
                raise WarehouseError(f"could not attach the DuckLake catalog {self.catalog_url.split('@')[-1]} "
                                     f"(data files {self.data_path}): {exc}") from None


class Warehouse:
    """Short transactions on one DuckDB file (under a file lock) or on a DuckLake (no lock)."""

    def __init__(self, path: str | Path, *, open_timeout_sec: float = 60.0,
                 ducklake_catalog_url: str | None = None, ducklake_data_path: str | Path | None = None):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.open_timeout_sec = open_timeout_sec
        self.lake = DuckLake(ducklake_catalog_url, str(ducklake_data_path or self.path.with_suffix(".ducklake"))) \
            if ducklake_catalog_url else None
        if self.lake is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_schema()

    @classmethod
    def from_settings(cls, storage) -> "Warehouse":
        """The warehouse `storage` (StorageSettings) names: the DuckDB file or the DuckLake."""
        if storage.warehouse == "ducklake":
            return cls(storage.duckdb_path, ducklake_catalog_url=storage.ducklake_catalog_url,
                       ducklake_data_path=storage.ducklake_data_path)
        return cls(storage.duckdb_path)

    def _ensure_schema(self) -> None:
        if self.lake is None:
            with self.transaction() as con:
                con.execute(SCHEMA)
            return
        # Processes creating the same tables at once: one commit wins, the others see its tables.
        self._retry_conflicts(lambda: self._create_lake_tables())

    def _create_lake_tables(self) -> None:
        with self.transaction() as con:
            for statement in ducklake_schema():
                con.execute(statement)

    def _retry_conflicts(self, write):
        delay = 0.02
        for attempt in range(CONFLICT_RETRIES):
            try:
                return write()
            except (duckdb.Error, WarehouseError) as exc:
                if self.lake is None or attempt == CONFLICT_RETRIES - 1 \
                        or not any(m in str(exc) for m in CONFLICT_ERRORS):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.lake is not None:
            con = self.lake.cursor()
            try:
                yield con
            finally:
                con.close()
            return
        if held_by_this_thread(self.lock_path):
            raise WarehouseError(
                f"nested access to DuckDB warehouse {self.path}: this thread is already inside "
                "transaction() or query(); use the connection that transaction() yields"
            )
        with file_lock(self.lock_path, shared=read_only):
            con = self._open_with_retry(read_only=read_only and self.path.exists())
            try:
                yield con
            finally:
                con.close()

    def _open_with_retry(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.open_timeout_sec
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not any(msg in str(exc) for msg in LOCK_ERRORS):
                    raise self._unusable(exc) from None
                if time.monotonic() > deadline:
                    raise WarehouseError(
                        f"could not open DuckDB warehouse {self.path} within {self.open_timeout_sec:g} s: {exc}. "
                        "Another program holds it open; close it and retry."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _unusable(self, exc: BaseException) -> WarehouseError:
        """The error for a file DuckDB cannot use: corrupt, or not a DuckDB database at all."""
        text = str(exc)
        if any(marker in text for marker in CORRUPT_ERRORS):
            return WarehouseError(
                f"the DuckDB warehouse {self.path} is corrupt or not a DuckDB database ({text}). It holds only "
                f"derived data: move it aside (mv {self.path} {self.path}.broken) and re-materialise the "
                "projects to rebuild it"
            )
        return WarehouseError(f"could not open DuckDB warehouse {self.path}: {text}")

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An exclusive write transaction: committed on success, rolled back on error."""
        with self._connect(read_only=False) as con:
            con.begin()
            try:
                yield con
                con.commit()
            except BaseException as exc:
                with suppress(duckdb.Error):
                    con.rollback()
                if isinstance(exc, duckdb.Error) and any(m in str(exc) for m in CORRUPT_ERRORS):
                    raise self._unusable(exc) from None
                raise

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read query and return a DataFrame (shared lock, read-only connection)."""
        with self._connect(read_only=True) as con:
            try:
                return con.execute(sql, params or []).df()
            except duckdb.Error as exc:
                if any(m in str(exc) for m in CORRUPT_ERRORS):
                    raise self._unusable(exc) from None
                raise

    def replace_partition(self, table: str, project: str, rows: pd.DataFrame) -> int:
        """Replace every row of `project` in `table` with `rows`, in one transaction."""
        return self.replace_partitions(project, {table: rows})

    def replace_partitions(self, project: str, tables: dict[str, pd.DataFrame]) -> int:
        """Replace every row of `project` in each of `tables` with the given rows, all in
        one transaction (so related tables never disagree)."""
        for table in tables:
            _check_table(table)

        def write() -> int:
            inserted = 0
            with self.transaction() as con:
                for table, rows in tables.items():
                    con.execute(f"DELETE FROM {table} WHERE project = ?", [project])
                    inserted += self._insert(con, table, rows)
            return inserted

        return self._retry_conflicts(write)

    def append(self, table: str, rows: pd.DataFrame) -> int:
        def write() -> int:
            with self.transaction() as con:
                return self._insert(con, table, rows)

        return self._retry_conflicts(write)

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pd.DataFrame) -> int:
        if rows is None or rows.empty:
            return 0
        con.register("_incoming", rows)
        try:
            columns = ", ".join(f'"{c}"' for c in rows.columns)
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        except duckdb.Error as exc:
            raise WarehouseError(f"could not insert {len(rows)} rows into {table}: {exc}") from exc
        finally:
            # After a failed INSERT the transaction is aborted and unregister itself
            # fails; that error must not hide the real one (the caller rolls back).
            with suppress(duckdb.Error):
                con.unregister("_incoming")
        return len(rows)

    def count(self, table: str, project: str | None = None) -> int:
        if project is None:
            return int(self.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0])
        return int(self.query(f"SELECT count(*) AS n FROM {table} WHERE project = ?", [project])["n"].iloc[0])


def _check_table(table: str) -> None:
    if table not in PARTITIONED_TABLES + ("continuity_history",):
        raise WarehouseError(f"unknown warehouse table {table!r}")
