"""The sweep's wiring (collect -> probe -> classify -> decide -> act -> record) with a scripted hub,
a real SQLite store and the log channel; time is driven by a fake clock."""

import os
from dataclasses import replace as dc_replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from reaper.config import parse_settings
from reaper.core.model import Action, HubServer, Kernel, NoticeKind, Probe, Program, State, Where, Work
from reaper.notify.outbox import LogChannel, Outbox
from reaper.store import Store
from reaper.store.models import NOTICES
from reaper.sweep import Sweeper, format_table
from tests.fakes import Clock, FakeHub

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
M = timedelta(minutes=1)

POLICY = """
sweep_every: 5m
probe: {skip_fresh: true, reprobe_every: 30m}
safety: {max_stops_per_sweep: 3, max_stop_fraction: 0.5, fraction_applies_above: 4}
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  attached: {warn_after: 8h, stop_after: 24h}
  remind_every: 1h
  min_notice: 30m
  channels: [log]
"""


# the same policy, every look a full one (status and kernels)
FULL_LOOKS = POLICY.replace("reprobe_every: 30m}", "reprobe_every: 30m, confirm_with_status: false}")


def settings(extra: str = "", policy: str = POLICY):
    return parse_settings(policy + extra, env={})


@pytest.fixture(autouse=True, params=[1, 1000], ids=["batch=1", "batch=1000"])
def batch(request, monkeypatch):
    """Every sweep test runs twice: with the hub looked at and recorded one server at a time (the
    daily cap, the safety limits and the streamed stops then span batches) and in one batch."""
    import reaper.sweep

    monkeypatch.setattr(reaper.sweep, "BATCH", request.param)
    return request.param


def server(user="alice", name="", started=T0 - timedelta(hours=5), la=None, **kw) -> HubServer:
    return HubServer(user=user, name=name, started=started, last_activity=la or T0 - timedelta(hours=2),
                     url=f"/user/{user}/" + (f"{name}/" if name else ""), target="http://127.0.0.1:1",
                     state={"job_id": "7"}, **kw)


def detached_probe(since: datetime) -> Probe:
    return Probe(ok=True, status_last_activity=since,
                 kernels=(Kernel("k", "python3", "idle", 0, since),))


def busy_probe(since: datetime) -> Probe:
    return Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "busy", 0, since),))


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    yield s
    s.close()


def make(store, hub, clock, extra="", policy=POLICY):
    st = settings(extra, policy)
    return Sweeper(st, hub, store, notifier=Outbox(store, {"log": LogChannel()}), clock=clock)


def one_detached(store, since, policy=POLICY):
    """alice, detached since ``since``, and a sweeper at T0: (hub, clock, her server, sweeper)."""
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, detached_probe(since))
    return hub, clock, srv, make(store, hub, clock, policy=policy)


def kinds(store, key):
    return [n.kind for n in store.runs.histories([key])[key].notices]


async def test_full_cycle_warning_reminder_final_stop_stopped_notice(store):
    hub, clock, srv, sw = one_detached(store, T0 - 70 * M)
    key = srv.run_key()

    r = await sw.run_once()
    assert r.ok and r.rows[0].obs.state is State.DETACHED
    assert r.rows[0].decision.action is Action.WARN
    assert kinds(store, key) == [NoticeKind.WARNING]
    assert store.runs.histories([key])[key].notices[0].delivered_at is not None  # the log channel delivered

    clock.advance(5 * M)
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.OK  # no duplicate warning
    assert kinds(store, key) == [NoticeKind.WARNING]

    clock.advance(60 * M)  # 2h15m idle: a reminder
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.REMIND

    clock.advance(20 * M)  # 2h35m idle: past stop_after - min_notice
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.FINAL
    assert kinds(store, key) == [NoticeKind.WARNING, NoticeKind.REMINDER, NoticeKind.FINAL]
    assert hub.stops == []

    clock.advance(25 * M)  # only 25 min after the final notice: not yet
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.OK and hub.stops == []

    clock.advance(6 * M)
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.STOP
    assert hub.stops == [("alice", "")]
    assert r.stops == 1
    assert NoticeKind.STOPPED in kinds(store, key)
    assert key not in store.runs.open_runs()


async def test_failed_listing_ends_the_sweep_without_acting_or_recording(store):
    hub, clock = FakeHub(fail_listing=True), Clock(T0)
    hub.add(server(la=T0 - 10 * 60 * M), detached_probe(T0 - 10 * 60 * M))
    r = await make(store, hub, clock).run_once()
    assert not r.ok and "HTTP 500" in r.error
    assert r.rows == [] and hub.stops == [] and hub.probe_calls == []
    assert store.runs.open_runs() == []


async def test_safety_limit_stops_none_and_records_an_alert(store):
    hub, clock = FakeHub(), Clock(T0)
    since = T0 - 10 * 60 * M
    for i in range(5):
        hub.add(server(user=f"u{i}", la=since), detached_probe(since))
    sw = make(store, hub, clock)
    await sw.run_once()  # finals go out (10 h idle)
    clock.advance(31 * M)
    r = await sw.run_once()
    assert r.safety_tripped and hub.stops == []
    assert all(row.decision.action is Action.OK and "safety" in row.decision.reason for row in r.rows)
    assert any(a.kind == "safety-limit" for a in store.reports.recent_actions(T0 - timedelta(days=1)))


async def stop_due(store, hub=None, probe=None):
    """alice, idle for 10 h: the first sweep sends the final notice; 31 minutes later her stop is due."""
    since = T0 - 10 * 60 * M
    hub, clock = hub or FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, probe or detached_probe(since))
    sw = make(store, hub, clock)
    await sw.run_once()
    clock.advance(31 * M)
    return hub, clock, srv, sw


async def test_activity_seen_on_the_recheck_cancels_the_stop(store):
    # Two runs have their final notice: more than max_stops_per_sweep (1) COULD stop, so the sweep
    # does not stream; it probes all, decides, then re-checks each stop right before it.
    since = T0 - 10 * 60 * M
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, detached_probe(since))
    hub.add(server(user="bob", la=since), detached_probe(since))
    st = parse_settings(POLICY.replace("max_stops_per_sweep: 3", "max_stops_per_sweep: 1"), env={})
    sw = Sweeper(st, hub, store, notifier=Outbox(store, {"log": LogChannel()}), clock=clock)
    await sw.run_once()
    clock.advance(31 * M)
    hub.probes[("bob", "")] = Probe(ok=True, status_last_activity=clock.now,
                                    kernels=(Kernel("k", "python3", "idle", 1, clock.now),))

    def came_back(h, user, name):
        # the sweep's own look at alice (status alone: she was detached) still finds her gone;
        # she comes back between that look and the re-check right before her stop
        if h.status_calls.count((user, name)) == 2:
            h.probes[(user, name)] = Probe(ok=True, status_last_activity=clock.now,
                                           kernels=(Kernel("k", "python3", "idle", 1, clock.now),))

    hub.before_recheck = came_back
    r = await sw.run_once()
    assert hub.stops == [] and not r.safety_tripped
    row = {x.obs.server.user: x for x in r.rows}["alice"]
    assert not row.streamed and row.outcome.startswith("not stopped")
    assert hub.status_calls.count(("alice", "")) == 2  # the look, then the re-check


async def test_streamed_stop_goes_out_right_after_its_own_look_and_is_recorded_at_once(store):
    since = T0 - 10 * 60 * M
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, detached_probe(since))
    hub.add(server(user="bob", la=T0 - 2 * M), Probe(ok=True, status_last_activity=T0 - 2 * M))
    sw = make(store, hub, clock)
    await sw.run_once()  # alice: the final notice (10 h idle); bob is busy

    class Hook:  # a batch guard (reaper.ports.Guard) that sees no batch jobs
        seen: list = []

        async def hub_jobs(self):
            return None

        async def reconcile(self, servers, jobs, now, *, dry_run=False):
            return []

        async def cpu_usage(self, job_ids):  # no batch accounting: every job unknown
            return {}

        async def after_stop(self, server, outcome, now):
            # by the time the batch-system guard looks, the stop is durable
            assert srv.run_key() not in store.runs.open_runs()
            self.seen.append((server.user, outcome))

    sw.stop_hook = Hook()
    clock.advance(31 * M)
    calls_before, status_before = len(hub.probe_calls), len(hub.status_calls)
    hub.get_server = lambda *a: pytest.fail("a streamed stop needs no second look")
    r = await sw.run_once()
    assert hub.stops == [("alice", "")] and r.stops == 1
    row = {x.obs.server.user: x for x in r.rows}["alice"]
    assert row.streamed and row.stop is not None and row.outcome == "stopped"
    # one look, right before the stop: /api/status alone, as she was detached at the last sweep
    assert hub.status_calls[status_before:].count(("alice", "")) == 1
    assert hub.probe_calls[calls_before:].count(("alice", "")) == 0
    assert Hook.seen == [("alice", "stopped")]
    key = srv.run_key()
    assert key not in store.runs.open_runs() and NoticeKind.STOPPED in kinds(store, key)
    acts = [a for a in store.reports.recent_actions(T0 - timedelta(days=1)) if a.kind == "stop"]
    assert len(acts) == 1 and acts[0].ok
    assert store.runs.histories([key])[key].last_state == "detached"  # the look was recorded too
    assert r.phases["probe"] >= 0 and "stop.recheck" not in r.phases


async def test_streamed_stop_is_not_asked_when_its_intent_cannot_be_recorded(store, monkeypatch):
    hub, clock, srv, sw = await stop_due(store)

    def down(*a, **kw):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(store.runs, "mark_stops_requested", down)
    r = await sw.run_once()
    assert hub.stops == []
    assert r.rows[0].outcome.startswith("not stopped: the intent could not be recorded")


async def test_a_listing_older_than_a_minute_is_checked_before_a_streamed_stop(store):
    hub, clock, srv, sw = await stop_due(store)
    orig = hub.probe_status  # (her look: status alone, she was detached at the last sweep)

    async def slow_probe(server):  # the sweep's look takes long; meanwhile the user restarted
        clock.advance(2 * M)
        hub.servers[("alice", "")] = dc_replace(srv, started=clock.now)
        return await orig(server)

    hub.probe_status = slow_probe
    r = await sw.run_once()
    assert hub.stops == [] and r.rows[0].outcome == "gone before the stop"


async def test_busy_kernel_is_never_stopped_under_protect(store):
    since = T0 - 20 * 60 * M
    hub, clock = FakeHub(), Clock(T0)
    hub.add(server(la=since), busy_probe(since))
    sw = make(store, hub, clock)
    for _ in range(12):
        r = await sw.run_once()
        assert r.rows[0].obs.state is State.COMPUTING
        assert r.rows[0].decision.action is Action.OK
        clock.advance(30 * M)
    assert hub.stops == [] and kinds(store, server().run_key()) == []


async def test_dry_run_changes_nothing_and_prints_what_it_would_do(store):
    since = T0 - 70 * M
    hub, clock = FakeHub(), Clock(T0)
    hub.add(server(la=since), detached_probe(since))
    r = await make(store, hub, clock).run_once(dry_run=True)
    assert r.rows[0].decision.action is Action.WARN
    assert store.runs.open_runs() == []
    table = format_table(r, UTC)
    assert "alice" in table and "warn (would send warning)" in table and "dry run" in table


async def test_restart_mid_cycle_keeps_clocks_and_sends_no_duplicate(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    since = T0 - 70 * M
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, detached_probe(since))
    s1 = Store.open(url)
    await make(s1, hub, clock).run_once()
    s1.close()
    clock.advance(10 * M)
    s2 = Store.open(url)  # a new process: a new sweeper, the same database
    r = await make(s2, hub, clock).run_once()
    assert r.rows[0].decision.action is Action.OK
    assert kinds(s2, srv.run_key()) == [NoticeKind.WARNING]
    s2.close()


async def test_fresh_hub_activity_is_not_probed_after_a_first_look(store):
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=T0 - 2 * M)
    hub.add(srv, Probe(ok=True, status_last_activity=T0 - 2 * M))
    sw = make(store, hub, clock)
    await sw.run_once()
    assert len(hub.probe_calls) == 1  # first sighting: probed once
    clock.advance(5 * M)
    hub.servers[("alice", "")] = server(la=clock.now - M)
    r = await sw.run_once()
    assert len(hub.probe_calls) == 1 and not r.rows[0].obs.probed


async def test_pending_stop_is_recorded_and_not_repeated(store):
    hub, clock, srv, sw = await stop_due(store, FakeHub(stop_outcome="pending"))
    r = await sw.run_once()
    assert r.stops_pending == 1 and hub.stops == [("alice", "")]
    clock.advance(5 * M)
    r = await sw.run_once()
    assert r.rows[0].obs.state is State.PENDING and hub.stops == [("alice", "")]


async def test_a_refused_stop_is_recorded_said_on_the_row_and_asked_again_not_taken_for_pending(store, caplog):
    # the hub's 403 (refresh_pre_stop): not a stop in progress, not stopped; the next sweep asks again
    hub, clock, srv, sw = await stop_due(store, FakeHub(stop_outcome="refused"))
    with caplog.at_level("WARNING", logger="reaper.stops"):
        r = await sw.run_once()
        assert r.stops == 0 and r.stops_pending == 0 and r.stops_failed == 1
        assert r.rows[0].outcome.startswith("stop refused by the hub: HTTP 403")
        clock.advance(5 * M)
        r = await sw.run_once()
    assert r.rows[0].obs.state is not State.PENDING and r.rows[0].outcome.startswith("stop refused")
    assert hub.stops == [("alice", ""), ("alice", "")]
    kinds = [a.kind for a in store.reports.recent_actions(clock.now - 60 * M)]
    assert kinds.count("stop-refused") == 2 and "stop" not in kinds
    assert [rec.levelname for rec in caplog.records if "refused" in rec.getMessage().lower()] == ["ERROR", "WARNING"]


async def test_quiet_hours_postpone_a_warning_but_never_a_final_notice(store):
    # 12:00 UTC is 07:00 in Montreal: quiet hours 22:00-08:00 local are still on
    extra = "\nhub: {timezone: America/Montreal}\nnotify: {quiet_hours: {start: '22:00', end: '08:00'}}\n"
    hub, clock = FakeHub(), Clock(T0)
    hub.add(server(user="w", la=T0 - 70 * M), detached_probe(T0 - 70 * M))
    hub.add(server(user="f", la=T0 - 160 * M), detached_probe(T0 - 160 * M))
    sw = make(store, hub, clock, extra)
    r = await sw.run_once()
    by_user = {row.obs.server.user: row for row in r.rows}
    assert by_user["w"].decision.action is Action.OK
    assert "warning postponed: quiet hours until 08:00" in by_user["w"].decision.reason
    assert by_user["f"].decision.action is Action.FINAL
    clock.advance(61 * M)  # 08:01 local: the warning goes out
    r = await sw.run_once()
    assert {row.obs.server.user: row for row in r.rows}["w"].decision.action is Action.WARN


async def test_daily_cap_postpones_warnings_and_reminders_per_user(store):
    extra = "\nnotify: {max_notices_per_day: 2}\n"
    hub, clock = FakeHub(), Clock(T0)
    for name in ("a", "b", "c"):
        hub.add(server(name=name, la=T0 - 70 * M), detached_probe(T0 - 70 * M))
    r = await make(store, hub, clock, extra).run_once()
    actions = sorted(row.decision.action.value for row in r.rows)
    assert actions == ["ok", "warn", "warn"]
    assert any("already got 2 notices in 24 h" in row.decision.reason for row in r.rows)


def test_quiet_hours_over_midnight_and_within_a_day():
    from zoneinfo import ZoneInfo

    from reaper.config import QuietHours
    from reaper.core.notices import quiet_hours_end

    tz = ZoneInfo("UTC")
    q = QuietHours(start="22:00", end="07:00")
    assert quiet_hours_end(q, datetime(2026, 1, 1, 23, 0, tzinfo=UTC), tz) == datetime(2026, 1, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(q, datetime(2026, 1, 2, 3, 0, tzinfo=UTC), tz) == datetime(2026, 1, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(q, datetime(2026, 1, 2, 12, 0, tzinfo=UTC), tz) is None
    lunch = QuietHours(start="12:00", end="13:00")
    assert quiet_hours_end(lunch, datetime(2026, 1, 2, 12, 30, tzinfo=UTC), tz) == datetime(2026, 1, 2, 13, 0, tzinfo=UTC)
    assert quiet_hours_end(lunch, datetime(2026, 1, 2, 13, 0, tzinfo=UTC), tz) is None


async def test_a_stop_that_completed_after_a_pending_202_still_tells_the_user(store):
    hub, clock, srv, sw = await stop_due(store, FakeHub(stop_outcome="pending"))
    await sw.run_once()  # 202: stop pending
    del hub.servers[("alice", "")]  # the spawner finished stopping later
    clock.advance(5 * M)
    await sw.run_once()
    assert NoticeKind.STOPPED in kinds(store, srv.run_key())
    assert srv.run_key() not in store.runs.open_runs()


async def test_a_stop_the_hub_refused_is_asked_again_next_sweep(store):
    hub, clock, srv, sw = await stop_due(store, FakeHub(stop_outcome="error"))
    r = await sw.run_once()
    assert r.stops_failed == 1
    clock.advance(5 * M)
    await sw.run_once()
    assert hub.stops == [("alice", ""), ("alice", "")]


async def test_a_pending_stop_is_not_resent_before_the_timeout_then_reported(store):
    since = T0 - 10 * 60 * M
    hub, clock, srv, sw = await stop_due(store, FakeHub(stop_outcome="pending"))
    await sw.run_once()
    hub.servers[("alice", "")] = server(la=since)  # the hub dropped the stop: not pending any more
    for _ in range(3):  # within pending_stop_timeout (5m): not asked again
        clock.advance(M)
        await sw.run_once()
    assert len(hub.stops) == 1
    clock.advance(5 * M)
    await sw.run_once()
    assert len(hub.stops) == 2
    assert any(a.kind == "stop-pending-timeout" for a in store.reports.recent_actions(T0))


def test_a_lease_of_a_dead_process_on_this_host_can_be_taken_over():
    import socket
    import subprocess

    from reaper.service import lease_holder_is_dead

    p = subprocess.Popen(["true"])
    p.wait()
    assert lease_holder_is_dead(f"{socket.gethostname()}:{p.pid}")
    assert not lease_holder_is_dead(f"{socket.gethostname()}:{os.getpid()}")
    assert not lease_holder_is_dead(f"other-host:{p.pid}")


async def test_the_route_table_is_fetched_only_when_a_probed_server_has_no_known_address(store):
    class TableHub(FakeHub):
        fetches = 0
        table_ok = False

        async def refresh_targets(self):
            self.fetches += 1
            return {"/user/alice/": "http://127.0.0.1:1"} if self.table_ok else {}

        async def target_for(self, server):
            return "http://127.0.0.1:1" if self.table_ok else None

    since = T0 - 70 * M
    hub, clock = TableHub(), Clock(T0)
    srv = HubServer(user="alice", name="", started=T0 - 5 * 60 * M, last_activity=since, url="/user/alice/")
    hub.add(srv, detached_probe(since))
    st = settings().model_copy(update={"probe": settings().probe.model_copy(update={"skip_fresh": False})})
    sw = Sweeper(st, hub, store, notifier=Outbox(store, {"log": LogChannel()}),
                 clock=clock)
    await sw.run_once()
    await sw.run_once()
    assert hub.fetches == 2  # the fetch failed: tried again, never taken as known
    hub.table_ok = True
    await sw.run_once()
    await sw.run_once()
    assert hub.fetches == 3  # known now: not fetched again
    hub.servers[("alice", "")] = HubServer(user="alice", name="", started=T0, last_activity=since, url="/user/alice/")
    await sw.run_once()
    assert hub.fetches == 4  # a new run of the server: its address may have changed


async def test_a_stop_asked_before_a_crash_is_finished_by_the_next_sweep(store):
    # The intent was durable and the hub stopped the server, but the reaper died before recording
    # the outcome: the next sweep finds the run gone, records the stop and tells the user.
    since = T0 - 10 * 60 * M
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    hub.add(srv, detached_probe(since))
    sw = make(store, hub, clock)
    await sw.run_once()
    key = srv.run_key()
    clock.advance(31 * M)
    store.runs.mark_stops_requested([key], clock.now)
    hub.servers.clear()  # stopped by the hub; the outcome never written
    clock.advance(5 * M)
    r = await make(store, hub, clock).run_once()  # a new process
    assert r.ok and key not in store.runs.open_runs()
    assert NoticeKind.STOPPED in kinds(store, key)
    [act] = [a for a in store.reports.recent_actions(T0 - timedelta(days=1)) if a.kind == "stop"]
    assert act.ok and "no longer lists the server" in act.detail


async def test_a_server_that_answered_from_before_the_listing_needs_no_second_hub_lookup(store):
    # /api/status "started" says the answering server predates the listing: it is the listed run,
    # so an old listing costs no GET /users/{name} per stop.
    since = T0 - 10 * 60 * M
    hub, clock = FakeHub(), Clock(T0)
    srv = server(la=since)
    probe = Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "idle", 0, since),),
                  status_started=srv.started)
    hub.add(srv, probe)
    sw = make(store, hub, clock)
    await sw.run_once()
    clock.advance(31 * M)
    orig, lookups = hub.probe_status, []

    async def slow_probe(server):
        clock.advance(2 * M)
        return await orig(server)

    async def get_server(user, name=""):
        lookups.append(user)
        return hub.servers.get((user, name))

    hub.probe_status, hub.get_server = slow_probe, get_server
    r = await sw.run_once()
    assert hub.stops == [("alice", "")] and r.stops == 1 and lookups == []
    assert hub.status_calls == [("alice", "")]  # the look took 2 minutes: the listing was old


async def test_a_sweep_that_keeps_no_rows_counts_the_same(store, tmp_path):
    # The service's sweeper keeps counts, not one row per server: the metrics, the health page and
    # the log line need only those. Same hub, same decisions: same counts as a sweep keeping rows.
    results = []
    for keep in (True, False):
        db = Store.open(f"sqlite:///{tmp_path / f'keep-{keep}.sqlite'}")
        hub, clock = FakeHub(), Clock(T0)
        hub.add(server(user="idle", la=T0 - 70 * M), detached_probe(T0 - 70 * M))
        hub.add(server(user="busy", la=T0), busy_probe(T0))
        hub.add(server(user="gone", la=T0 - 10 * 60 * M), detached_probe(T0 - 10 * 60 * M))
        sw = make(db, hub, clock, "\nnotify: {max_notices_per_day: 5}\n")
        sw.keep_rows = keep
        await sw.run_once()
        clock.advance(31 * M)
        r = await sw.run_once()
        results.append(r)
        assert (r.rows != []) == keep
        db.close()
    kept, lean = results
    timing = ("phases", "phases_cpu", "phases_rss")
    assert {k: v for k, v in lean.summary().items() if k not in timing} == \
        {k: v for k, v in kept.summary().items() if k not in timing}
    assert lean.actions == kept.actions and lean.queued == kept.queued and lean.servers == 3
    assert kept.actions["stop (stopped)"][0] == 1 and lean.states == {"detached": 2, "computing": 1}
    # what the rows say, the counts say
    assert sum(n for n, _ in kept.actions.values()) == len(kept.rows) == kept.servers
    # a dry run (the web page's "next sweep") keeps its rows whatever the sweeper keeps
    hub = FakeHub()
    hub.add(server(la=T0 - 70 * M), detached_probe(T0 - 70 * M))
    sw = make(store, hub, Clock(T0))
    sw.keep_rows = False
    dry = await sw.run_once(dry_run=True)
    assert [r.outcome for r in dry.rows] == ["would send warning"] and dry.servers == 1


async def test_the_hub_is_looked_at_and_recorded_batch_by_batch(store, batch):
    # A batch's histories are read, its servers looked at, and its rows recorded before the next
    # batch is read: a sweep holds one batch of rows and histories, not the whole hub's.
    hub, clock = FakeHub(), Clock(T0)
    for i in range(3):
        hub.add(server(user=f"u{i}", la=T0 - 70 * M), detached_probe(T0 - 70 * M))
    events = []
    for name in ("histories", "record_many"):
        real = getattr(store.runs, name)

        def spy(items, *a, _real=real, _name=name, **kw):
            items = list(items)
            events.append((_name, len(items)))
            return _real(items, *a, **kw)

        setattr(store.runs, name, spy)
    r = await make(store, hub, clock).run_once()
    assert r.ok and r.notices == 3
    looks = [e for e in events if e[0] in ("histories", "record_many")]
    if batch == 1:
        assert looks == [("histories", 1), ("record_many", 1)] * 3
    else:
        assert looks == [("histories", 3), ("record_many", 3)]


# --- a detached server's next look: /api/status alone when nothing happened ---------------------


async def _timeline(store, confirm: bool):
    """alice and bob detached for 70 min; a sweep every 5 minutes until both are stopped. bob's
    kernel starts computing at +20 min, then finishes at +60 min (silent computations move
    /api/status last_activity through the kernel's busy/idle messages); alice's kernel is shut down
    at +30 min (which does not move it)."""
    since = T0 - 70 * M
    hub, clock = FakeHub(), Clock(T0)
    hub.add(server(la=since), detached_probe(since))
    hub.add(server(user="bob", la=since), detached_probe(since))
    sw = make(store, hub, clock, policy=POLICY if confirm else FULL_LOOKS)
    assert sw.settings.probe.confirm_with_status is confirm
    seen, summaries = [], []
    for step in range(60):
        if step == 4:
            hub.probes[("bob", "")] = busy_probe(clock.now)
        if step == 12:
            hub.probes[("bob", "")] = detached_probe(clock.now)
        if step == 6:  # alice's kernel is shut down: /api/status last_activity does not move
            hub.probes[("alice", "")] = Probe(ok=True, status_last_activity=since, kernels=())
        r = await sw.run_once()
        summaries.append(r.summary())
        seen.append(sorted((x.obs.server.user, x.obs.state.value, x.decision.action.value, x.decision.reason,
                            x.obs.detail, x.outcome) for x in r.rows))
        if not hub.servers:
            break
        clock.advance(5 * M)
    return hub, seen, summaries


async def test_a_detached_servers_next_look_is_status_alone_and_decides_exactly_as_a_full_probe(store, tmp_path):
    other = Store.open(f"sqlite:///{tmp_path / 'full.sqlite'}")
    try:
        full_hub, full, full_summaries = await _timeline(other, confirm=False)
    finally:
        other.close()
    hub, confirmed, summaries = await _timeline(store, confirm=True)
    assert confirmed == full  # every state, decision, reason, detail and outcome
    assert sorted(hub.stops) == sorted(full_hub.stops) == [("alice", ""), ("bob", "")]
    # A full probe is made at a first look, after a look that was not "detached", when the status
    # moved (bob's computation starting at sweep 4) and when the kernel count changed (alice's at
    # sweep 6); every other look is status alone.
    for user, changed in (("alice", 6), ("bob", 4)):
        states = [row[1] for sweep in full for row in sweep if row[0] == user]
        needs_full = sum(1 for i in range(len(states)) if i in (0, changed) or states[i - 1] != "detached")
        assert full_hub.probe_calls.count((user, "")) == len(states)
        assert hub.probe_calls.count((user, "")) == needs_full < len(states)
        assert hub.status_calls.count((user, "")) >= len(states) - needs_full
    assert sum(r["probes_status_only"] for r in summaries) == sum(
        sum(1 for sweep in confirmed for row in sweep if row[0] == user) for user in ("alice", "bob")
    ) - len(hub.probe_calls)
    assert all(r["probes_status_only"] == 0 for r in full_summaries)
    # the full look that follows a status look that saw a change does not ask the status again
    assert sorted(set(hub.probes_after_status)) == [("alice", ""), ("bob", "")] and full_hub.probes_after_status == []
    assert "computing" in [row[1] for sweep in full for row in sweep if row[0] == "bob"]
    assert "no browser connected, no kernel running" in [row[4] for sweep in full for row in sweep]


async def test_a_failed_status_is_the_failed_probe_and_the_spell_goes_on(store):
    since = T0 - 70 * M
    hub, clock, srv, sw = one_detached(store, since)
    await sw.run_once()
    clock.advance(5 * M)
    hub.probes[("alice", "")] = Probe.failed("status: timeout after 5s")
    r = await sw.run_once()
    row = r.rows[0]
    assert row.obs.state is State.UNREACHABLE and "timeout" in row.obs.detail
    assert row.obs.idle_since == since  # continue_spell: the same spell, no second warning
    assert hub.probe_calls == [("alice", "")] and hub.status_calls == [("alice", "")]
    assert row.decision.action is Action.OK


async def test_status_alone_can_be_turned_off(store):
    hub, clock, _, sw = one_detached(store, T0 - 70 * M, policy=FULL_LOOKS)
    assert not sw.settings.probe.confirm_with_status
    for _ in range(3):
        await sw.run_once()
        clock.advance(5 * M)
    assert hub.probe_calls == [("alice", "")] * 3 and hub.status_calls == []


# --------------------------------------------------------------------------- working: a program running


def sleep_in_terminal(started: datetime) -> Work:
    """`sleep 100000` in terminal 1, its tab closed: in the foreground, using no CPU."""
    return Work(programs=(Program("sleep", Where.TERMINAL, "1", 0.0, started, 321, foreground=True),),
                companion="ok")


async def test_sleep_in_a_terminal_is_protected_for_protect_idle_only_then_warned_and_stopped_naming_it(store):
    hub, clock, srv, sw = one_detached(store, T0 - 2 * timedelta(hours=1))
    key = srv.run_key()
    hub.activities[("alice", "")] = sleep_in_terminal(T0 - 30 * M)

    r = await sw.run_once()  # due for a warning, but a command runs in terminal 1
    assert r.rows[0].obs.state is State.WORKING and r.rows[0].decision.action is Action.OK
    assert "sleep in terminal 1 is running (no CPU for 30m" in r.rows[0].decision.reason
    assert kinds(store, key) == []

    clock.advance(85 * M)  # 1h55m without CPU: still protected; a new process (the memory is the store's)
    sw = make(store, hub, clock)
    r = await sw.run_once()
    assert r.rows[0].obs.state is State.WORKING and kinds(store, key) == []
    assert store.runs.histories([key])[key].working_at == clock.now

    clock.advance(10 * M)  # 2h05m: no longer protected; idle from the last look that saw it working
    r = await sw.run_once()
    row = r.rows[0]
    assert row.obs.state is State.DETACHED and "sleep in terminal 1 has used no CPU for 2h05m" in row.obs.detail
    assert row.decision.action is Action.OK and row.decision.spell == T0 + 85 * M
    assert kinds(store, key) == []

    clock.advance(60 * M)  # 1h after the spell began: the warning names it
    r = await sw.run_once()
    assert r.rows[0].decision.action is Action.WARN
    assert kinds(store, key) == [NoticeKind.WARNING]
    (notice,) = store.reports.recent_notices(T0)
    with store.db.read() as s:  # what the notice will say: its context, as queued
        ctx = s.execute(select(NOTICES.c.context).where(NOTICES.c.id == notice.id)).scalar_one()
    assert "sleep in terminal 1 has used no CPU for 3h05m" in ctx["detail"]

    for _ in range(8):  # reminders, the final notice, the stop: as for any idle server
        clock.advance(30 * M)
        await sw.run_once()
    assert hub.stops == [("alice", "")]
    assert NoticeKind.FINAL in kinds(store, key)


async def test_a_python_loop_in_a_closed_terminal_is_never_stopped_and_the_companion_is_asked_once_a_sweep(store):
    hub, clock, srv, sw = one_detached(store, T0 - 4 * timedelta(hours=1))
    cpu = 0.0
    for i in range(12):  # 6 hours: past warn_after and stop_after many times over
        cpu += 0.1 * 30 * 60  # 10 % of a core
        hub.activities[("alice", "")] = Work(
            programs=(Program("python", Where.TERMINAL, "1", cpu, T0 - 30 * M, 99),), companion="ok")
        r = await sw.run_once()
        assert r.rows[0].obs.state is State.WORKING, r.rows[0].obs.detail
        assert r.rows[0].decision.action is Action.OK
        assert len(hub.activity_calls) == i + 1  # one request per sweep for this server
        clock.advance(30 * M)
    assert hub.stops == [] and kinds(store, srv.run_key()) == []
    assert "python in terminal 1 used 3m of CPU in the last 30m" in r.rows[0].decision.reason
    line = format_table(r, UTC).splitlines()[1]  # the dry-run table: no idle time, what runs
    assert line.split()[2:4] == ["working", "-"] and "python in terminal 1 used 3m of CPU" in line
