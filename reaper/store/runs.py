"""Server runs and what was observed of them: histories, recording a sweep's observations and
decisions (with their notices), keeps, stop intents and outcomes, the end of a run.

One server run is (user, server name, started); a restarted server is a new run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.engine import Connection

from ..core.model import CpuSample, Decision, History, NoticeKind, Observation, RunKey, SentNotice, WorkMemory
from .context import NoticeContext, notice_context
from .db import Database, jsonable
from .models import ACTIONS, DECISIONS, NOTICES, RUNS, as_utc
from .notices import NoticeSpec, queue_notices

Key = tuple[str, str, datetime]  # a run's key as stored: (user, server, started in UTC)

_SLICE = 100  # rows per statement when a sweep records many: their parameters are built per slice
_CHUNK = 400  # runs per IN (...) query: 3 parameters each, far below SQLite's limit
_WHOLE_SWEEP = 2000  # more runs than this at once: read all open runs instead of looking each up
# (a sweep reads its histories a batch of 1,000 at a time: those go through the index)

_LOOKUP_COLS = tuple(
    RUNS.c[name]
    for name in ("id", "user", "server", "started", "action", "state", "rule", "first_seen", "kept_until",
                 "stop_requested_at", "last_seen", "detached_since", "detail", "working_at", "cpu_samples")
)  # what run lookups need: not the reasons and options of 10,000 runs


@dataclass(frozen=True)
class StopRecord:
    """One stop's outcome, for :meth:`Runs.record_stops`."""

    run: RunKey
    kind: str  # stop | stop-pending | stop-failed
    ok: bool
    detail: str
    job_id: str | None = None
    actor: str = "reaper"
    end_reason: str | None = None  # set when the run ended (stopped or gone)
    notice_context: NoticeContext | None = None  # set to queue the "stopped" notice
    channels: tuple[str, ...] = ("log",)


# --------------------------------------------------------------------------- the work look's memory


def samples_json(memory: WorkMemory) -> list[list[Any]]:
    """CPU samples as stored: [key, cpu seconds, at, since, used_at or null] (times ISO, UTC)."""
    def iso(t: datetime | None) -> str | None:
        return as_utc(t).isoformat() if t is not None else None

    return [[s.key, s.cpu_seconds, iso(s.at), iso(s.since), iso(s.used_at)] for s in memory.samples]


def samples_from_json(value: Any) -> tuple[CpuSample, ...]:
    """The stored samples; an unreadable entry is dropped (its program is then seen afresh, which
    measures it since its start: over-protect, never under-)."""
    out: list[CpuSample] = []
    for item in value if isinstance(value, list) else ():
        try:
            key, cpu, at, since, used = item
            out.append(CpuSample(str(key), float(cpu), datetime.fromisoformat(at), datetime.fromisoformat(since),
                                 datetime.fromisoformat(used) if used is not None else None))
        except (TypeError, ValueError):
            continue
    return tuple(out)


# --------------------------------------------------------------------------- finding runs


def key_of(run: RunKey) -> Key:
    return (run.user, run.server, as_utc(run.started))


def near(keys: Sequence[Key]) -> tuple[Any, Any]:
    """Conditions that find these runs (and few others) through the runs' unique index: by user,
    then start time. SQLite answers a row-value ``IN (VALUES ...)`` with a scan of the whole
    table; the caller keeps the exact keys among the rows found."""
    return RUNS.c.user.in_(sorted({k[0] for k in keys})), RUNS.c.started.in_(sorted({k[2] for k in keys}))


def _select_runs(db: Database, s: Connection, keys: Sequence[Key], *, lock: bool) -> list[Any]:
    rows: list[Any] = []
    if len(keys) > _WHOLE_SWEEP:
        # A whole sweep's worth: its runs are (nearly) all the open runs, read in one query.
        wanted = set(keys)
        q = select(*_LOOKUP_COLS).where(RUNS.c.ended_at.is_(None))
        if lock and db.dialect == "postgresql":
            q = q.order_by(RUNS.c.id).with_for_update()
        rows = [r for r in s.execute(q) if (r.user, r.server, r.started) in wanted]
        found = {(r.user, r.server, r.started) for r in rows}
        keys = [k for k in keys if k not in found]
    # the others through the unique index, a chunk at a time (see near)
    wanted_left = set(keys)
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        q = select(*_LOOKUP_COLS).where(*near(chunk))
        if lock and db.dialect == "postgresql":
            q = q.order_by(RUNS.c.id).with_for_update()
        rows.extend(r for r in s.execute(q) if (r.user, r.server, r.started) in wanted_left)
    return rows


def runs_for(db: Database, s: Connection, keys: Iterable[Key], now: datetime, *, create: bool,
             lock: bool) -> dict[Key, Any]:
    """The rows of these runs (by stored key), creating missing ones when asked."""
    wanted = sorted(set(keys))
    found = {(r.user, r.server, r.started): r for r in _select_runs(db, s, wanted, lock=lock)}
    missing = [k for k in wanted if k not in found]
    if missing and create:
        s.execute(
            db.insert(RUNS).on_conflict_do_nothing(index_elements=["user", "server", "started"]),
            [{"user": u, "server": n, "started": st, "first_seen": now, "last_seen": now} for (u, n, st) in missing],
        )
        for r in _select_runs(db, s, missing, lock=lock):
            found[(r.user, r.server, r.started)] = r
    return found


def run_id(db: Database, s: Connection, run: RunKey, now: datetime) -> int:
    """The id of this run, created when the store has not seen it yet."""
    k = key_of(run)
    return int(runs_for(db, s, [k], now, create=True, lock=False)[k].id)


# --------------------------------------------------------------------------- the repository


class Runs:
    def __init__(self, db: Database) -> None:
        self.db = db

    def could_stop_runs(self, runs: Iterable[RunKey]) -> set[RunKey]:
        """The runs among ``runs`` whose history policy.could_stop accepts (a final notice that
        was delivered, or failed), in one query instead of reading every history. (A test proves
        it equal to could_stop over the histories.)"""
        by_key = {key_of(k): k for k in runs}
        keys = list(by_key)
        out: set[RunKey] = set()
        with self.db.read() as s:
            for i in range(0, len(keys), _CHUNK):  # through the runs' unique index, as _select_runs
                chunk = keys[i : i + _CHUNK]
                q = (
                    select(RUNS.c.user, RUNS.c.server, RUNS.c.started)
                    .join(NOTICES, NOTICES.c.run_id == RUNS.c.id)
                    .where(
                        *near(chunk),
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
        by_key = {key_of(k): k for k in asked}
        with self.db.read() as s:
            rows = _select_runs(self.db, s, list(by_key), lock=False)
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
                samples=samples_from_json(r.cpu_samples),
                working_at=r.working_at,
            )
        return out

    def record(self, obs: Observation, decision: Decision, now: datetime) -> int | None:
        """Record one observation and its decision; queue its notice. Returns the new notice's id,
        or None when there is no notice or it was already recorded."""
        return self.record_many([(obs, decision)], now)[0]

    def record_many(self, items: list[tuple[Observation, Decision]], now: datetime,
                    jobs: Mapping[str, Any] | None = None) -> list[int | None]:
        """Record a sweep's observations and decisions in one transaction (see :meth:`record`).
        ``jobs``: the batch jobs by id, so that a notice records what its server's job holds."""
        now = as_utc(now)
        results: list[int | None] = [None] * len(items)
        keyed = [(i, obs.server.run_key(), obs, dec) for i, (obs, dec) in enumerate(items)]
        keyed = [(i, k, o, d) for (i, k, o, d) in keyed if k is not None]
        if not keyed:
            return results
        with self.db.write() as s:
            rows = runs_for(self.db, s, (key_of(k) for _, k, _, _ in keyed), now, create=True, lock=True)
            prev: dict[int, tuple[str | None, str | None, str | None]] = {
                int(r.id): (r.action, r.state, r.rule) for r in rows.values()
            }
            for c in range(0, len(keyed), _SLICE):  # in slices: the rows' parameters are not all in memory at once
                self._record_slice(s, keyed[c : c + _SLICE], rows, prev, now, results, jobs)
            return results

    def _record_slice(
        self,
        s: Connection,
        keyed: list[tuple[int, RunKey, Observation, Decision]],
        rows: dict[Key, Any],
        prev: dict[int, tuple[str | None, str | None, str | None]],
        now: datetime,
        results: list[int | None],
        jobs: Mapping[str, Any] | None = None,
    ) -> None:
        updates: list[dict[str, Any]] = []
        log: list[dict[str, Any]] = []
        notices: list[tuple[int, NoticeSpec]] = []
        for i, key, obs, dec in keyed:
            run_id = int(rows[key_of(key)].id)
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
                    "user_options": jsonable(obs.server.user_options or {}),
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
                job = jobs.get(obs.job_id) if jobs is not None and obs.job_id else None  # what it holds
                notices.append((i, NoticeSpec(run_id, dec.notice, dec.spell, dec.channels,
                                              notice_context(obs, dec, now, job))))
        cols = {k: k for k in updates[0] if k != "b_id"}
        s.execute(
            update(RUNS).where(RUNS.c.id == bindparam("b_id")).values({k: bindparam(k) for k in cols}),
            updates,
        )
        # the work look's memory, for the observations that looked at the job's work (the others
        # leave the recorded one as it is)
        work = [{"b_id": int(rows[key_of(key)].id), "working_at": obs.memory.working_at,
                 "cpu_samples": samples_json(obs.memory)} for _, key, obs, _ in keyed if obs.memory is not None]
        if work:
            s.execute(update(RUNS).where(RUNS.c.id == bindparam("b_id"))
                      .values(working_at=bindparam("working_at"), cpu_samples=bindparam("cpu_samples")), work)
        if log:
            s.execute(DECISIONS.insert(), log)
        ids = queue_notices(self.db, s, [spec for _, spec in notices], now)
        for (i, _), nid in zip(notices, ids, strict=True):
            results[i] = nid

    def set_kept_until(self, run: RunKey, until: datetime | None, *, by: str, now: datetime) -> None:
        """A "keep running until": the policy sends nothing and stops nothing for this run until then."""
        now = as_utc(now)
        with self.db.write() as s:
            rid = run_id(self.db, s, run, now)
            s.execute(
                update(RUNS)
                .where(RUNS.c.id == rid)
                .values(kept_until=until, kept_by=by if until is not None else None)
            )

    def mark_stop_requested(self, run: RunKey, now: datetime) -> None:
        now = as_utc(now)
        with self.db.write() as s:
            rid = run_id(self.db, s, run, now)
            s.execute(update(RUNS).where(RUNS.c.id == rid).values(stop_requested_at=now))

    def mark_stops_requested(self, runs: Iterable[RunKey], now: datetime) -> None:
        """mark_stop_requested for many runs in one transaction (the intent, written before the stops)."""
        now = as_utc(now)
        keys = list(dict.fromkeys(key_of(r) for r in runs))
        if not keys:
            return
        with self.db.write() as s:
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
            rows = runs_for(self.db, s, keys, now, create=True, lock=True)
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
        with self.db.write() as s:
            rows = runs_for(self.db, s, [key_of(it.run) for it in items], now, create=True, lock=True)
            actions = []
            ended = []
            for it in items:
                rid = int(rows[key_of(it.run)].id)
                actions.append({"run_id": rid, "at": now, "kind": it.kind, "ok": it.ok, "detail": it.detail,
                                "actor": it.actor, "job_id": it.job_id})
                if it.end_reason is not None:
                    ended.append((rid, it.end_reason))
            s.execute(ACTIONS.insert(), actions)
            failed = [int(rows[key_of(it.run)].id) for it in items if it.kind in ("stop-failed", "stop-refused")]
            if failed:  # the hub failed or refused: nothing is pending, the next sweep may ask again
                s.execute(update(RUNS).where(RUNS.c.id.in_(failed)).values(stop_requested_at=None))
            by_reason: dict[str, list[int]] = {}
            for rid, reason in ended:
                by_reason.setdefault(reason, []).append(rid)
            for reason, ids in by_reason.items():
                for i in range(0, len(ids), 500):
                    s.execute(
                        update(RUNS).where(RUNS.c.id.in_(ids[i : i + 500]), RUNS.c.ended_at.is_(None))
                        .values(ended_at=now, end_reason=reason)
                    )
            specs = [NoticeSpec(int(rows[key_of(it.run)].id), NoticeKind.STOPPED, None, it.channels, it.notice_context)
                     for it in items if it.notice_context is not None]
            notice_ids = iter(queue_notices(self.db, s, specs, now))
            return [next(notice_ids) if it.notice_context is not None else None for it in items]

    def end_run(self, run: RunKey, now: datetime, reason: str) -> None:
        """The server is no longer on the hub: the run ends (recording it again reopens it)."""
        with self.db.write() as s:
            user, server, started = key_of(run)
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
        with self.db.read() as s:
            q = (
                select(RUNS.c.user, RUNS.c.server, RUNS.c.started)
                .where(RUNS.c.ended_at.is_(None))
                .order_by(RUNS.c.id)
            )
            return [RunKey(r.user, r.server, r.started) for r in s.execute(q)]
