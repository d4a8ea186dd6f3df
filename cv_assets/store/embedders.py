"""Which model_version each embedder configuration produces (`embedder_versions`), keyed by
the configuration's fingerprint; the same statements on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from cv_assets.store.database import AppDatabase
from cv_assets.store.models import EmbedderVersion, utcnow

_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def record_embedder_version(db: AppDatabase, fingerprint: str, model_version: str) -> None:
    """Record that the embedder configuration `fingerprint` produces `model_version`
    (`recorded_at`: when that pairing was first recorded). Writes nothing when it is
    already recorded (every run calls this), and never fails on a concurrent writer of
    the same fingerprint (INSERT ... ON CONFLICT)."""
    if recorded_embedder_version(db, fingerprint) == model_version:
        return
    table = EmbedderVersion.__table__
    insert = _INSERTS[db.engine.dialect.name](table).values(
        fingerprint=fingerprint, model_version=model_version, recorded_at=utcnow())
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c.fingerprint],
        set_={"model_version": insert.excluded.model_version, "recorded_at": insert.excluded.recorded_at},
        where=table.c.model_version != insert.excluded.model_version,
    )
    with db.claim() as session:  # one statement, atomic by itself: no read-then-write lock needed
        session.execute(upsert)


def recorded_embedder_version(db: AppDatabase, fingerprint: str) -> str | None:
    """The model_version recorded for the embedder configuration `fingerprint` (None: none)."""
    with db.read() as session:
        return session.scalar(select(EmbedderVersion.model_version).where(EmbedderVersion.fingerprint == fingerprint))
