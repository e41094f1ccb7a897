"""The store, on both databases it supports: SQLite (a temporary file) and a real PostgreSQL 15
(started once for the session by tests/harness/postgres.py; each test gets a fresh database).

PostgreSQL may be skipped only on a non-root machine outside CI; as root or with CI=true a
PostgreSQL that cannot start fails these tests.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select, text

from reaper.core.model import Action, Decision, History, HubServer, NoticeKind, Observation, RunKey, State
from reaper.store import HEAD_REVISION, VERSION_TABLE, NoticeContext, Store
from reaper.store.models import DECISIONS, metadata
from tests.harness import require_real_part
from tests.harness.postgres import PostgresUnavailable, fresh_database, postgres_available, postgres_server

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CEST = timezone(timedelta(hours=2))
TABLES = {
    "reaper_runs",
    "reaper_decisions",
    "reaper_notices",
    "reaper_deliveries",
    "reaper_actions",
    "reaper_sweeps",
    "reaper_leases",
}
_db_counter = itertools.count(1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    ok, why = postgres_available()
    require_real_part(ok, f"PostgreSQL ({why})")
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except PostgresUnavailable as e:
            require_real_part(False, f"PostgreSQL ({e})")
            raise  # not reached: require_real_part skips or fails
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'reaper.sqlite'}"
    server = request.getfixturevalue("pg_server")
    return fresh_database(server, f"reaper_t{next(_db_counter)}_{os.getpid()}")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store.open(db_url)
    yield s
    s.close()


# --------------------------------------------------------------------------- helpers


def server(user: str = "alice", name: str = "", started: datetime = T0, job: str = "42") -> HubServer:
    return HubServer(
        user=user,
        name=name,
        started=started,
        last_activity=started,
        user_options={"partition": "gpu", "gres": "gpu:1", "hours": 8},
        state={"job_id": job, "job_status": "RUNNING node1"},
    )


def observe(
    sv: HubServer, at: datetime, state: State = State.DETACHED, detached_since: datetime | None = None
) -> Observation:
    return Observation(
        server=sv,
        state=state,
        at=at,
        last_activity=sv.started,
        detached_since=detached_since if state is State.DETACHED else None,
        detail="1 kernel idle, no browser connected",
        probed=True,
    )


def decision(
    action: Action = Action.OK,
    notice: NoticeKind | None = None,
    spell: datetime | None = None,
    rule: str = "defaults",
    channels: tuple[str, ...] = ("email",),
) -> Decision:
    return Decision(
        action=action,
        reason=f"{action.value} because the window closed",
        rule=rule,
        notice=notice,
        spell=spell,
        stop_at=T0 + timedelta(hours=4),
        next_at=T0 + timedelta(hours=3),
        channels=channels if notice is not None else (),
    )


def warn(spell: datetime = T0, channels: tuple[str, ...] = ("email",)) -> Decision:
    return decision(Action.WARN, NoticeKind.WARNING, spell, channels=channels)


def decisions_logged(store: Store) -> list[tuple[str, str, str]]:
    with store.engine.connect() as c:
        q = select(DECISIONS.c.action, DECISIONS.c.state, DECISIONS.c.rule).order_by(DECISIONS.c.id)
        return [tuple(r) for r in c.execute(q)]  # type: ignore[misc]


# --------------------------------------------------------------------------- migrations


def test_migrations_upgrade_to_head_and_downgrade_to_base_cleanly(db_url: str) -> None:
    s = Store.open(db_url, upgrade=False)
    try:
        assert s.db.current_revision() is None
        s.db.upgrade()
        assert s.db.current_revision() == HEAD_REVISION
        assert TABLES <= set(inspect(s.engine).get_table_names())
        s.db.downgrade("base")
        assert s.db.current_revision() is None
        assert set(inspect(s.engine).get_table_names()) <= {VERSION_TABLE}
        s.db.upgrade("head")  # and back up again, on the same database
        assert s.db.current_revision() == HEAD_REVISION
        assert s.runs.open_runs() == []
    finally:
        s.close()


def test_head_revision_constant_is_alembics_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from reaper.store import HEAD_REVISION, MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # a new migration must move HEAD_REVISION too, or stores at the old head would not upgrade
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD_REVISION]


def test_stored_revision_reads_what_alembic_reads(db_url: str) -> None:
    s = Store.open(db_url, upgrade=False)
    try:
        assert s.db.stored_revision() is None and s.db.current_revision() is None
        s.db.upgrade("0001")
        assert s.db.stored_revision() == s.db.current_revision() == "0001"
        s.db.upgrade()
        assert s.db.stored_revision() == s.db.current_revision() == HEAD_REVISION
    finally:
        s.close()


_ISOLATED_OPEN = """
import os, sys
from reaper.store import Store
s = Store.open(os.environ["URL"], isolated=True)
print(s.db.stored_revision(), "alembic" in sys.modules)
s.close()
"""


def _isolated_open(url: str) -> list[str]:
    p = subprocess.run([sys.executable, "-c", _ISOLATED_OPEN], env={**os.environ, "URL": url},
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_isolated_open_migrates_in_a_child_and_never_loads_alembic(db_url: str) -> None:
    # a new database, one a revision behind, and one at head: all end at head, and the opening
    # process (the service) has not imported alembic in any of them
    assert _isolated_open(db_url) == [HEAD_REVISION, "False"]
    s = Store.open(db_url, upgrade=False)
    s.db.downgrade("0001")
    s.close()
    assert _isolated_open(db_url) == [HEAD_REVISION, "False"]
    assert _isolated_open(db_url) == [HEAD_REVISION, "False"]
    s = Store.open(db_url, upgrade=False)
    try:
        assert s.db.current_revision() == HEAD_REVISION
        assert s.runs.open_runs() == []
    finally:
        s.close()


def test_isolated_open_reports_a_failed_migration(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    s = Store.open(url)
    with s.engine.begin() as c:  # a revision this reaper does not know (a newer reaper's database?)
        c.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    s.close()
    with pytest.raises(RuntimeError, match="database migration failed: .*9999"):
        Store.open(url, isolated=True)


def test_in_memory_database_is_migrated_in_process() -> None:
    s = Store.open("sqlite://", isolated=True)  # no other process could see it
    try:
        assert s.db.current_revision() == HEAD_REVISION
    finally:
        s.close()


def test_the_models_match_the_migrated_schema(store: Store) -> None:
    with store.engine.connect() as c:
        ctx = MigrationContext.configure(c, opts={"compare_type": True, "version_table": VERSION_TABLE})
        diff = compare_metadata(ctx, metadata)
    assert diff == []


def test_open_creates_the_sqlite_folder_uses_wal_and_a_small_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "reaper.sqlite"
    s = Store.open(f"sqlite:///{path}")
    try:
        assert path.exists()
        with s.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert int(c.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 10000
            assert c.exec_driver_sql("PRAGMA cache_size").scalar() == -256  # KiB; SQLite's default: -2000
    finally:
        s.close()


def test_alembic_command_line_takes_the_url_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "cli.sqlite"
    env = {**os.environ, "REAPER_DATABASE_URL": f"sqlite:///{db}"}
    p = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    s = Store.open(f"sqlite:///{db}", upgrade=False)
    try:
        assert s.db.current_revision() == HEAD_REVISION
    finally:
        s.close()


# --------------------------------------------------------------------------- runs and histories


def test_record_and_histories_round_trip_with_aware_utc_datetimes(store: Store) -> None:
    sv = server(user="Zoë-" + "é" * 251, name="gpu-ñ-" + "字" * 249)  # 255 characters each
    assert len(sv.user) == 255 and len(sv.name) == 255
    key = sv.run_key()
    assert key is not None
    spell_cest = (T0 + timedelta(minutes=5, microseconds=123456)).astimezone(CEST)  # same instant, +02:00
    now = T0 + timedelta(hours=2)
    nid = store.runs.record(observe(sv, now, detached_since=spell_cest), warn(spell_cest), now)
    assert nid is not None

    unknown = RunKey("bob", "", T0)
    hist = store.runs.histories([key, unknown])
    assert hist[unknown] == History()
    h = hist[key]
    assert (
        h.first_seen == now and h.first_seen.tzinfo is not None and h.first_seen.utcoffset() == timedelta(0)
    )
    (n,) = h.notices
    assert n.kind is NoticeKind.WARNING
    assert n.spell == spell_cest and n.spell.utcoffset() == timedelta(0)  # returned as UTC, equal instant
    assert n.created_at == now and n.delivered_at is None and not n.failed
    # a key given in another time zone finds the same run
    same = RunKey(key.user, key.server, key.started.astimezone(CEST))
    assert store.runs.histories([same])[same].first_seen == now

    (row,) = store.reports.runs_overview()
    assert (row.user, row.server, row.state, row.action) == (sv.user, sv.name, "detached", "warn")
    assert row.job_id == "42" and row.user_options == {"partition": "gpu", "gres": "gpu:1", "hours": 8}
    assert row.detached_since == spell_cest and row.stop_at == T0 + timedelta(hours=4)


def test_naive_datetimes_are_refused(store: Store) -> None:
    sv = server()
    with pytest.raises(Exception, match="naive"):
        store.runs.record(observe(sv, T0), decision(), datetime(2026, 11, 25, 12, 0))


def test_restart_keeps_first_seen_detached_since_and_notices(db_url: str) -> None:
    sv = server()
    key = sv.run_key()
    assert key is not None
    spell = T0 + timedelta(minutes=10)
    first = T0 + timedelta(minutes=15)
    s = Store.open(db_url)
    s.runs.record(observe(sv, first, detached_since=spell), decision(spell=spell), first)
    s.runs.record(
        observe(sv, first + timedelta(hours=1), detached_since=spell), warn(spell), first + timedelta(hours=1)
    )
    s.runs.set_kept_until(key, None, by="alice", now=first)
    s.close()

    s = Store.open(db_url)  # a restart: same database, new process state
    try:
        h = s.runs.histories([key])[key]
        assert h.first_seen == first
        assert [(n.kind, n.spell) for n in h.notices] == [(NoticeKind.WARNING, spell)]
        assert s.reports.runs_overview()[0].detached_since == spell
        assert s.runs.open_runs() == [key]
        # after the restart the same warning is not queued again
        again = first + timedelta(hours=1, minutes=5)
        assert s.runs.record(observe(sv, again, detached_since=spell), warn(spell), again) is None
        assert len(s.runs.histories([key])[key].notices) == 1
    finally:
        s.close()


def test_a_restarted_server_is_a_new_run_with_a_fresh_history(store: Store) -> None:
    a = server()
    b = server(started=T0 + timedelta(hours=5))
    store.runs.record(observe(a, T0 + timedelta(hours=1)), warn(), T0 + timedelta(hours=1))
    store.runs.record(observe(b, T0 + timedelta(hours=6)), decision(), T0 + timedelta(hours=6))
    ka, kb = a.run_key(), b.run_key()
    assert ka is not None and kb is not None
    h = store.runs.histories([ka, kb])
    assert len(h[ka].notices) == 1 and h[kb].notices == ()
    assert h[kb].first_seen == T0 + timedelta(hours=6)


# --------------------------------------------------------------------------- notices


def test_the_same_decision_recorded_twice_queues_one_notice(store: Store) -> None:
    sv = server()
    key = sv.run_key()
    assert key is not None
    now = T0 + timedelta(hours=2)
    assert store.runs.record(observe(sv, now), warn(), now) is not None
    assert store.runs.record(observe(sv, now), warn(), now) is None
    later = now + timedelta(minutes=5)  # a later sweep deciding the same: still one warning this spell
    assert store.runs.record(observe(sv, later), warn(), later) is None
    final = decision(Action.FINAL, NoticeKind.FINAL, T0)
    assert store.runs.record(observe(sv, later), final, later) is not None
    assert store.runs.record(observe(sv, later), final, later) is None
    reminder = decision(Action.REMIND, NoticeKind.REMINDER, T0)
    assert store.runs.record(observe(sv, later), reminder, later) is not None
    assert store.runs.record(observe(sv, later), reminder, later) is None
    kinds = [n.kind for n in store.runs.histories([key])[key].notices]
    assert kinds == [NoticeKind.WARNING, NoticeKind.FINAL, NoticeKind.REMINDER]
    assert store.outbox.depth() == 3  # one channel each


@pytest.mark.parametrize("kind", [NoticeKind.WARNING, NoticeKind.REMINDER])
def test_two_threads_recording_the_same_notice_concurrently_queue_exactly_one(
    db_url: str, kind: NoticeKind
) -> None:
    stores = [Store.open(db_url) for _ in range(2)]  # two "reaper processes" on one database
    try:
        sv = server()
        key = sv.run_key()
        assert key is not None
        now = T0 + timedelta(hours=2)
        stores[0].runs.record(
            observe(sv, now - timedelta(hours=1)),
            warn() if kind is NoticeKind.REMINDER else decision(),
            now - timedelta(hours=1),
        )
        action = Action.WARN if kind is NoticeKind.WARNING else Action.REMIND
        dec = decision(action, kind, T0)
        n_threads = 6
        barrier = threading.Barrier(n_threads)
        results: list[int | None] = []
        errors: list[BaseException] = []

        def go(i: int) -> None:
            try:
                barrier.wait()
                results.append(stores[i % 2].runs.record(observe(sv, now), dec, now))
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert len(results) == n_threads
        assert len([r for r in results if r is not None]) == 1
        notices = [n for n in stores[0].runs.histories([key])[key].notices if n.kind is kind]
        assert len(notices) == 1
    finally:
        for s in stores:
            s.close()


def test_reminders_are_numbered_1_2_3_within_a_spell_and_restart_in_a_new_spell(store: Store) -> None:
    sv = server()
    store.runs.record(observe(sv, T0 + timedelta(hours=1)), warn(T0), T0 + timedelta(hours=1))
    for h in (2, 3, 4):
        nid = store.runs.record(
            observe(sv, T0 + timedelta(hours=h)),
            decision(Action.REMIND, NoticeKind.REMINDER, T0),
            T0 + timedelta(hours=h),
        )
        assert nid is not None
    new_spell = T0 + timedelta(hours=5)
    store.runs.record(
        observe(sv, T0 + timedelta(hours=6)),
        decision(Action.REMIND, NoticeKind.REMINDER, new_spell),
        T0 + timedelta(hours=6),
    )
    rows = sorted(store.reports.recent_notices(T0), key=lambda r: r.created_at)
    assert [(r.kind, r.seq, r.spell) for r in rows] == [
        ("warning", 0, T0),
        ("reminder", 1, T0),
        ("reminder", 2, T0),
        ("reminder", 3, T0),
        ("reminder", 1, new_spell),
    ]


def test_add_notice_for_stopped_and_orphan_is_idempotent(store: Store) -> None:
    key = RunKey("carol", "big", T0)  # never recorded by a sweep: the run is created for it
    ctx = NoticeContext(reason="idle 8h", stopped_at=T0 + timedelta(hours=8))
    first = store.outbox.add_notice(
        key, NoticeKind.STOPPED, None, T0 + timedelta(hours=8), channels=["email", "slack"], context=ctx
    )
    assert first is not None
    assert (
        store.outbox.add_notice(
            key, NoticeKind.STOPPED, None, T0 + timedelta(hours=9), channels=["email"], context=ctx
        )
        is None
    )
    assert (
        store.outbox.add_notice(
            key, NoticeKind.ORPHAN, None, T0 + timedelta(hours=9), channels=["email"], context=NoticeContext()
        )
        is not None
    )
    due = store.outbox.due_deliveries(T0 + timedelta(hours=9))
    assert sorted((d.kind.value, d.channel) for d in due) == [
        ("orphan", "email"),
        ("stopped", "email"),
        ("stopped", "slack"),
    ]
    stopped = [d for d in due if d.kind is NoticeKind.STOPPED][0]
    assert stopped.run == key and stopped.context == ctx


# --------------------------------------------------------------------------- the decisions log


def test_the_decisions_log_appends_only_when_action_state_or_rule_changes(store: Store) -> None:
    sv = server()
    for m in range(0, 30, 5):  # six sweeps, nothing changes
        store.runs.record(observe(sv, T0 + timedelta(minutes=m)), decision(), T0 + timedelta(minutes=m))
    assert decisions_logged(store) == [("ok", "detached", "defaults")]
    store.runs.record(observe(sv, T0 + timedelta(hours=1)), warn(), T0 + timedelta(hours=1))
    store.runs.record(
        observe(sv, T0 + timedelta(hours=1, minutes=5)), decision(), T0 + timedelta(hours=1, minutes=5)
    )
    store.runs.record(
        observe(sv, T0 + timedelta(hours=1, minutes=10), State.ATTACHED),
        decision(),
        T0 + timedelta(hours=1, minutes=10),
    )
    store.runs.record(
        observe(sv, T0 + timedelta(hours=1, minutes=15), State.ATTACHED),
        decision(rule="gpu"),
        T0 + timedelta(hours=1, minutes=15),
    )
    store.runs.record(
        observe(sv, T0 + timedelta(hours=1, minutes=20), State.ATTACHED),
        decision(rule="gpu"),
        T0 + timedelta(hours=1, minutes=20),
    )
    assert decisions_logged(store) == [
        ("ok", "detached", "defaults"),
        ("warn", "detached", "defaults"),
        ("ok", "detached", "defaults"),
        ("ok", "attached", "defaults"),
        ("ok", "attached", "gpu"),
    ]


def test_record_many_records_a_large_sweep_in_one_batch(store: Store) -> None:
    now = T0 + timedelta(hours=2)
    servers = [server(user=f"user{i:04d}", job=str(i)) for i in range(1200)]  # more than one IN chunk
    items = [(observe(sv, now), warn() if i % 100 == 0 else decision()) for i, sv in enumerate(servers)]
    ids = store.runs.record_many(items, now)
    assert len(ids) == 1200
    assert [i for i, x in enumerate(ids) if x is not None] == list(range(0, 1200, 100))
    assert len(store.runs.open_runs()) == 1200
    keys = [sv.run_key() for sv in servers]
    for k in keys[:3]:  # ended runs are found too (not only the open ones) and are reopened
        assert k is not None
        store.runs.end_run(k, now, "gone for a moment")
    assert len(store.runs.open_runs()) == 1197
    again = store.runs.record_many(items, now + timedelta(minutes=5))
    assert again == [None] * 1200
    assert len(store.runs.open_runs()) == 1200
    assert len(decisions_logged(store)) == 1200  # nothing changed the second time
    hist = store.runs.histories([k for k in keys if k is not None])
    assert sum(len(h.notices) for h in hist.values()) == 12
    assert all(h.first_seen == now for h in hist.values())


# --------------------------------------------------------------------------- the outbox


def test_outbox_retry_waits_until_retry_at_and_delivery_sets_notice_delivered_at(store: Store) -> None:
    sv = server()
    key = sv.run_key()
    assert key is not None
    now = T0 + timedelta(hours=2)
    nid = store.runs.record(observe(sv, now), warn(channels=("email", "slack")), now)
    due = store.outbox.due_deliveries(now)
    assert {(d.notice_id, d.channel, d.attempts) for d in due} == {(nid, "email", 0), (nid, "slack", 0)}
    email = next(d for d in due if d.channel == "email")
    assert email.run == key and email.kind is NoticeKind.WARNING and email.context.user == "alice"
    assert email.context.reason == warn().reason
    slack = next(d for d in due if d.channel == "slack")

    store.outbox.mark_failed(
        email.id, now, "SMTP 451 try later", permanent=False, retry_at=now + timedelta(minutes=5)
    )
    assert [d.channel for d in store.outbox.due_deliveries(now + timedelta(minutes=1))] == ["slack"]
    retry = store.outbox.due_deliveries(now + timedelta(minutes=5))
    assert {(d.channel, d.attempts) for d in retry} == {("email", 1), ("slack", 0)}
    assert store.runs.histories([key])[key].notices[0].delivered_at is None

    t_email = now + timedelta(minutes=5)
    store.outbox.mark_delivered(email.id, t_email)
    n = store.runs.histories([key])[key].notices[0]
    assert n.delivered_at == t_email and not n.failed
    store.outbox.mark_delivered(slack.id, t_email + timedelta(minutes=1))  # the second channel keeps the first time
    assert store.runs.histories([key])[key].notices[0].delivered_at == t_email
    assert store.outbox.due_deliveries(now + timedelta(days=1)) == []
    assert store.outbox.depth() == 0
    (row,) = store.reports.recent_notices(T0)
    assert row.status == "delivered"
    assert {d.channel: (d.status, d.attempts) for d in row.deliveries} == {
        "email": ("delivered", 1),
        "slack": ("delivered", 0),
    }


def test_permanent_failure_on_every_channel_marks_the_notice_failed(store: Store) -> None:
    sv = server()
    key = sv.run_key()
    assert key is not None
    now = T0 + timedelta(hours=2)
    store.runs.record(
        observe(sv, now), decision(Action.FINAL, NoticeKind.FINAL, T0, channels=("email", "slack")), now
    )
    due = {d.channel: d for d in store.outbox.due_deliveries(now)}
    store.outbox.mark_failed(due["email"].id, now, "550 no such user", permanent=True, retry_at=None)
    n = store.runs.histories([key])[key].notices[0]
    assert not n.failed and n.failed_at is None  # slack may still deliver
    assert store.outbox.depth() == 1
    later = now + timedelta(minutes=1)
    store.outbox.mark_failed(due["slack"].id, later, "invalid_auth", permanent=True, retry_at=None)
    n = store.runs.histories([key])[key].notices[0]
    assert n.failed and n.failed_at == later and n.delivered_at is None
    assert store.outbox.depth() == 0 and store.outbox.due_deliveries(later + timedelta(days=1)) == []
    # a late report for a delivery already settled changes nothing
    store.outbox.mark_delivered(due["slack"].id, later + timedelta(minutes=1))
    assert store.runs.histories([key])[key].notices[0].delivered_at is None


def test_could_stop_runs_is_policy_could_stop_over_the_histories(store: Store) -> None:
    # The sweep asks the store which runs could stop (one query) instead of reading every history
    # first: the answer must be exactly what policy.could_stop says of each run's history.
    from reaper.core.policy import could_stop

    now = T0 + timedelta(hours=2)
    runs = {}
    for name in ("none", "warned", "final-queued", "final-delivered", "final-failed", "email-failed-only",
                 "ended", "restarted"):
        sv = server(user=name, started=T0 + timedelta(seconds=len(runs)))
        runs[name] = sv
        store.runs.record(observe(sv, now), decision(Action.OK, None, T0), now)
    store.runs.record(observe(runs["warned"], now), warn(), now)
    for name in ("final-queued", "final-delivered", "final-failed", "email-failed-only", "ended"):
        store.runs.record(observe(runs[name], now), decision(Action.FINAL, NoticeKind.FINAL, T0,
                                                        channels=("email", "slack")), now)
    due = {(d.run.user, d.channel): d for d in store.outbox.due_deliveries(now, limit=100)}
    store.outbox.mark_delivered(due[("warned", "email")].id, now)
    store.outbox.mark_delivered(due[("final-delivered", "slack")].id, now)
    store.outbox.mark_delivered(due[("ended", "email")].id, now)
    for ch in ("email", "slack"):
        store.outbox.mark_failed(due[("final-failed", ch)].id, now, "550", permanent=True, retry_at=None)
    store.outbox.mark_failed(due[("email-failed-only", "email")].id, now, "550", permanent=True, retry_at=None)
    store.runs.end_run(runs["ended"].run_key(), now, "stopped")  # type: ignore[arg-type]
    keys = [sv.run_key() for sv in runs.values()]
    keys.append(server(user="restarted", started=T0 + timedelta(hours=1)).run_key())  # not in the store
    expected = {k for k, h in store.runs.histories(keys).items() if could_stop(h)}  # type: ignore[arg-type]
    # (an ended run still counts when asked about: the hub may list it again under the same key)
    assert expected == {runs[n].run_key() for n in ("final-delivered", "final-failed", "ended")}
    assert store.runs.could_stop_runs(keys) == expected  # type: ignore[arg-type]
    assert store.runs.could_stop_runs([]) == set()
    assert store.runs.could_stop_runs(keys[:3]) == set()  # type: ignore[arg-type]


def test_one_channel_delivered_and_one_failed_is_delivered_not_failed(store: Store) -> None:
    sv = server()
    key = sv.run_key()
    assert key is not None
    now = T0 + timedelta(hours=2)
    store.runs.record(observe(sv, now), warn(channels=("email", "slack")), now)
    due = {d.channel: d for d in store.outbox.due_deliveries(now)}
    store.outbox.mark_delivered(due["slack"].id, now)
    store.outbox.mark_failed(due["email"].id, now, "550", permanent=True, retry_at=None)
    n = store.runs.histories([key])[key].notices[0]
    assert n.delivered_at == now and not n.failed


# --------------------------------------------------------------------------- actions, runs, sweeps


def test_stop_intents_mark_known_runs_and_create_unknown_ones(store: Store) -> None:
    # The intent of a stop is written before the hub is asked: for the runs the sweep recorded
    # (one UPDATE each), for a run the store has not seen (created), and for a key given twice.
    known = [server(user=f"k{i}") for i in range(3)]
    store.runs.record_many([(observe(sv, T0), decision()) for sv in known], T0)
    new = server(user="new", name="gpu")
    at = T0 + timedelta(minutes=5)
    keys = [sv.run_key() for sv in known] + [known[0].run_key()]
    store.runs.mark_stops_requested(keys, at)  # type: ignore[arg-type]
    store.runs.mark_stops_requested([known[1].run_key(), new.run_key()], at + timedelta(minutes=1))  # type: ignore[list-item]
    h = store.runs.histories([sv.run_key() for sv in (*known, new)])  # type: ignore[misc]
    assert [h[sv.run_key()].stop_requested_at for sv in (*known, new)] == [  # type: ignore[index]
        at, at + timedelta(minutes=1), at, at + timedelta(minutes=1)]
    assert new.run_key() in store.runs.open_runs()
    store.runs.mark_stops_requested([], at)  # nothing to do


def test_actions_keep_stop_requests_and_ended_runs(store: Store) -> None:
    a, b = server(user="alice"), server(user="bob", name="gpu")
    ka, kb = a.run_key(), b.run_key()
    assert ka is not None and kb is not None
    store.runs.record_many([(observe(a, T0), decision()), (observe(b, T0), decision())], T0)
    assert set(store.runs.open_runs()) == {ka, kb}

    store.runs.set_kept_until(ka, T0 + timedelta(hours=3), by="alice", now=T0)
    store.runs.mark_stop_requested(kb, T0 + timedelta(minutes=1))
    h = store.runs.histories([ka, kb])
    assert h[ka].kept_until == T0 + timedelta(hours=3) and h[ka].stop_requested_at is None
    assert h[kb].stop_requested_at == T0 + timedelta(minutes=1) and h[kb].kept_until is None
    store.runs.set_kept_until(ka, None, by="alice", now=T0 + timedelta(hours=1))
    assert store.runs.histories([ka])[ka].kept_until is None

    aid = store.reports.record_action(
        kb, "stop", True, "idle 8h | hub: stopped (204)", T0 + timedelta(minutes=2), job_id="42"
    )
    store.reports.record_action(
        None,
        "orphan-cancel",
        False,
        "scancel 77 failed",
        T0 + timedelta(minutes=3),
        actor="reaper",
        job_id="77",
    )
    store.runs.end_run(kb, T0 + timedelta(minutes=2), "stopped by the reaper")
    assert store.runs.open_runs() == [ka]
    assert [r.user for r in store.reports.runs_overview()] == ["alice"]
    acts = store.reports.recent_actions(T0)
    assert [(x.kind, x.ok, x.user, x.job_id) for x in acts] == [
        ("orphan-cancel", False, None, "77"),
        ("stop", True, "bob", "42"),
    ]
    assert acts[1].id == aid and acts[1].at == T0 + timedelta(minutes=2)
    assert store.reports.recent_actions(T0 + timedelta(minutes=3)) == acts[:1]
    # seen on the hub again (e.g. the stop did not take): recording reopens the run
    store.runs.record(observe(b, T0 + timedelta(minutes=5)), decision(), T0 + timedelta(minutes=5))
    assert set(store.runs.open_runs()) == {ka, kb}


def test_sweeps_record_the_last_successful_one(store: Store) -> None:
    assert store.reports.last_successful_sweep() is None
    s1 = store.reports.start_sweep(T0, dry_run=False)
    store.reports.finish_sweep(s1, T0 + timedelta(seconds=3), True, {"servers": 2, "at": T0})
    s2 = store.reports.start_sweep(T0 + timedelta(minutes=5), dry_run=False)
    store.reports.finish_sweep(s2, T0 + timedelta(minutes=5, seconds=2), False, {"error": "hub 503"})
    s3 = store.reports.start_sweep(T0 + timedelta(minutes=10), dry_run=False)  # still running
    assert s1 < s2 < s3
    last = store.reports.last_successful_sweep()
    assert last == T0 + timedelta(seconds=3) and last is not None and last.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- the lease


def test_lease_one_holder_at_a_time_renewable_and_taken_over_after_expiry(db_url: str) -> None:
    a, b = Store.open(db_url), Store.open(db_url)
    ttl = timedelta(minutes=15)
    try:
        assert a.lease.acquire("host-a:1", T0, ttl)
        assert not b.lease.acquire("host-b:2", T0 + timedelta(minutes=1), ttl)
        assert a.lease.acquire("host-a:1", T0 + timedelta(minutes=10), ttl)  # renewed: now expires at +25m
        assert not b.lease.acquire("host-b:2", T0 + timedelta(minutes=20), ttl)
        assert b.lease.acquire("host-b:2", T0 + timedelta(minutes=25), ttl)  # A stopped renewing
        assert not a.lease.acquire("host-a:1", T0 + timedelta(minutes=26), ttl)
        b.lease.release("host-b:2")
        assert a.lease.acquire("host-a:1", T0 + timedelta(minutes=27), ttl)
    finally:
        a.close()
        b.close()


def test_lease_race_between_two_processes_has_one_winner(db_url: str) -> None:
    stores = [Store.open(db_url) for _ in range(4)]
    try:
        barrier = threading.Barrier(4)
        won: list[str] = []

        def go(i: int) -> None:
            barrier.wait()
            if stores[i].lease.acquire(f"holder-{i}", T0, timedelta(minutes=5)):
                won.append(f"holder-{i}")

        threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1
        with stores[0].engine.connect() as c:
            assert c.execute(text("SELECT holder FROM reaper_leases")).scalar_one() == won[0]
            assert c.execute(select(func.count()).select_from(text("reaper_leases"))).scalar_one() == 1
    finally:
        for s in stores:
            s.close()


def test_record_stops_queues_one_stopped_notice_per_run_in_a_batch_and_none_on_a_repeat(store: Store) -> None:
    from reaper.store import StopRecord

    keys = [RunKey(f"u{i}", "" if i % 3 else "gpu", T0) for i in range(700)]  # more than one IN chunk
    recs = [StopRecord(k, "stop", True, "idle", end_reason="stopped by the reaper",
                       notice_context=NoticeContext(user=k.user), channels=("email", "slack")) for k in keys]
    pending = StopRecord(RunKey("p", "", T0), "stop-pending", True, "202")
    ids = store.runs.record_stops([*recs, pending, recs[0]], T0)  # the same stop twice in one batch
    assert len(ids) == 702 and ids[700] is None
    assert len({i for i in ids[:700]}) == 700 and None not in ids[:700]
    assert ids[701] is None  # the duplicate: one notice for the run
    due = store.outbox.due_deliveries(T0, 10_000)
    assert len(due) == 1400 and {d.channel for d in due} == {"email", "slack"}
    assert {d.run for d in due} == set(keys) and all(d.kind is NoticeKind.STOPPED for d in due)
    assert store.runs.record_stops(recs[:5], T0 + timedelta(minutes=5)) == [None] * 5  # a repeat queues none
    assert len(store.outbox.due_deliveries(T0 + timedelta(minutes=5), 10_000)) == 1400
    assert not set(keys) & set(store.runs.open_runs())


# --------------------------------------------------------------------------- could_stop in SQL

# A notice's fate on its channels: still pending, delivered on one, failed on every one, failed
# on one while another is still pending (not failed: the notice may yet go out).
_FATES = ("pending", "delivered", "failed", "half-failed")
_example = itertools.count()

_notice = st.tuples(st.sampled_from(list(NoticeKind)), st.sampled_from([None, T0, T0 + timedelta(hours=1)]),
                    st.sampled_from(_FATES))
_STARTS = [T0, T0 + timedelta(minutes=1), T0 + timedelta(days=1)]
_run = st.tuples(
    st.sampled_from(["ann", "bob"]),  # few users, servers and start times: the SQL pre-filter
    st.sampled_from(["", "gpu"]),  # (user IN ... AND started IN ...) also finds runs not asked about
    st.sampled_from(_STARTS),
    st.lists(_notice, max_size=4),
    st.booleans(),  # ended (an ended run keeps its history)
    st.booleans(),  # asked about
)
_runs = st.lists(_run, max_size=8, unique_by=lambda r: r[:3])


def _write_history(store: Store, key: RunKey, notices: list[Any], ended: bool, now: datetime) -> datetime:
    """Write a run's notices through the store (queued, then delivered or failed as drawn)."""
    for kind, spell, fate in notices:
        now += timedelta(minutes=1)
        nid = store.outbox.add_notice(key, kind, spell, now, channels=["email", "slack"], context=NoticeContext())
        if nid is None:  # the same notice again (kind and spell), as the sweep would: already queued
            continue
        email, slack = sorted((d for d in store.outbox.due_deliveries(now, 100_000) if d.notice_id == nid),
                              key=lambda d: d.channel)
        if fate == "delivered":
            store.outbox.mark_delivered(slack.id, now)
        elif fate in ("failed", "half-failed"):
            store.outbox.mark_failed(email.id, now, "550", permanent=True, retry_at=None)
            if fate == "failed":
                store.outbox.mark_failed(slack.id, now, "invalid_auth", permanent=True, retry_at=None)
    if ended:
        store.runs.end_run(key, now, "stopped")
    return now


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=_runs, never_stored=st.lists(st.tuples(st.sampled_from(["ann", "bob", "eve"]), st.sampled_from(["", "gpu"]),
                                                    st.sampled_from(_STARTS)), max_size=3),
       in_cest=st.booleans())
def test_could_stop_runs_is_could_stop_over_generated_histories(
    store: Store, runs: list[Any], never_stored: list[tuple[str, str, datetime]], in_cest: bool
) -> None:
    from reaper.core.policy import could_stop

    prefix = f"x{next(_example)}-"  # each example writes runs of its own
    asked: list[RunKey] = []
    now = T0
    for user, name, started, notices, ended, ask in runs:
        key = RunKey(prefix + user, name, started)
        now = _write_history(store, key, notices, ended, now)
        if ask:
            asked.append(key)
    stored = {(u, n, t) for u, n, t, *_ in runs}
    asked += [RunKey(prefix + u, n, t) for u, n, t in never_stored if (u, n, t) not in stored]
    if in_cest:  # the same runs, their start given in another time zone
        asked = [RunKey(k.user, k.server, k.started.astimezone(CEST)) for k in asked]
    histories = store.runs.histories(asked)
    assert store.runs.could_stop_runs(asked) == {k for k in asked if could_stop(histories[k])}


def test_the_work_looks_memory_survives_a_restart_and_a_look_without_it_leaves_it_alone(db_url: str) -> None:
    from reaper.core.model import CpuSample, WorkMemory

    sv = server()
    key = sv.run_key()
    assert key is not None
    at = T0 + timedelta(hours=1)
    samples = (CpuSample("pid:20@2026-11-25T11:30:00+00:00", 90.5, at, T0 - timedelta(minutes=30), at),
               CpuSample("job:42", 12.0, at, T0.astimezone(CEST)))
    obs = replace(observe(sv, at, State.WORKING), detail="python in terminal 1 used 1m of CPU",
                  memory=WorkMemory(samples, at))
    s = Store.open(db_url)
    try:
        s.runs.record(obs, decision(Action.OK, None, None), at)
    finally:
        s.close()
    s = Store.open(db_url)  # a restart
    try:
        h = s.runs.histories([key])[key]
        assert h.samples == samples and h.working_at == at and h.last_state == "working"
        assert all(x.since.utcoffset() == timedelta(0) for x in h.samples)
        later = at + timedelta(minutes=5)
        s.runs.record(observe(sv, later), decision(Action.OK, None, None), later)  # no work look this time
        h = s.runs.histories([key])[key]
        assert h.samples == samples and h.working_at == at and h.last_state == "detached"
        (row,) = s.reports.runs_overview()
        assert row.working_at == at
    finally:
        s.close()
