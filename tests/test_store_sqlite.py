"""The application database: migrations, transactions, constraints, on SQLite and on PostgreSQL
(tests taking `app_db_url` run once per backend), and SQLite's pragmas and locking."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import traceback
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from cv_assets.store import database
from cv_assets.store.database import AppDatabase, table_counts
from cv_assets.store.models import (
    Asset,
    AssetAppearance,
    Base,
    EmbeddingFailure,
    EntityEvent,
    Event,
    EventEmbedding,
    Project,
    RecognizedEntity,
)

def _head_revision() -> str:
    """The newest migration, so adding one does not edit these tests (0001/0002 stay fixed)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from cv_assets.store.database import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


HEAD = _head_revision()
PGVECTOR_ONLY = {"embedding_vector", "ix_event_embeddings_vector_hnsw"}
ALL_TABLES = {
    "projects", "assets", "scene_manifests", "asset_appearances", "events", "event_embeddings",
    "embedding_failures", "recognized_entities", "entity_events", "embedder_versions",
}
TABLES_0001 = ALL_TABLES - {"recognized_entities", "entity_events", "embedder_versions"}


def url_for(path: Path) -> str:
    return f"sqlite:///{path}"


def schema_dump(path: Path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        con.close()


def table_names(path: Path) -> set[str]:
    return {name for kind, name, _, _ in schema_dump(path) if kind == "table"} - {"alembic_version"}


def column_names(path: Path, table: str) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return [row[1] for row in con.execute(f"PRAGMA table_info({table})")]
    finally:
        con.close()


def db_tables(db: AppDatabase) -> set[str]:
    return set(inspect(db.engine).get_table_names()) - {"alembic_version"}


def db_columns(db: AppDatabase, table: str) -> list[str]:
    return [column["name"] for column in inspect(db.engine).get_columns(table)]


def db_indexes(db: AppDatabase) -> set[str]:
    inspector = inspect(db.engine)
    return {index["name"] for table in inspector.get_table_names() for index in inspector.get_indexes(table)}


def db_schema(db: AppDatabase) -> list:
    """Every table with its columns (name, type) and indexes, on either backend."""
    inspector = inspect(db.engine)
    return [(table, [(c["name"], str(c["type"])) for c in inspector.get_columns(table)],
             sorted(i["name"] for i in inspector.get_indexes(table)))
            for table in sorted(inspector.get_table_names())]


def add_project_with_asset(db: AppDatabase, key: str = "demo") -> tuple[int, int]:
    with db.write() as session:
        project = Project(key=key, name="Demo", root_path="/p")
        project.assets.append(Asset(code="CHAR_01", kind="character", name="Runner", reference_image_path="r.png"))
        session.add(project)
        session.flush()
        return project.id, project.assets[0].id


def add_event(session, event_id: str, *, embedded: bool = True) -> None:
    session.add(Event(id=event_id, camera_id="front_door", started_at=datetime(2026, 11, 1, 8, 15)))
    if embedded:
        session.add(EventEmbedding(event_id=event_id, embedding=json.dumps([0.0] * 512), model_version="m1"))


# --- migrations ---------------------------------------------------------------------


def test_fresh_database_reaches_head_with_every_table(app_db_url):
    db = AppDatabase(app_db_url)
    assert db.current_revision() == HEAD
    assert db_tables(db) == ALL_TABLES
    assert "face_embedding" in db_columns(db, "assets")
    assert table_counts(db, sorted(ALL_TABLES)) == {t: 0 for t in sorted(ALL_TABLES)}
    indexes = db_indexes(db)
    assert {"ix_event_embeddings_model_version", "ix_recognized_entities_model_version",
            "ix_events_started_at", "ix_asset_appearances_asset_id"} <= indexes


def test_orm_models_match_the_head_schema(app_db_url):
    db = AppDatabase(app_db_url)

    def mirrored(obj, name, type_, reflected, compare_to):
        # pgvector's column and index exist on PostgreSQL only; the models keep the JSON contract.
        return name not in PGVECTOR_ONLY

    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": mirrored})
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == []


def test_pgvector_column_index_and_trigger_follow_the_json_vectors(postgres_url):
    db = AppDatabase(postgres_url)
    assert "embedding_vector" in db_columns(db, "event_embeddings")
    assert "ix_event_embeddings_vector_hnsw" in db_indexes(db)
    with db.write() as session:
        add_event(session, "evt-1")  # a 512-d JSON vector
        add_event(session, "evt-2", embedded=False)
        session.add(EventEmbedding(event_id="evt-2", embedding="[0.6, 0.8]", model_version="hist"))
    with db.read() as session:
        dims = dict(session.execute(text("SELECT event_id, vector_dims(embedding_vector) FROM event_embeddings")).all())
    assert dims == {"evt-1": 512, "evt-2": None}  # another size keeps its JSON form only


def test_sqlite_has_no_pgvector_column(tmp_path):
    db = AppDatabase(url_for(tmp_path / "app.sqlite"))
    assert "embedding_vector" not in db_columns(db, "event_embeddings")


def test_upgrade_from_revision_0001_keeps_rows_and_adds_the_new_schema(app_db_url):
    old = AppDatabase(app_db_url, migrate=False)
    old.upgrade("0001")
    assert old.current_revision() == "0001"
    assert db_tables(old) == TABLES_0001
    assert "face_embedding" not in db_columns(old, "assets")
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO projects (id, key, name, root_path, updated_at) "
                          "VALUES (1, 'demo', 'Demo', '/p', '2026-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO assets (id, project_id, code, kind, name, reference_image_path, "
                          "clip_embedding, embedding_model_version) "
                          "VALUES (7, 1, 'CHAR_01', 'character', 'Runner', 'r.png', :blob, 'clip-v1')"),
                     {"blob": b"\x00\x01\x02\x03"})
        conn.execute(text("INSERT INTO scene_manifests (project_id, scene_index, clip_path, expected_asset_codes, "
                          "continuity_score) VALUES (1, 0, 'clips/s0.mp4', '[\"CHAR_01\"]', 7.5)"))
        conn.execute(text("INSERT INTO asset_appearances (asset_id, project_id, scene_index, frame_index, "
                          "timestamp_sec, bbox, confidence, source, created_at) "
                          "VALUES (7, 1, 0, 12, 0.5, '[1,2,3,4]', 0.9, 'clip_match', '2026-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO events (id, camera_id, started_at, created_at) "
                          "VALUES ('evt-1', 'cam', '2026-11-01 08:15:00', '2026-11-01 08:15:01')"))
        conn.execute(text("INSERT INTO event_embeddings (event_id, embedding, model_version, created_at) "
                          "VALUES ('evt-1', '[0.5, 0.5]', 'clip-v1', '2026-11-01 08:16:00')"))
        conn.execute(text("INSERT INTO embedding_failures (item_kind, item_id, model_version, reason, attempts, "
                          "first_failed_at, last_failed_at) VALUES ('event', 'evt-2', 'clip-v1', 'bad base64', 2, "
                          "'2026-11-01 08:15:00', '2026-11-01 08:20:00')"))
    old.dispose()

    db = AppDatabase(app_db_url)  # migrates to head on construction
    assert db.current_revision() == HEAD
    assert db_tables(db) == ALL_TABLES
    assert "face_embedding" in db_columns(db, "assets")
    assert table_counts(db, sorted(TABLES_0001)) == {
        "asset_appearances": 1, "assets": 1, "embedding_failures": 1, "event_embeddings": 1,
        "events": 1, "projects": 1, "scene_manifests": 1,
    }
    assert table_counts(db, ["recognized_entities", "entity_events"]) == {"recognized_entities": 0, "entity_events": 0}
    with db.read() as session:
        asset = session.get(Asset, 7)
        assert (asset.code, asset.clip_embedding, asset.embedding_model_version) == ("CHAR_01", b"\x00\x01\x02\x03", "clip-v1")
        assert asset.face_embedding is None
        appearance = session.scalars(select(AssetAppearance)).one()
        assert (appearance.asset_id, appearance.frame_index, appearance.source, appearance.confidence) == (7, 12, "clip_match", 0.9)
        assert session.scalars(select(EventEmbedding.embedding)).one() == "[0.5, 0.5]"
        failure = session.scalars(select(EmbeddingFailure)).one()
        assert (failure.item_id, failure.reason, failure.attempts) == ("evt-2", "bad base64", 2)
    # The new tables work with the old rows.
    with db.write() as session:
        entity = RecognizedEntity(model_version="clip-v1", centroid="[0.5, 0.5]", event_count=1)
        session.add(entity)
        session.flush()
        session.add(EntityEvent(entity_id=entity.id, event_id="evt-1", similarity=0.99))
    assert table_counts(db, ["entity_events"]) == {"entity_events": 1}


def test_running_the_upgrade_twice_changes_nothing(app_db_url, monkeypatch):
    db = AppDatabase(app_db_url)
    with db.write() as session:
        add_event(session, "evt-1")
    schema_before = db_schema(db)
    counts_before = table_counts(db, sorted(ALL_TABLES))

    calls = []
    real_upgrade = database.command.upgrade
    monkeypatch.setattr(database.command, "upgrade", lambda cfg, rev: (calls.append(rev), real_upgrade(cfg, rev)))
    database._migrated.clear()  # forget this process's cache so alembic really runs again
    AppDatabase(app_db_url)
    db.upgrade()
    assert calls == ["head"]  # the second AppDatabase ran alembic, then the cache skipped it
    assert db_schema(db) == schema_before
    assert table_counts(db, sorted(ALL_TABLES)) == counts_before
    assert db.current_revision() == HEAD


def test_a_database_file_created_again_is_migrated_again(tmp_path):
    path = tmp_path / "app.sqlite"
    AppDatabase(url_for(path)).dispose()
    for leftover in tmp_path.glob("app.sqlite*"):
        leftover.unlink()
    db = AppDatabase(url_for(path))
    assert db.current_revision() == HEAD
    assert table_names(path) == ALL_TABLES


def test_each_in_memory_database_gets_the_schema():
    first = AppDatabase("sqlite:///:memory:")
    second = AppDatabase("sqlite:///:memory:")
    for db in (first, second):
        assert db.current_revision() == HEAD
        assert table_counts(db, ["events"]) == {"events": 0}


def _migrate_in_child(url: str, barrier, errors) -> None:
    try:
        barrier.wait(timeout=30)
        db = AppDatabase(url)
        with db.write() as session:
            session.add(Project(key=f"p{multiprocessing.current_process().pid}", name="x", root_path="/"))
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_two_processes_migrating_a_new_file_at_once_both_succeed(tmp_path):
    path = tmp_path / "race.sqlite"
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_child, args=(url_for(path), barrier, errors)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, "a migrating process hung"
    reported = [errors.get(timeout=1) for _ in range(errors.qsize())] if not errors.empty() else []
    assert [p.exitcode for p in procs] == [0, 0], reported
    db = AppDatabase(url_for(path))
    assert db.current_revision() == HEAD
    assert table_names(path) == ALL_TABLES
    assert table_counts(db, ["projects"]) == {"projects": 2}


# --- connection settings and transactions -------------------------------------------


def test_wal_busy_timeout_and_foreign_keys_are_on(tmp_path):
    db = AppDatabase(url_for(tmp_path / "app.sqlite"))
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == database.BUSY_TIMEOUT_MS


def test_deleting_an_event_cascades_to_its_embedding_and_visitor_link(app_db_url):
    db = AppDatabase(app_db_url)
    with db.write() as session:
        add_event(session, "evt-1")
        add_event(session, "evt-2")
        entity = RecognizedEntity(model_version="m1", centroid="[]", event_count=2)
        session.add(entity)
        session.flush()
        session.add_all([EntityEvent(entity_id=entity.id, event_id=e, similarity=0.9) for e in ("evt-1", "evt-2")])
    with db.engine.begin() as conn:  # plain SQL: the database enforces it, not the ORM
        conn.execute(text("DELETE FROM events WHERE id = 'evt-1'"))
    with db.read() as session:
        assert session.scalars(select(EventEmbedding.event_id)).all() == ["evt-2"]
        assert session.scalars(select(EntityEvent.event_id)).all() == ["evt-2"]


def test_embedding_for_a_missing_event_is_rejected(app_db_url):
    db = AppDatabase(app_db_url)
    with pytest.raises(IntegrityError, match="FOREIGN KEY|foreign key"):
        with db.write() as session:
            session.add(EventEmbedding(event_id="ghost", embedding="[]", model_version="m1"))
    assert table_counts(db, ["event_embeddings"]) == {"event_embeddings": 0}


def test_write_begins_immediate(tmp_path):
    path = tmp_path / "app.sqlite"
    db = AppDatabase(url_for(path))
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with db.write():
            # No statement has run yet: only BEGIN IMMEDIATE can already hold the write lock.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # released on commit
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_read_does_not_take_the_write_lock(tmp_path):
    path = tmp_path / "app.sqlite"
    db = AppDatabase(url_for(path))
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with db.read() as session:
            assert session.execute(text("SELECT count(*) FROM events")).scalar_one() == 0
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO events (id, camera_id, started_at, created_at) "
                          "VALUES ('e', 'c', '2026-01-01', '2026-01-01')")
            other.execute("COMMIT")
    finally:
        other.close()
    assert table_counts(db, ["events"]) == {"events": 1}


def test_write_commits_on_success_and_rolls_back_on_error(app_db_url):
    db = AppDatabase(app_db_url)
    with db.write() as session:
        add_event(session, "kept", embedded=False)
    with pytest.raises(RuntimeError, match="boom"):
        with db.write() as session:
            add_event(session, "lost", embedded=False)
            session.flush()
            raise RuntimeError("boom")
    with db.read() as session:
        assert session.scalars(select(Event.id)).all() == ["kept"]


def test_appearance_source_check_rejects_other(app_db_url):
    db = AppDatabase(app_db_url)
    project_id, asset_id = add_project_with_asset(db)

    def appearance(source: str) -> AssetAppearance:
        return AssetAppearance(asset_id=asset_id, project_id=project_id, scene_index=0, frame_index=0,
                               timestamp_sec=0.0, bbox="[0,0,1,1]", confidence=0.8, source=source)

    with db.write() as session:
        session.add_all([appearance(s) for s in ("yolo", "face_match", "clip_match")])
    with pytest.raises(IntegrityError, match="ck_appearance_source|CHECK"):
        with db.write() as session:
            session.add(appearance("other"))
    with db.read() as session:
        assert sorted(session.scalars(select(AssetAppearance.source))) == ["clip_match", "face_match", "yolo"]


def test_embedding_failure_is_unique_per_item_and_model(app_db_url):
    db = AppDatabase(app_db_url)
    with db.write() as session:
        session.add(EmbeddingFailure(item_kind="event", item_id="e1", model_version="m1", reason="bad"))
        session.add(EmbeddingFailure(item_kind="event", item_id="e1", model_version="m2", reason="bad"))
    with pytest.raises(IntegrityError, match="UNIQUE|unique"):
        with db.write() as session:
            session.add(EmbeddingFailure(item_kind="event", item_id="e1", model_version="m1", reason="again"))
    assert table_counts(db, ["embedding_failures"]) == {"embedding_failures": 2}


def test_nearest_events_use_the_hnsw_index(postgres_url):
    import numpy as np

    from cv_assets.store.events import has_vector_index, nearest_events
    from cv_assets.store.vectors import vector_to_json

    db = AppDatabase(postgres_url)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with db.write() as session:
        for i, vector in enumerate(vectors):
            session.add(Event(id=f"e{i:02d}", camera_id="c", started_at=datetime(2026, 11, 1, 8, i)))
            session.add(EventEmbedding(event_id=f"e{i:02d}", embedding=vector_to_json(vector), model_version="m1"))
    with db.read() as session:
        assert has_vector_index(session)
        hits = [(row.event_id, row.similarity) for row in nearest_events(session, "m1", vectors[7], 3, ef_search=100)]
        assert not nearest_events(session, "other", vectors[7], 3)
        session.execute(text("SET LOCAL enable_seqscan = off"))  # 50 rows: the planner would rather scan
        plan = "\n".join(session.execute(text(
            "EXPLAIN SELECT event_id FROM event_embeddings ORDER BY embedding_vector <=> "
            f"'{vector_to_json(vectors[7])}'::vector LIMIT 3")).scalars())
    exact = np.argsort(-(vectors @ vectors[7]))[:3]
    assert [h[0] for h in hits] == [f"e{i:02d}" for i in exact]
    assert abs(hits[0][1] - 1.0) < 1e-5
    assert "ix_event_embeddings_vector_hnsw" in plan
