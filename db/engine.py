"""The engine factory (never called at import) and migrations.

SQLite by default, a file under BOOMERANG_HOME, in WAL mode with foreign keys on and a busy
timeout, so a worker and the dashboard can write at once. PostgreSQL when DATABASE_URL says so
(`postgres://` and `postgresql://` both mean psycopg 3).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import create_engine

from boomerang.errors import BoomerangError


def database_url(url: str | None = None) -> str:
    url = url or os.environ.get("DATABASE_URL")
    if not url:
        home = Path(os.environ.get("BOOMERANG_HOME", "~/.boomerang")).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'boomerang.db'}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if not url.startswith(("sqlite:", "postgresql+psycopg://")):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise BoomerangError(f"DATABASE_URL scheme {scheme!r} is not supported: use postgresql://USER:PASS@HOST/DB, "
                             "or leave it unset for the SQLite file in BOOMERANG_HOME")
    return url


def make_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """An engine for `url` (default: DATABASE_URL or the SQLite file), migrated to head unless asked not to."""
    url = database_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if migrate:
        try:
            upgrade(engine)
        except OperationalError as exc:
            where = engine.url.render_as_string(hide_password=True)
            reason = str(exc.orig).strip().splitlines()[0][:200] if exc.orig else type(exc).__name__
            raise BoomerangError(f"cannot reach the database at {where} ({reason}): start it, or fix DATABASE_URL") from None
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(engine: Engine):
    here = Path(__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(here / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent), one process at a time.

    A worker, the dashboard and a CLI command started together on a fresh database would otherwise
    all try to create the same tables: a file lock beside a SQLite file, an advisory lock on PostgreSQL.
    """

    with _migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)


_PG_MIGRATION_LOCK = 0x626F6F6D  # "boom": the advisory lock key for migrations


@contextmanager
def _migration_lock(engine: Engine):
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return

        with open(f"{database}.migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK})
    else:
        yield


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
