"""The application database: engine set-up, migrations, transactions. An SQLite file by
default, PostgreSQL (psycopg 3) at scale; the same migrations and queries run on both.

SQLite: WAL mode lets readers work while one writer writes; a busy timeout makes a second
writer wait instead of failing; read-then-write transactions use `write()`, which
begins IMMEDIATE so two writers can never both read stale state and then collide
on upgrade from a read lock to a write lock ("database is locked").

PostgreSQL: `write()` takes one transaction-scoped advisory lock first, so read-then-write
transactions are serialised exactly as BEGIN IMMEDIATE serialises them on SQLite (they are
short: no embedding runs inside one). Concurrent backfill workers claim disjoint batches
with `claim()` (row locks, `FOR ... SKIP LOCKED`) and only take the write lock to store.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from cv_assets.store.locks import file_lock

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key of write(): any 64-bit number no other application uses.
WRITE_LOCK_KEY = 0x63765F617373  # "cv_ass"

# Files already migrated to head by this process, keyed by (url, device, inode): a file
# deleted and created again is a new database and must be migrated again. In-memory
# databases are never cached (each engine has its own).
_migrated: set[tuple[str, int, int]] = set()
_migrate_guard = threading.Lock()


class DatabaseUnavailableError(RuntimeError):
    """The application database cannot be opened or migrated (a read-only or missing
    location, a file that is not SQLite); the message names the file and the reason."""


class AppDatabase:
    """One application database (SQLite or PostgreSQL). Cheap to construct; migrates on first use."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.upgrade()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @property
    def supports_skip_locked(self) -> bool:
        """Whether several workers can claim disjoint rows at once (PostgreSQL)."""
        return self.engine.dialect.name == "postgresql"

    @property
    def path(self) -> Path | None:
        prefix = "sqlite:///"
        return Path(self.url[len(prefix):]) if self.url.startswith(prefix) and ":memory:" not in self.url else None

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to `revision`; idempotent and safe across processes."""
        with _migrate_guard:
            if revision == "head" and self._migration_key() in _migrated:
                return
            lock_target = self.path.with_suffix(self.path.suffix + ".migrate.lock") if self.path else None
            try:
                with file_lock(lock_target), self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":  # processes migrating at once wait for each other
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY + 1})
                    cfg = _alembic_config(self.url)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
            except (OSError, DatabaseError) as exc:
                raise self.unavailable("cannot migrate", exc) from None
            key = self._migration_key()
            if revision == "head" and key is not None:
                _migrated.add(key)

    def _migration_key(self) -> tuple[str, int, int] | None:
        if not self.url.startswith("sqlite"):
            return (self.url, 0, 0)  # a server database is not deleted and created again under us
        path = self.path
        if path is None or not path.exists():
            return None
        stat = path.stat()
        return (self.url, stat.st_dev, stat.st_ino)

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except DatabaseError as exc:
            raise self.unavailable("cannot read", exc) from None

    def unavailable(self, action: str, exc: BaseException) -> DatabaseUnavailableError:
        reason = str(getattr(exc, "orig", None) or getattr(exc, "strerror", None) or exc)
        where = self.path or self.engine.url.render_as_string(hide_password=True)
        if "not a database" in reason or "malformed" in reason:
            hint = "The file is not an SQLite database or is damaged: restore it from a backup, or move it aside to start empty"
        else:
            hint = ("Check that the folder and the file are writable by this user, or point storage.database_url "
                    "at a writable location")
            if not self.is_sqlite:
                hint = ("Check that the PostgreSQL server in storage.database_url is running, reachable, and that "
                        "the user may connect and create tables")
        return DatabaseUnavailableError(f"{action} the application database {where}: {reason}. {hint}")

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads (deferred transaction, never takes the write lock by itself)."""
        with self._sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a BEGIN IMMEDIATE transaction (SQLite) or a transaction holding the
        write lock (PostgreSQL): committed on success, rolled back on error."""
        with self.claim() as session:
            session.connection(execution_options={"sqlite_immediate": True})
            self.lock_writes(session)
            yield session

    @contextmanager
    def claim(self) -> Iterator[Session]:
        """A session in a plain transaction that may hold row locks (`FOR ... SKIP LOCKED`)
        for as long as the work on the rows takes: committed on success, rolled back on
        error. The server rolls it back, releasing the rows, when the process dies. Call
        `lock_writes(session)` before a read-then-write inside it."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def lock_writes(self, session: Session) -> None:
        """Serialise this transaction's writes with every other writer (PostgreSQL; on SQLite
        write() already holds the database's one write lock)."""
        if self.engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})

    def dispose(self) -> None:
        self.engine.dispose()


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolates %
    return cfg


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # pre_ping: a pooled connection the server closed (restart, idle timeout) is replaced.
        return create_engine(url, pool_pre_ping=True)
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if path and ":memory:" not in path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailableError(
                f"cannot create the folder of the application database {path}: {exc.strerror or exc}. "
                "Point storage.database_url at a writable location"
            ) from None
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's explicit BEGIN statements control transactions (pysqlite quirk).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # write() asks for IMMEDIATE: take the write lock before the first read.
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def table_counts(db: AppDatabase, tables: list[str]) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}
