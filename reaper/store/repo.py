"""The store's repository: every read and write the reaper does, each in one short transaction.

Synchronous SQLAlchemy; the async service calls it through ``asyncio.to_thread``. A ``Store`` is
safe to share between threads: each call takes its own connection from the pool and holds it only
for its one transaction.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool

from ..core.model import Decision, History, NoticeKind, Observation, RunKey, SentNotice
from .models import (
    ACTIONS,
    DECISIONS,
    DELIVERIES,
    LEASES,
    NOTICES,
    RUNS,
    SLACK_LOOKUPS,
    SWEEPS,
    as_utc,
    spell_key,
)

SQLITE_CACHE_KIB = 256  # each connection's page cache (PRAGMA cache_size), in KiB
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "reaper_alembic_version"
# The newest migration in migrations/versions (tests/unit check it against alembic's own head).
# A store already at this revision opens without importing alembic (~11 MB the service never needs).
HEAD_REVISION = "0002"
DEFAULT_LEASE = "reaper"
# Notices of these kinds go out at most once per spell (run-wide when the spell is None): seq 0.
# Reminders are numbered 1..n within their spell.
_NUMBERED = {NoticeKind.REMINDER}
_SLICE = 100  # rows per statement when a sweep records many: their parameters are built per slice
_CHUNK = 400  # runs per IN (...) query: 3 parameters each, far below SQLite's limit
_WHOLE_SWEEP = 2000  # more runs than this at once: read all open runs instead of looking each up
# (a sweep reads its histories a batch of 1,000 at a time: those go through the index)

_LOOKUP_COLS = tuple(
    RUNS.c[name]
    for name in ("id", "user", "server", "started", "action", "state", "rule", "first_seen", "kept_until",
                 "stop_requested_at", "last_seen", "detached_since", "detail")
)  # what run lookups need: not the reasons and options of 10,000 runs


@dataclass(frozen=True)
class StopRecord:
    """One stop's outcome, for :meth:`Store.record_stops`."""

    run: RunKey
    kind: str  # stop | stop-pending | stop-failed
    ok: bool
    detail: str
    job_id: str | None = None
    actor: str = "reaper"
    end_reason: str | None = None  # set when the run ended (stopped or gone)
    notice_context: dict[str, Any] | None = None  # set to queue the "stopped" notice
    channels: tuple[str, ...] = ("log",)


@dataclass(frozen=True)
class Delivery:
    """One notice due on one channel (what a channel's ``deliver`` gets)."""

    id: int
    notice_id: int
    run: RunKey
    kind: NoticeKind
    channel: str
    attempts: int  # failed attempts so far
    context: dict[str, Any] = field(default_factory=dict)
    spell: datetime | None = None
    created_at: datetime | None = None


# --------------------------------------------------------------------------- engine


def _normalize_url(url: str | URL) -> URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3 unless the URL names a driver
    return u


def _sqlite_memory(u: URL) -> bool:
    db = u.database or ""
    return db in ("", ":memory:") or "mode=memory" in db


def make_engine(url: str | URL) -> Engine:
    """An engine set up for the reaper: WAL, busy timeout and BEGIN IMMEDIATE on SQLite."""
    u = _normalize_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)

    memory = _sqlite_memory(u)
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


def _near(keys: Sequence[tuple[str, str, datetime]]) -> tuple[Any, Any]:
    """Conditions that find these runs (and few others) through the runs' unique index: by user,
    then start time. SQLite answers a row-value ``IN (VALUES ...)`` with a scan of the whole
    table; the caller keeps the exact keys among the rows found."""
    return RUNS.c.user.in_(sorted({k[0] for k in keys})), RUNS.c.started.in_(sorted({k[2] for k in keys}))


def _upgrade_in_child(u: URL) -> None:
    """Migrate to head in a child interpreter (``reaper db upgrade``'s code): the URL goes by
    environment, never on a command line that ``ps`` shows."""
    import subprocess
    import sys

    env = {**os.environ, "REAPER_MIGRATE_URL": u.render_as_string(hide_password=False)}
    code = "import os; from reaper.store.repo import Store; Store.open(os.environ['REAPER_MIGRATE_URL']).close()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError("database migration failed: " + " | ".join(tail))


def _ensure_sqlite_folder(u: URL) -> None:
    if u.get_backend_name() != "sqlite" or _sqlite_memory(u):
        return
    db = u.database or ""
    if db.startswith("file:"):
        return
    Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


def _jsonable(value: Any) -> Any:
    """Plain JSON (datetimes and other objects as strings) so any dict can be stored."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else as_utc(t).isoformat()


def notice_context(obs: Observation, decision: Decision, now: datetime) -> dict[str, Any]:
    """What a notice recorded with a decision carries for its templates (JSON-able; times ISO 8601 UTC)."""
    s = obs.server
    idle_since = obs.idle_since
    return {
        "user": s.user,
        "server": s.name,
        "started": _iso(s.started),
        "url": s.url,
        "job_id": s.job_id,
        "spawner_state": {k: v for k, v in (s.state or {}).items() if k in ("job_id", "job_status", "node", "exechost")},
        "user_options": s.user_options,
        "state": obs.state.value,
        "detail": obs.detail,
        "last_activity": _iso(obs.last_activity),
        "detached_since": _iso(obs.detached_since),
        "idle_since": _iso(idle_since),
        "job_end": _iso(obs.job_end),
        "action": decision.action.value,
        "reason": decision.reason,
        "rule": decision.rule,
        "spell": _iso(decision.spell),
        "stop_at": _iso(decision.stop_at),
        "next_at": _iso(decision.next_at),
        "created_at": _iso(now),
    }


# --------------------------------------------------------------------------- the store


class Store:
    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}: use SQLite or PostgreSQL")
        self.engine = engine
        self.dialect = engine.dialect.name
        self._rw = engine.execution_options(reaper_write=True)
        memory = self.dialect == "sqlite" and _sqlite_memory(engine.url)
        # An in-memory SQLite is one connection: serialize its users.
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if memory else contextlib.nullcontext()
        )

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True, isolated: bool = False) -> Store:
        """Open (creating the SQLite file's folder) and, unless told not to, migrate to head.

        A database already at head is only checked (one query), without alembic. ``isolated``
        (the service): a migration that is needed runs in a child interpreter, so the long-lived
        process never loads alembic; an in-memory database has no other process to share it and
        is migrated here."""
        u = _normalize_url(url)
        _ensure_sqlite_folder(u)
        store = cls(make_engine(u))
        if upgrade:
            try:
                if store.stored_revision() != HEAD_REVISION:
                    if isolated and not _sqlite_memory(u):
                        _upgrade_in_child(u)
                    else:
                        store.upgrade()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)})"

    # ------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._lock, self._rw.begin() as s:
            yield s

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, self.engine.begin() as s:
            yield s

    def _insert(self, table: Table) -> Any:
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

    # ------------------------------------------------------------ runs

    def _select_runs(self, s: Connection, keys: Sequence[tuple[str, str, datetime]], *, lock: bool) -> list[Any]:
        rows: list[Any] = []
        if len(keys) > _WHOLE_SWEEP:
            # A whole sweep's worth: its runs are (nearly) all the open runs, read in one query.
            wanted = set(keys)
            q = select(*_LOOKUP_COLS).where(RUNS.c.ended_at.is_(None))
            if lock and self.dialect == "postgresql":
                q = q.order_by(RUNS.c.id).with_for_update()
            rows = [r for r in s.execute(q) if (r.user, r.server, r.started) in wanted]
            found = {(r.user, r.server, r.started) for r in rows}
            keys = [k for k in keys if k not in found]
        # the others through the unique index, a chunk at a time (see _near)
        wanted_left = set(keys)
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            q = select(*_LOOKUP_COLS).where(*_near(chunk))
            if lock and self.dialect == "postgresql":
                q = q.order_by(RUNS.c.id).with_for_update()
            rows.extend(r for r in s.execute(q) if (r.user, r.server, r.started) in wanted_left)
        return rows

    def _runs_for(
        self,
        s: Connection,
        keys: Iterable[tuple[str, str, datetime]],
        now: datetime,
        *,
        create: bool,
        lock: bool,
    ) -> dict[tuple[str, str, datetime], Any]:
        """The rows of these runs (by normalized key), creating missing ones when asked."""
        wanted = sorted(set(keys))
        found = {(r.user, r.server, r.started): r for r in self._select_runs(s, wanted, lock=lock)}
        missing = [k for k in wanted if k not in found]
        if missing and create:
            s.execute(
                self._insert(RUNS).on_conflict_do_nothing(index_elements=["user", "server", "started"]),
                [
                    {"user": u, "server": n, "started": st, "first_seen": now, "last_seen": now}
                    for (u, n, st) in missing
                ],
            )
            for r in self._select_runs(s, missing, lock=lock):
                found[(r.user, r.server, r.started)] = r
        return found

    @staticmethod
    def _key(run: RunKey) -> tuple[str, str, datetime]:
        return (run.user, run.server, as_utc(run.started))

    def _run_id(self, s: Connection, run: RunKey, now: datetime, *, create: bool = True) -> int | None:
        k = self._key(run)
        row = self._runs_for(s, [k], now, create=create, lock=False).get(k)
        return None if row is None else int(row.id)

    def could_stop_runs(self, runs: Iterable[RunKey]) -> set[RunKey]:
        """The runs among ``runs`` whose history policy.could_stop accepts (a final notice that
        was delivered, or failed), in one query instead of reading every history."""
        by_key = {self._key(k): k for k in runs}
        keys = list(by_key)
        out: set[RunKey] = set()
        with self._read() as s:
            for i in range(0, len(keys), _CHUNK):  # through the runs' unique index, as _select_runs
                chunk = keys[i : i + _CHUNK]
                q = (
                    select(RUNS.c.user, RUNS.c.server, RUNS.c.started)
                    .join(NOTICES, NOTICES.c.run_id == RUNS.c.id)
                    .where(
                        *_near(chunk),
                        NOTICES.c.kind == NoticeKind.FINAL.value,
                        or_(NOTICES.c.delivered_at.is_not(None), NOTICES.c.failed.is_(True)),
                    )
                    .distinct()
                )
                for r in s.execute(q):
                    k = by_key.get((r.user, r.server, as_utc(r.started)))
                    if k is not None:
                        out.add(k)
        return out

    def histories(self, runs: Iterable[RunKey]) -> dict[RunKey, History]:
        asked = list(dict.fromkeys(runs))
        out: dict[RunKey, History] = {k: History() for k in asked}
        if not asked:
            return out
        by_key = {self._key(k): k for k in asked}
        with self._read() as s:
            rows = self._select_runs(s, list(by_key), lock=False)
            ids = {int(r.id): r for r in rows}
            notices: dict[int, list[SentNotice]] = {i: [] for i in ids}
            id_list = list(ids)
            for i in range(0, len(id_list), 1000):
                q = (
                    select(NOTICES)
                    .where(NOTICES.c.run_id.in_(id_list[i : i + 1000]))
                    .order_by(NOTICES.c.created_at, NOTICES.c.id)
                )
                for n in s.execute(q):
                    notices[int(n.run_id)].append(
                        SentNotice(
                            kind=NoticeKind(n.kind),
                            spell=n.spell,
                            created_at=n.created_at,
                            delivered_at=n.delivered_at,
                            failed=bool(n.failed),
                            failed_at=n.failed_at,
                        )
                    )
        for r in rows:
            key = by_key[(r.user, r.server, r.started)]
            out[key] = History(
                first_seen=r.first_seen,
                notices=tuple(notices[int(r.id)]),
                kept_until=r.kept_until,
                stop_requested_at=r.stop_requested_at,
                last_state=r.state,
                last_seen=r.last_seen,
                detached_since=r.detached_since,
                last_detail=r.detail,
            )
        return out

    def record(self, obs: Observation, decision: Decision, now: datetime) -> int | None:
        """Record one observation and its decision; queue its notice. Returns the new notice's id,
        or None when there is no notice or it was already recorded."""
        return self.record_many([(obs, decision)], now)[0]

    def record_many(self, items: list[tuple[Observation, Decision]], now: datetime) -> list[int | None]:
        """Record a sweep's observations and decisions in one transaction (see :meth:`record`)."""
        now = as_utc(now)
        results: list[int | None] = [None] * len(items)
        keyed = [(i, obs.server.run_key(), obs, dec) for i, (obs, dec) in enumerate(items)]
        keyed = [(i, k, o, d) for (i, k, o, d) in keyed if k is not None]
        if not keyed:
            return results
        with self._write() as s:
            rows = self._runs_for(s, (self._key(k) for _, k, _, _ in keyed), now, create=True, lock=True)
            prev: dict[int, tuple[str | None, str | None, str | None]] = {
                int(r.id): (r.action, r.state, r.rule) for r in rows.values()
            }
            for c in range(0, len(keyed), _SLICE):  # in slices: the rows' parameters are not all in memory at once
                self._record_slice(s, keyed[c : c + _SLICE], rows, prev, now, results)
            return results

    def _record_slice(
        self,
        s: Connection,
        keyed: list[tuple[int, RunKey, Observation, Decision]],
        rows: dict[tuple[str, str, datetime], Any],
        prev: dict[int, tuple[str | None, str | None, str | None]],
        now: datetime,
        results: list[int | None],
    ) -> None:
        updates: list[dict[str, Any]] = []
        log: list[dict[str, Any]] = []
        notices: list[tuple[int, int, Observation, Decision]] = []
        for i, key, obs, dec in keyed:
            run_id = int(rows[self._key(key)].id)
            now_vals = (dec.action.value, obs.state.value, dec.rule)
            updates.append(
                {
                    "b_id": run_id,
                    "last_seen": now,
                    "ended_at": None,
                    "end_reason": None,
                    "state": obs.state.value,
                    "last_activity": obs.last_activity,
                    "detached_since": obs.detached_since,
                    "job_id": obs.job_id,
                    "user_options": _jsonable(obs.server.user_options or {}),
                    "detail": obs.detail,
                    "action": dec.action.value,
                    "reason": dec.reason,
                    "rule": dec.rule,
                    "spell": dec.spell,
                    "stop_at": dec.stop_at,
                    "next_at": dec.next_at,
                }
            )
            if prev.get(run_id) != now_vals:
                log.append(
                    {
                        "run_id": run_id,
                        "at": now,
                        "state": obs.state.value,
                        "action": dec.action.value,
                        "rule": dec.rule,
                        "reason": dec.reason,
                        "spell": dec.spell,
                        "stop_at": dec.stop_at,
                        "next_at": dec.next_at,
                    }
                )
                prev[run_id] = now_vals
            if dec.notice is not None:
                notices.append((i, run_id, obs, dec))
        cols = {k: k for k in updates[0] if k != "b_id"}
        s.execute(
            update(RUNS).where(RUNS.c.id == bindparam("b_id")).values({k: bindparam(k) for k in cols}),
            updates,
        )
        if log:
            s.execute(DECISIONS.insert(), log)
        ids = self._add_notices(
            s,
            [(run_id, dec.notice, dec.spell, list(dec.channels), notice_context(obs, dec, now))  # type: ignore[misc]
             for _, run_id, obs, dec in notices],
            now,
        )
        for (i, _, _, _), nid in zip(notices, ids, strict=True):
            results[i] = nid

    def _add_notices(
        self,
        s: Connection,
        specs: Sequence[tuple[int, NoticeKind, datetime | None, list[str], dict[str, Any]]],
        now: datetime,
    ) -> list[int | None]:
        """_add_notice for many notices: one multi-row INSERT for the notices and one for their
        deliveries (a sweep that stops 10,000 servers queues 10,000 notices). Numbered kinds
        (reminders) look at their earlier ones and go one by one."""
        out: list[int | None] = [None] * len(specs)
        where: dict[tuple[int, str, str], int] = {}
        stmt = (
            self._insert(NOTICES)
            .on_conflict_do_nothing(index_elements=["run_id", "kind", "spell_key", "seq"])
            .returning(NOTICES.c.id, NOTICES.c.run_id, NOTICES.c.kind, NOTICES.c.spell_key)
        )
        # in slices: every notice's context (a dict of ~20 entries) is built only for its slice
        for c in range(0, len(specs), _SLICE):
            rows: list[dict[str, Any]] = []
            for i in range(c, min(c + _SLICE, len(specs))):
                run_id, kind, spell, channels, context = specs[i]
                kind = NoticeKind(kind)
                if kind in _NUMBERED:
                    out[i] = self._add_notice(s, run_id, kind, spell, now, channels, context)
                    continue
                skey = spell_key(spell)
                if (run_id, kind.value, skey) in where:  # the same notice twice in one batch: once
                    continue
                where[(run_id, kind.value, skey)] = i
                rows.append({"run_id": run_id, "kind": kind.value, "spell": spell, "spell_key": skey, "seq": 0,
                             "created_at": now, "channels": list(dict.fromkeys(channels)) or ["log"],
                             "context": _jsonable(context), "failed": False})
            if not rows:
                continue
            deliveries: list[dict[str, Any]] = []
            for r in s.execute(stmt, rows):
                i = where[(int(r.run_id), r.kind, r.spell_key)]
                out[i] = int(r.id)
                for ch in list(dict.fromkeys(specs[i][3])) or ["log"]:
                    deliveries.append({"notice_id": int(r.id), "channel": ch, "status": "pending", "attempts": 0,
                                       "next_attempt_at": now, "updated_at": now})
            if deliveries:
                s.execute(DELIVERIES.insert(), deliveries)
        return out

    def _add_notice(
        self,
        s: Connection,
        run_id: int,
        kind: NoticeKind,
        spell: datetime | None,
        now: datetime,
        channels: list[str],
        context: dict[str, Any],
    ) -> int | None:
        kind = NoticeKind(kind)
        skey = spell_key(spell)
        if kind in _NUMBERED:
            earlier = (
                s.execute(
                    select(NOTICES.c.created_at).where(
                        NOTICES.c.run_id == run_id,
                        NOTICES.c.kind == kind.value,
                        NOTICES.c.spell_key == skey,
                    )
                )
                .scalars()
                .all()
            )
            if any(t >= now for t in earlier):
                return None  # this reminder was already recorded (the same decision, recorded again)
            seq = len(earlier) + 1
        else:
            seq = 0
        nid = s.execute(
            self._insert(NOTICES)
            .values(
                run_id=run_id,
                kind=kind.value,
                spell=spell,
                spell_key=skey,
                seq=seq,
                created_at=now,
                channels=list(dict.fromkeys(channels)) or ["log"],
                context=_jsonable(context),
                failed=False,
            )
            .on_conflict_do_nothing(index_elements=["run_id", "kind", "spell_key", "seq"])
            .returning(NOTICES.c.id)
        ).scalar_one_or_none()
        if nid is None:
            return None
        s.execute(
            DELIVERIES.insert(),
            [
                {
                    "notice_id": nid,
                    "channel": ch,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "updated_at": now,
                }
                for ch in (list(dict.fromkeys(channels)) or ["log"])
            ],
        )
        return int(nid)

    def add_notice(
        self,
        run: RunKey,
        kind: NoticeKind,
        spell: datetime | None,
        now: datetime,
        *,
        channels: list[str],
        context: dict[str, Any],
    ) -> int | None:
        """Queue a notice outside a sweep's decision ('stopped', 'orphan'); idempotent like record()."""
        now = as_utc(now)
        with self._write() as s:
            run_id = self._run_id(s, run, now)
            assert run_id is not None
            return self._add_notice(s, run_id, NoticeKind(kind), spell, now, channels, context)

    # ------------------------------------------------------------ the outbox

    def due_deliveries(self, now: datetime, limit: int = 100) -> list[Delivery]:
        q = (
            select(
                DELIVERIES.c.id,
                DELIVERIES.c.notice_id,
                DELIVERIES.c.channel,
                DELIVERIES.c.attempts,
                NOTICES.c.kind,
                NOTICES.c.context,
                NOTICES.c.spell,
                NOTICES.c.created_at,
                RUNS.c.user,
                RUNS.c.server,
                RUNS.c.started,
            )
            .join(NOTICES, NOTICES.c.id == DELIVERIES.c.notice_id)
            .join(RUNS, RUNS.c.id == NOTICES.c.run_id)
            .where(DELIVERIES.c.status == "pending", DELIVERIES.c.next_attempt_at <= now)
            .order_by(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id)
            .limit(limit)
        )
        with self._read() as s:
            return [
                Delivery(
                    id=int(r.id),
                    notice_id=int(r.notice_id),
                    run=RunKey(r.user, r.server, r.started),
                    kind=NoticeKind(r.kind),
                    channel=r.channel,
                    attempts=int(r.attempts),
                    context=dict(r.context or {}),
                    spell=r.spell,
                    created_at=r.created_at,
                )
                for r in s.execute(q)
            ]

    def mark_delivered(self, delivery_id: int, now: datetime) -> None:
        self.mark_delivered_many([(delivery_id, now)])

    def mark_delivered_many(self, items: Sequence[tuple[int, datetime]]) -> None:
        """Deliveries done, each at its own time, in one transaction. A notice is delivered when
        its first channel delivers it (a second channel keeps the first time)."""
        by_time: dict[datetime, list[int]] = {}
        for delivery_id, at in items:
            by_time.setdefault(at, []).append(int(delivery_id))
        with self._write() as s:
            for at, ids in sorted(by_time.items()):
                for i in range(0, len(ids), 500):
                    nids = s.execute(
                        update(DELIVERIES)
                        .where(DELIVERIES.c.id.in_(ids[i : i + 500]), DELIVERIES.c.status == "pending")
                        .values(status="delivered", delivered_at=at, updated_at=at, next_attempt_at=None)
                        .returning(DELIVERIES.c.notice_id)
                    ).scalars().all()
                    if nids:
                        s.execute(
                            update(NOTICES)
                            .where(NOTICES.c.id.in_(sorted(set(nids))), NOTICES.c.delivered_at.is_(None))
                            .values(delivered_at=at)
                        )

    def mark_failed(
        self,
        delivery_id: int,
        now: datetime,
        error: str,
        *,
        permanent: bool,
        retry_at: datetime | None,
    ) -> None:
        """A failed attempt. Temporary: pending again at ``retry_at`` (default now). Permanent: the
        delivery is failed; when every channel of the notice failed so, the notice is failed."""
        with self._write() as s:
            values: dict[str, Any] = {
                "attempts": DELIVERIES.c.attempts + 1,
                "last_error": error[:4000],
                "updated_at": now,
            }
            if permanent:
                values.update(status="failed", next_attempt_at=None)
            else:
                values.update(next_attempt_at=retry_at or now)
            nid = s.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == delivery_id, DELIVERIES.c.status == "pending")
                .values(values)
                .returning(DELIVERIES.c.notice_id)
            ).scalar_one_or_none()
            if nid is None or not permanent:
                return
            statuses = (
                s.execute(select(DELIVERIES.c.status).where(DELIVERIES.c.notice_id == nid)).scalars().all()
            )
            if statuses and all(st == "failed" for st in statuses):
                s.execute(
                    update(NOTICES)
                    .where(NOTICES.c.id == nid, NOTICES.c.failed.is_(False))
                    .values(failed=True, failed_at=now)
                )

    def outbox_depth(self) -> int:
        with self._read() as s:
            return int(
                s.execute(
                    select(func.count()).select_from(DELIVERIES).where(DELIVERIES.c.status == "pending")
                ).scalar_one()
            )

    # ------------------------------------------------------------ actions and run state

    def record_action(
        self,
        run: RunKey | None,
        kind: str,
        ok: bool,
        detail: str,
        now: datetime,
        *,
        actor: str = "reaper",
        job_id: str | None = None,
    ) -> int:
        now = as_utc(now)
        with self._write() as s:
            run_id = self._run_id(s, run, now) if run is not None else None
            return int(
                s.execute(
                    ACTIONS.insert()
                    .values(
                        run_id=run_id, at=now, kind=kind, ok=ok, detail=detail, actor=actor, job_id=job_id
                    )
                    .returning(ACTIONS.c.id)
                ).scalar_one()
            )

    def set_kept_until(self, run: RunKey, until: datetime | None, *, by: str, now: datetime) -> None:
        """A "keep running until": the policy sends nothing and stops nothing for this run until then."""
        now = as_utc(now)
        with self._write() as s:
            run_id = self._run_id(s, run, now)
            s.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(kept_until=until, kept_by=by if until is not None else None)
            )

    def mark_stop_requested(self, run: RunKey, now: datetime) -> None:
        now = as_utc(now)
        with self._write() as s:
            run_id = self._run_id(s, run, now)
            s.execute(update(RUNS).where(RUNS.c.id == run_id).values(stop_requested_at=now))

    def mark_stops_requested(self, runs: Iterable[RunKey], now: datetime) -> None:
        """mark_stop_requested for many runs in one transaction (the intent, written before the stops)."""
        now = as_utc(now)
        keys = list(dict.fromkeys(self._key(r) for r in runs))
        if not keys:
            return
        with self._write() as s:
            # The runs a sweep stops were recorded by that sweep: one UPDATE per run through the
            # unique index, no read first. A run missing from the store is created, then marked.
            done = s.execute(
                update(RUNS)
                .where(RUNS.c.user == bindparam("k_user"), RUNS.c.server == bindparam("k_server"),
                       RUNS.c.started == bindparam("k_started"))
                .values(stop_requested_at=now),
                [{"k_user": u, "k_server": n, "k_started": st} for u, n, st in keys],
            )
            if done.rowcount == len(keys):
                return
            rows = self._runs_for(s, keys, now, create=True, lock=True)
            ids = [int(rows[k].id) for k in keys]
            for i in range(0, len(ids), 500):
                s.execute(update(RUNS).where(RUNS.c.id.in_(ids[i : i + 500])).values(stop_requested_at=now))

    def record_stops(self, items: Iterable[StopRecord], now: datetime) -> list[int | None]:
        """The outcome of many stops in one transaction: for each, its action row; for each done
        stop, the end of the run and the "stopped" notice (idempotent). Returns the notice ids."""
        now = as_utc(now)
        items = list(items)
        if not items:
            return []
        with self._write() as s:
            rows = self._runs_for(s, [self._key(it.run) for it in items], now, create=True, lock=True)
            actions = []
            ended = []
            for it in items:
                run_id = int(rows[self._key(it.run)].id)
                actions.append({"run_id": run_id, "at": now, "kind": it.kind, "ok": it.ok, "detail": it.detail,
                                "actor": it.actor, "job_id": it.job_id})
                if it.end_reason is not None:
                    ended.append((run_id, it.end_reason))
            s.execute(ACTIONS.insert(), actions)
            failed = [int(rows[self._key(it.run)].id) for it in items if it.kind == "stop-failed"]
            if failed:  # the hub refused: nothing is pending, the next sweep may ask again
                s.execute(update(RUNS).where(RUNS.c.id.in_(failed)).values(stop_requested_at=None))
            by_reason: dict[str, list[int]] = {}
            for run_id, reason in ended:
                by_reason.setdefault(reason, []).append(run_id)
            for reason, ids in by_reason.items():
                for i in range(0, len(ids), 500):
                    s.execute(
                        update(RUNS).where(RUNS.c.id.in_(ids[i : i + 500]), RUNS.c.ended_at.is_(None))
                        .values(ended_at=now, end_reason=reason)
                    )
            with_notice = [it for it in items if it.notice_context is not None]
            notice_ids = iter(self._add_notices(
                s,
                [(int(rows[self._key(it.run)].id), NoticeKind.STOPPED, None, list(it.channels), it.notice_context)
                 for it in with_notice],  # type: ignore[misc]
                now,
            ))
            return [next(notice_ids) if it.notice_context is not None else None for it in items]

    def end_run(self, run: RunKey, now: datetime, reason: str) -> None:
        """The server is no longer on the hub: the run ends (recording it again reopens it)."""
        with self._write() as s:
            user, server, started = self._key(run)
            s.execute(
                update(RUNS)
                .where(
                    RUNS.c.user == user,
                    RUNS.c.server == server,
                    RUNS.c.started == started,
                    RUNS.c.ended_at.is_(None),
                )
                .values(ended_at=now, end_reason=reason)
            )

    def open_runs(self) -> list[RunKey]:
        with self._read() as s:
            q = (
                select(RUNS.c.user, RUNS.c.server, RUNS.c.started)
                .where(RUNS.c.ended_at.is_(None))
                .order_by(RUNS.c.id)
            )
            return [RunKey(r.user, r.server, r.started) for r in s.execute(q)]

    # ------------------------------------------------------------ reports

    def recent_actions(self, since: datetime, limit: int = 200) -> list[dict[str, Any]]:
        q = (
            select(ACTIONS, RUNS.c.user, RUNS.c.server, RUNS.c.started, RUNS.c.user_options)
            .outerjoin(RUNS, RUNS.c.id == ACTIONS.c.run_id)
            .where(ACTIONS.c.at >= since)
            .order_by(ACTIONS.c.at.desc(), ACTIONS.c.id.desc())
            .limit(limit)
        )
        with self._read() as s:
            return [
                {
                    "id": r.id,
                    "at": r.at,
                    "user": r.user,
                    "server": r.server,
                    "started": r.started,
                    "kind": r.kind,
                    "ok": bool(r.ok),
                    "detail": r.detail,
                    "actor": r.actor,
                    "job_id": r.job_id,
                    "user_options": r.user_options or {},
                }
                for r in s.execute(q)
            ]

    def recent_notices(self, since: datetime, limit: int = 200) -> list[dict[str, Any]]:
        q = (
            select(NOTICES, RUNS.c.user, RUNS.c.server, RUNS.c.started)
            .join(RUNS, RUNS.c.id == NOTICES.c.run_id)
            .where(NOTICES.c.created_at >= since)
            .order_by(NOTICES.c.created_at.desc(), NOTICES.c.id.desc())
            .limit(limit)
        )
        with self._read() as s:
            rows = s.execute(q).all()
            per: dict[int, list[dict[str, Any]]] = {int(r.id): [] for r in rows}
            if per:
                dq = (
                    select(DELIVERIES)
                    .where(DELIVERIES.c.notice_id.in_(list(per)))
                    .order_by(DELIVERIES.c.id)
                )
                for d in s.execute(dq):
                    per[int(d.notice_id)].append(
                        {
                            "channel": d.channel,
                            "status": d.status,
                            "attempts": d.attempts,
                            "last_error": d.last_error,
                            "delivered_at": d.delivered_at,
                            "next_attempt_at": d.next_attempt_at,
                        }
                    )
        return [
            {
                "id": r.id,
                "user": r.user,
                "server": r.server,
                "started": r.started,
                "kind": r.kind,
                "spell": r.spell,
                "seq": r.seq,
                "created_at": r.created_at,
                "delivered_at": r.delivered_at,
                "failed": bool(r.failed),
                "failed_at": r.failed_at,
                "status": "delivered" if r.delivered_at else ("failed" if r.failed else "pending"),
                "channels": list(r.channels or []),
                "deliveries": per[int(r.id)],
                "reason": (r.context or {}).get("reason"),
            }
            for r in rows
        ]

    def runs_overview(self) -> list[dict[str, Any]]:
        """The latest state of every open run, ordered by user and server (times are aware datetimes)."""
        q = (
            select(RUNS)
            .where(RUNS.c.ended_at.is_(None))
            .order_by(RUNS.c.user, RUNS.c.server, RUNS.c.started)
        )
        with self._read() as s:
            return [dict(r._mapping) for r in s.execute(q)]

    # ------------------------------------------------------------ sweeps

    def start_sweep(self, now: datetime, *, dry_run: bool) -> int:
        with self._write() as s:
            return int(
                s.execute(
                    SWEEPS.insert().values(started_at=now, dry_run=dry_run).returning(SWEEPS.c.id)
                ).scalar_one()
            )

    def finish_sweep(self, sweep_id: int, now: datetime, ok: bool, summary: dict[str, Any]) -> None:
        with self._write() as s:
            s.execute(
                update(SWEEPS)
                .where(SWEEPS.c.id == sweep_id)
                .values(finished_at=now, ok=ok, summary=_jsonable(summary))
            )

    def last_successful_sweep(self) -> datetime | None:
        with self._read() as s:
            t = s.execute(select(func.max(SWEEPS.c.finished_at)).where(SWEEPS.c.ok.is_(True))).scalar_one()
        if t is None:
            return None
        # func.max() loses the column type on some dialects: coerce back to aware UTC
        if isinstance(t, str):
            t = datetime.fromisoformat(t)
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)

    # ------------------------------------------------------------ single active reaper

    def acquire_lease(self, holder: str, now: datetime, ttl: timedelta, *, name: str = DEFAULT_LEASE) -> bool:
        """Take or renew the lease. True when ``holder`` holds it until now + ttl; False when another
        holder's lease has not expired. Atomic on both databases (insert-or-nothing, then a
        conditional update of the one row)."""
        now = as_utc(now)
        until = now + ttl
        with self._write() as s:
            ins = s.execute(
                self._insert(LEASES)
                .values(name=name, holder=holder, acquired_at=now, expires_at=until)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            if ins.rowcount == 1:
                return True
            upd = s.execute(
                update(LEASES)
                .where(LEASES.c.name == name, or_(LEASES.c.holder == holder, LEASES.c.expires_at <= now))
                .values(holder=holder, expires_at=until, acquired_at=now)
            )
            return upd.rowcount == 1

    # ------------------------------------------------------------ Slack lookups (cache)

    def slack_lookup(self, email: str, now: datetime) -> tuple[bool, str | None]:
        """(True, member id or None for "not on Slack") while a cached answer is fresh, else (False, None)."""
        now = as_utc(now)
        with self._read() as s:
            row = s.execute(select(SLACK_LOOKUPS.c.user_id, SLACK_LOOKUPS.c.expires_at).where(SLACK_LOOKUPS.c.email == email)).first()
        if row is None or row.expires_at <= now:
            return False, None
        return True, row.user_id

    def slack_remember(self, email: str, user_id: str | None, expires_at: datetime) -> None:
        expires_at = as_utc(expires_at)
        with self._write() as s:
            s.execute(SLACK_LOOKUPS.delete().where(SLACK_LOOKUPS.c.email == email))
            s.execute(SLACK_LOOKUPS.insert().values(email=email, user_id=user_id, expires_at=expires_at))

    def lease_holder(self, now: datetime, *, name: str = DEFAULT_LEASE) -> str | None:
        """Who holds an unexpired lease, if anyone."""
        now = as_utc(now)
        with self._read() as s:
            row = s.execute(select(LEASES.c.holder, LEASES.c.expires_at).where(LEASES.c.name == name)).first()
        if row is None or row.expires_at <= now:
            return None
        return str(row.holder)

    def release_lease(self, holder: str, *, name: str = DEFAULT_LEASE) -> None:
        """Give the lease up (on a clean shutdown) so another reaper can take over at once."""
        with self._write() as s:
            s.execute(LEASES.delete().where(LEASES.c.name == name, LEASES.c.holder == holder))
