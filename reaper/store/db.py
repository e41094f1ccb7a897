"""The store's database: the engine (SQLite or PostgreSQL), its transactions and its schema
migrations. The repositories (runs, outbox, reports, lease, slack) share one :class:`Database`.

Synchronous SQLAlchemy; the async service calls the repositories through ``asyncio.to_thread``. A
``Database`` is safe to share between threads: each transaction takes its own connection from the
pool and holds it only for that transaction.

SQLite (the default) runs in WAL mode with a busy timeout, and every writing transaction starts
with ``BEGIN IMMEDIATE``: writers queue for the lock at the start instead of failing half-way, and a
transaction's reads (e.g. "how many reminders already?") see everything committed before it.
PostgreSQL (psycopg 3) runs READ COMMITTED; races are settled by unique constraints with
``ON CONFLICT DO NOTHING`` (notices, runs, the lease) and by row locks on the runs being recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool

SQLITE_CACHE_KIB = 256  # each connection's page cache (PRAGMA cache_size), in KiB


def _migrations_folder() -> Path:
    """The alembic scripts: ``alembic/`` at the top of a source checkout (and of an editable
    install), ``reaper/_migrations`` inside an installed wheel (pyproject maps one to the other)."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "_migrations"
    if (shipped / "env.py").is_file():
        return shipped
    return package.parent / "alembic"


MIGRATIONS = _migrations_folder()
VERSION_TABLE = "reaper_alembic_version"
# The newest migration in alembic/versions (tests/unit check it against alembic's own head).
# A store already at this revision opens without importing alembic (~11 MB the service never needs).
HEAD_REVISION = "0004"


# --------------------------------------------------------------------------- engine


def normalize_url(url: str | URL) -> URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3 unless the URL names a driver
    return u


def sqlite_memory(u: URL) -> bool:
    db = u.database or ""
    return db in ("", ":memory:") or "mode=memory" in db


def make_engine(url: str | URL) -> Engine:
    """An engine set up for the reaper: WAL, busy timeout and BEGIN IMMEDIATE on SQLite."""
    u = normalize_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)

    memory = sqlite_memory(u)
    # How long a writer waits for another's lock (REAPER_SQLITE_BUSY_TIMEOUT seconds, default 30).
    busy_timeout_s = float(os.environ.get("REAPER_SQLITE_BUSY_TIMEOUT", "30"))
    busy_timeout_ms = int(busy_timeout_s * 1000)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": busy_timeout_s}}
    if memory:
        kwargs["poolclass"] = StaticPool  # one database shared by every thread (tests)
    engine = create_engine(u, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite's own BEGIN handling off: we emit BEGIN below
        cur = dbapi_conn.cursor()
        try:
            # The busy timeout first: switching to WAL needs a moment of exclusive access, and two
            # reapers started together on a new file must wait for each other, not fail.
            cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            if not memory:
                for attempt in range(50):
                    try:
                        cur.execute("PRAGMA journal_mode=WAL")
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e) or attempt == 49:
                            raise
                        time.sleep(0.1)
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # 256 KiB of page cache per connection instead of SQLite's 2 MB: lookups go through
            # indexes, and the OS caches the file anyway (-3 MB of peak RSS at 10,000 servers)
            cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get("reaper_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def ensure_sqlite_folder(u: URL) -> None:
    if u.get_backend_name() != "sqlite" or sqlite_memory(u):
        return
    db = u.database or ""
    if db.startswith("file:"):
        return
    Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def upgrade_in_child(u: URL) -> None:
    """Migrate to head in a child interpreter (``reaper db upgrade``'s code): the URL goes by
    environment, never on a command line that ``ps`` shows."""
    import subprocess
    import sys

    env = {**os.environ, "REAPER_MIGRATE_URL": u.render_as_string(hide_password=False)}
    code = "import os; from reaper.store import Store; Store.open(os.environ['REAPER_MIGRATE_URL']).close()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError("database migration failed: " + " | ".join(tail))


# --------------------------------------------------------------------------- JSON columns


def jsonable(value: Any) -> Any:
    """Plain JSON (datetimes and other objects as strings) so any dict can be stored."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


# --------------------------------------------------------------------------- the database


class Database:
    """One engine and how the repositories use it: short read and write transactions, the
    dialect's insert (for ON CONFLICT) and the schema's migrations."""

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}: use SQLite or PostgreSQL")
        self.engine = engine
        self.dialect = engine.dialect.name
        self._rw = engine.execution_options(reaper_write=True)
        memory = self.dialect == "sqlite" and sqlite_memory(engine.url)
        # An in-memory SQLite is one connection: serialize its users.
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if memory else contextlib.nullcontext()
        )

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        with self._lock, self._rw.begin() as s:
            yield s

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self._lock, self.engine.begin() as s:
            yield s

    def insert(self, table: Table) -> Any:
        """The dialect's INSERT (it has ``on_conflict_do_nothing``)."""
        if self.dialect == "postgresql":
            # imported here: the PostgreSQL dialect costs 2.3 MB a SQLite service would hold for nothing
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        return sqlite_insert(table)

    # ------------------------------------------------------------ migrations

    def _alembic(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("path_separator", "os")
        url = self.engine.url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        with self._lock, self._rw.begin() as conn:
            cfg = self._alembic()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def downgrade(self, revision: str) -> None:
        from alembic import command

        with self._lock, self._rw.begin() as conn:
            cfg = self._alembic()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)

    def stored_revision(self) -> str | None:
        """The schema revision recorded in the database (None for a new one), read without
        alembic; several heads (never made by this project) read as None, so alembic decides."""
        with self._lock, self.engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            revs = [r[0] for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
        return revs[0] if len(revs) == 1 else None

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._lock, self.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return ctx.get_current_revision()
