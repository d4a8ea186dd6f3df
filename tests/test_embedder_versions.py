"""Which model_version the configured embedder produces, recorded in the application database
(`embedder_versions`) on SQLite and PostgreSQL: the store upsert, the fingerprint lookup the
schedule uses, and nothing written beside the database file any more."""

from __future__ import annotations

import os

from sqlalchemy import select

from cv_assets.events.backfill import embedder_fingerprint, known_embedder_version, remember_embedder_version
from cv_assets.settings import EmbedderSettings
from cv_assets.store import AppDatabase
from cv_assets.store.embedders import record_embedder_version, recorded_embedder_version
from cv_assets.store.models import EmbedderVersion


def model_dir(tmp_path, name: str = "model"):
    """A local model directory: the fingerprint stats its weight and config files."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text('{"projection_dim": 512}')
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    return directory


def rows(db: AppDatabase) -> list[tuple]:
    with db.read() as session:
        return session.execute(select(EmbedderVersion.fingerprint, EmbedderVersion.model_version)
                               .order_by(EmbedderVersion.fingerprint)).all()


def recorded_at(db: AppDatabase, fingerprint: str):
    with db.read() as session:
        return session.get(EmbedderVersion, fingerprint).recorded_at


def test_record_upserts_one_row_per_fingerprint(app_db_url):
    db = AppDatabase(app_db_url)
    assert recorded_embedder_version(db, "f1") is None
    record_embedder_version(db, "f1", "clip:a")
    first_at = recorded_at(db, "f1")
    record_embedder_version(db, "f1", "clip:a")  # already recorded: nothing written
    assert recorded_at(db, "f1") == first_at
    record_embedder_version(db, "f2", "hist:1")
    assert rows(db) == [("f1", "clip:a"), ("f2", "hist:1")]
    record_embedder_version(db, "f1", "clip:b")  # ON CONFLICT: replaced in place
    assert rows(db) == [("f1", "clip:b"), ("f2", "hist:1")]
    assert recorded_at(db, "f1") >= first_at
    assert recorded_embedder_version(AppDatabase(app_db_url), "f1") == "clip:b"  # another process's view


def test_remember_then_know_and_a_changed_model_dir_is_unknown(app_db_url, tmp_path):
    db = AppDatabase(app_db_url)
    settings = EmbedderSettings(model=str(model_dir(tmp_path)), fallback="none")
    assert known_embedder_version(db, settings) is None
    remember_embedder_version(db, settings, "clip:tiny-a")
    assert known_embedder_version(db, settings) == "clip:tiny-a"
    assert known_embedder_version(AppDatabase(app_db_url), settings) == "clip:tiny-a"

    # New weights in the same directory: another fingerprint, so the version is unknown.
    weights = tmp_path / "model" / "model.safetensors"
    before = embedder_fingerprint(settings)
    weights.write_bytes(b"\x01" * 128)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert embedder_fingerprint(settings) != before
    assert known_embedder_version(db, settings) is None
    remember_embedder_version(db, settings, "clip:tiny-b")
    assert known_embedder_version(db, settings) == "clip:tiny-b"
    assert len(rows(db)) == 2  # the old configuration's record stays (switching back is known at once)

    # Another configuration of the same directory (the fallback) is another fingerprint too.
    assert known_embedder_version(db, settings.model_copy(update={"fallback": "color_histogram"})) is None


def test_nothing_is_written_beside_the_sqlite_file(tmp_path):
    db = AppDatabase(f"sqlite:///{tmp_path / 'app.sqlite'}")
    settings = EmbedderSettings(model=str(model_dir(tmp_path)))
    remember_embedder_version(db, settings, "clip:tiny-a")
    assert known_embedder_version(db, settings) == "clip:tiny-a"
    assert not (tmp_path / "app.sqlite.cache").exists()


def test_an_in_memory_database_keeps_the_record_too(tmp_path):
    db = AppDatabase("sqlite:///:memory:")
    settings = EmbedderSettings(model=str(model_dir(tmp_path)))
    remember_embedder_version(db, settings, "clip:tiny-a")
    assert known_embedder_version(db, settings) == "clip:tiny-a"
