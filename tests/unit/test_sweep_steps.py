"""Each step of the sweep on its own (reaper.sweep.Sweeper's collect, observe, decide, limit,
hold, safety, record), and the stop procedure (reaper.stops), with a scripted hub (tests.fakes)
and a store that answers reads and fails the test on any write: the steps that do not write need
no database, and a dry run must write nothing."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from reaper.batch.base import BatchError, Job, JobState
from reaper.batch.guard import JobGuard
from reaper.config import parse_settings
from reaper.core.model import (
    Action,
    History,
    HubServer,
    Kernel,
    NoticeKind,
    Probe,
    Program,
    SentNotice,
    State,
    Where,
    Work,
)
from reaper.hub import HubListingError
from reaper.stops import Asked, StopOutcome, Stops, stop_record
from reaper.sweep import DryEffects, Effects, Row, Sweeper, SweepResult, SweepRun
from tests.fakes import Clock, FakeHub

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
M = timedelta(minutes=1)
H = timedelta(hours=1)

POLICY = """
sweep_every: 5m
probe: {skip_fresh: false}
safety: {max_stops_per_sweep: 2, max_stop_fraction: 1.0}
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  attached: {warn_after: 8h, stop_after: 24h}
  remind_every: 1h
  min_notice: 30m
  channels: [log]
"""


class ReadOnlyStore:
    """The store's reads, scripted; every write fails the test. One object stands for each of the
    store's subjects (runs, outbox, reports): their method names do not overlap."""

    @property
    def runs(self) -> ReadOnlyStore:
        return self

    outbox = reports = runs

    def __init__(self, histories: dict | None = None, could: set | None = None, recent: list | None = None):
        self.hists = histories or {}
        self.could = could or set()
        self.recent = recent or []
        self.reads: list[str] = []

    def histories(self, runs):
        self.reads.append("histories")
        return {k: self.hists[k] for k in runs if k in self.hists}

    def could_stop_runs(self, runs):
        self.reads.append("could_stop_runs")
        return {k for k in runs if k in self.could}

    def recent_notices(self, since, limit=200):
        self.reads.append("recent_notices")
        return list(self.recent)

    def open_runs(self):
        self.reads.append("open_runs")
        return []

    def __getattr__(self, name: str) -> Any:  # start_sweep, record_many, mark_stops_requested ...
        def write(*a: Any, **kw: Any) -> None:
            pytest.fail(f"the store was written to: {name}")

        return write


class JobsGuard:
    """A batch guard (reaper.ports.Guard) that knows the hub's jobs and records what it was asked."""

    def __init__(self, jobs: dict[str, Job] | None = None, cpu: dict[str, float] | None = None,
                 cpu_error: str | None = None) -> None:
        self.jobs = jobs
        self.after: list[tuple[str, str]] = []
        self.reconciled: list[bool] = []
        self.cpu = cpu or {}  # the batch accounting: cumulative CPU seconds per job
        self.cpu_error = cpu_error  # cpu_usage raises BatchError with it
        self.cpu_calls: list[list[str]] = []

    async def cpu_usage(self, job_ids):
        self.cpu_calls.append(list(job_ids))
        if self.cpu_error is not None:
            raise BatchError(self.cpu_error)
        return {j: self.cpu[j] for j in job_ids if j in self.cpu}

    async def hub_jobs(self):
        return self.jobs

    async def after_stop(self, server, outcome, now):
        self.after.append((server.user, outcome))
        return "gone"

    async def reconcile(self, servers, jobs, now, *, dry_run=False):
        self.reconciled.append(dry_run)
        return []


def srv(user="alice", la=T0 - 2 * H, job="7", **kw) -> HubServer:
    return HubServer(user=user, name="", started=T0 - 5 * H, last_activity=la, url=f"/user/{user}/",
                     target="http://127.0.0.1:1", state={"job_id": job}, **kw)


def idle(since: datetime) -> Probe:
    return Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "idle", 0, since),))


def sweeper(store, hub, extra: str = "", guard=None) -> Sweeper:
    return Sweeper(parse_settings(POLICY + extra, env={}), hub, store, stop_hook=guard, clock=Clock(T0))


def run_of(sw: Sweeper, *, dry: bool = False) -> SweepRun:
    return SweepRun(SweepResult(started_at=T0, dry_run=dry), T0, DryEffects(sw) if dry else Effects(sw))


def row(decision_action=Action.OK, notice=None, user="alice", streamed=False) -> Row:
    from reaper.core.model import Decision, Observation

    obs = Observation(server=srv(user), state=State.DETACHED, at=T0, last_activity=T0 - 2 * H)
    return Row(obs, Decision(decision_action, "idle 2h", notice=notice, channels=("log",)),
               parse_settings(POLICY, env={}).default_rule(), streamed=streamed)


# --------------------------------------------------------------------------- collect


async def test_collect_reads_the_listing_the_jobs_and_the_runs_that_could_stop_and_streams_within_limits():
    hub = FakeHub()
    for u in ("a", "b", "c"):
        hub.add(srv(u))
    keys = {srv(u).run_key() for u in ("a", "b")}
    job = Job("7", "a", "jupyterhub-reaper", JobState.RUNNING, gpus=1)
    sw = sweeper(ReadOnlyStore(could=keys), hub, guard=JobsGuard({"7": job}))
    run = run_of(sw)
    await sw.collect(run)
    assert len(run.servers) == 3 and run.could == keys and run.jobs == {"7": job}
    assert run.stream  # two could stop, the limit is two: the limits cannot trip
    assert sw.known_job(srv("a")) is job  # kept for the page's rule lookup


async def test_collect_does_not_stream_past_the_limits_nor_in_a_dry_run():
    hub = FakeHub()
    for u in ("a", "b", "c"):
        hub.add(srv(u))
    keys = {srv(u).run_key() for u in ("a", "b", "c")}
    sw = sweeper(ReadOnlyStore(could=keys), hub)
    run = run_of(sw)
    await sw.collect(run)
    assert not run.stream  # three could stop, more than the limit: each goes through the safety check
    sw = sweeper(ReadOnlyStore(could={srv("a").run_key()}), hub)
    run = run_of(sw, dry=True)
    await sw.collect(run)
    assert not run.stream and run.effects.stops is None  # a dry run stops nothing


async def test_a_failed_listing_ends_a_sweep_before_anything_is_looked_at():
    hub = FakeHub(fail_listing=True)
    hub.add(srv(), idle(T0 - 2 * H))
    res = await sweeper(ReadOnlyStore(), hub).run_once(dry_run=True)
    assert not res.ok and "HubListingError" in (res.error or "") and hub.probe_calls == []
    with pytest.raises(HubListingError):
        await sweeper(ReadOnlyStore(), hub).collect(run_of(sweeper(ReadOnlyStore(), hub)))


# --------------------------------------------------------------------------- look, decide


async def test_observe_asks_the_status_alone_of_a_server_detached_at_its_last_look():
    hub = FakeHub()
    s = srv()
    hub.add(s, idle(T0 - 2 * H))
    sw = sweeper(ReadOnlyStore(), hub)
    run = run_of(sw)
    from reaper.core.activity import detached_detail

    run.histories = {s.run_key(): History(last_state="detached", detached_since=T0 - 2 * H,
                                          last_detail=detached_detail(1, 0))}
    obs, probe = await sw.observe(run, s, None, True)
    assert hub.status_calls == [("alice", "")] and hub.probe_calls == []
    assert obs.state is State.DETACHED and run.res.probes_status_only == 1 and run.res.probes == 1
    run.histories = {}  # no history: the full look
    await sw.observe(run, s, None, True)
    assert hub.probe_calls == [("alice", "")]


async def test_observe_without_a_probe_uses_hub_data_and_the_jobs_walltime():
    hub = FakeHub()
    s = srv()
    sw = sweeper(ReadOnlyStore(), hub)
    end = T0 + 3 * H
    obs, probe = await sw.observe(run_of(sw), s, Job("7", "alice", "x", JobState.RUNNING, end=end), False)
    assert probe is None and hub.probe_calls == [] and hub.status_calls == [] and obs.job_end == end


async def test_decide_turns_an_observation_into_the_servers_row_by_the_policy():
    hub = FakeHub()
    s = srv()
    hub.add(s, idle(T0 - 2 * H))
    sw = sweeper(ReadOnlyStore(), hub)
    run = run_of(sw)
    obs, probe = await sw.observe(run, s, None, True)
    r = sw.decide(run, sw.rule_for(s), obs, probe)
    assert r.decision.action is Action.WARN and r.decision.notice is NoticeKind.WARNING and r.outcome == ""


def test_rule_for_matches_a_gpu_rule_by_the_batch_jobs_gpus():
    sw = sweeper(ReadOnlyStore(), FakeHub(), "rules:\n  - name: gpu\n    match: {min_gpus: 1}\n    max_age: 6h\n")
    s = srv()
    assert sw.rule_for(s).name != "gpu"
    gpu = sw.rule_for(s, Job("7", "alice", "x", JobState.RUNNING, gpus=2))
    assert gpu.name == "gpu" and gpu.max_age == 6 * H


# --------------------------------------------------------------------------- limit, hold, safety


async def test_limit_postpones_warnings_in_quiet_hours_and_never_a_final_notice():
    sw = sweeper(ReadOnlyStore(), FakeHub(), "notify: {quiet_hours: {start: '11:00', end: '13:00'}}\n")
    rows = [row(Action.WARN, NoticeKind.WARNING), row(Action.FINAL, NoticeKind.FINAL, user="bob")]
    await sw.limit(run_of(sw), rows)
    assert rows[0].decision.action is Action.OK and "quiet hours until 13:00" in rows[0].decision.reason
    assert rows[1].decision.notice is NoticeKind.FINAL


async def test_limit_reads_the_daily_counts_once_and_carries_them_across_batches():
    store = ReadOnlyStore(recent=[SimpleNamespace(user="alice", kind="warning")])  # a NoticeRow's two fields
    sw = sweeper(store, FakeHub(), "notify: {max_notices_per_day: 2}\n")
    run = run_of(sw)
    first, second = [row(Action.WARN, NoticeKind.WARNING)], [row(Action.REMIND, NoticeKind.REMINDER)]
    await sw.limit(run, first)
    await sw.limit(run, second)
    assert store.reads.count("recent_notices") == 1
    assert first[0].decision.notice is NoticeKind.WARNING  # her second in 24 h
    assert second[0].decision.notice is None and "already got 2 notices" in second[0].decision.reason


def test_hold_keeps_back_the_stops_that_did_not_stream():
    sw = sweeper(ReadOnlyStore(), FakeHub())
    run = run_of(sw)
    rows = [row(Action.STOP), row(Action.STOP, streamed=True), row(Action.WARN, NoticeKind.WARNING)]
    done = sw.hold(run, rows)
    assert run.held == [rows[0]] and done == rows[1:]


async def test_safety_holds_every_stop_past_the_limit_and_notes_it():
    class Noted(DryEffects):
        notes: list = []

        async def note(self, kind, ok, detail, now):
            self.notes.append((kind, ok, detail))

    sw = sweeper(ReadOnlyStore(), FakeHub())
    run = SweepRun(SweepResult(started_at=T0), T0, Noted(sw))
    run.servers = [srv(u) for u in "abcd"]
    run.held = [row(Action.STOP, user=u) for u in "abc"]
    await sw.safety(run)
    assert run.res.safety_tripped and run.res.held == 3
    assert all(r.decision.action is Action.OK and "[held: safety limit]" in r.decision.reason for r in run.held)
    [(kind, ok, detail)] = Noted.notes
    assert kind == "safety-limit" and not ok and "would stop 3 of 4" in detail
    run.res = SweepResult(started_at=T0)  # within the limit: nothing held
    run.held = [row(Action.STOP, user=u) for u in "ab"]
    await sw.safety(run)
    assert not run.res.safety_tripped and all(r.decision.action is Action.STOP for r in run.held)


async def test_a_dry_runs_record_says_what_would_be_done_and_writes_nothing():
    sw = sweeper(ReadOnlyStore(), FakeHub())
    run = run_of(sw, dry=True)
    rows = [row(Action.STOP), row(Action.WARN, NoticeKind.WARNING)]
    await sw.record(run, rows)
    assert [r.outcome for r in rows] == ["would stop", "would send warning"]
    assert not any(r.queued for r in rows) and run.res.notices == 0


def test_phases_time_each_step_and_a_phase_inside_another_gets_its_own_cpu():
    res = SweepResult(started_at=T0)
    with res.phase("stop"):
        with res.phase("stop.hub"):
            sum(range(200_000))
    with res.phase("stop"):
        pass
    assert set(res.phases) == set(res.phases_cpu) == set(res.phases_rss) == {"stop", "stop.hub"}
    assert res.phases["stop"] >= res.phases["stop.hub"] >= 0
    summary = res.summary()
    assert summary["phases"] is res.phases and summary["phases_cpu"] is res.phases_cpu


# --------------------------------------------------------------------------- a whole dry run


class FakeBatch:
    """A batch system (reaper.batch.base.BatchSystem) with scripted jobs; cancels are recorded."""

    def __init__(self, jobs: list[Job]) -> None:
        self.listed = jobs
        self.cancelled: list[str] = []

    async def jobs(self, *, name=None, user=None):
        return list(self.listed)

    async def job(self, job_id):
        return next((j for j in self.listed if j.id == job_id), None)

    async def cancel(self, job_id, *, user=None):
        self.cancelled.append(job_id)


async def test_a_dry_run_reports_orphan_jobs_without_cancelling_them_and_writes_nothing(caplog):
    # The guard promises orphan reports in dry runs; a dry run from the command line has a fresh
    # guard, so the orphan's age is read from the job's start.
    hub = FakeHub()
    hub.add(srv(), idle(T0 - 2 * H))
    orphan = Job("99", "bob", "jupyterhub-reaper", JobState.RUNNING, partition="gpu", node="n1",
                 start=T0 - 3 * H)
    batch = FakeBatch([Job("7", "alice", "jupyterhub-reaper", JobState.RUNNING, start=T0 - 5 * H), orphan])
    guard = JobGuard(batch, ReadOnlyStore(), clock=Clock(T0))
    res = await sweeper(ReadOnlyStore(), hub, guard=guard).run_once(dry_run=True)
    assert res.ok and res.orphans == 1 and batch.cancelled == []
    assert any("orphan job 99 of bob" in m and "dry run" in m for m in caplog.messages)
    assert guard._orphan_seen == {}  # nothing remembered: a dry run changes nothing
    from reaper.sweep import format_table

    assert "1 orphan batch job(s) (not cancelled)" in format_table(res, UTC)


async def test_a_dry_run_of_a_stop_due_asks_the_hub_nothing_and_writes_nothing():
    hub = FakeHub()
    s = srv(la=T0 - 10 * H)
    hub.add(s, idle(T0 - 10 * H))
    final = SentNotice(NoticeKind.FINAL, T0 - 10 * H, T0 - 2 * H, delivered_at=T0 - 2 * H)
    store = ReadOnlyStore(histories={s.run_key(): History(notices=(final,), last_state="detached",
                                                          detached_since=T0 - 10 * H)},
                          could={s.run_key()})
    guard = JobsGuard({})
    res = await sweeper(store, hub, guard=guard).run_once(dry_run=True)
    assert res.ok and [r.outcome for r in res.rows] == ["would stop"]
    assert hub.stops == [] and guard.after == [] and guard.reconciled == [True]


# --------------------------------------------------------------------------- the stop procedure


def test_one_map_from_a_stops_outcome_to_its_record_kind_and_page_code():
    table = {o: (o.record_kind, o.page_code, o.done, o.ok) for o in StopOutcome}
    assert table == {
        StopOutcome.STOPPED: ("stop", "stopped", True, True),
        StopOutcome.GONE: ("stop", "gone", True, True),
        StopOutcome.PENDING: ("stop-pending", "stop-pending", False, True),
        StopOutcome.REFUSED: ("stop-refused", "stop-refused", False, False),
        StopOutcome.FAILED: ("stop-failed", "stop-failed", False, False),
    }
    # the hub client's words
    assert {o.value for o in StopOutcome} == {"stopped", "gone", "pending", "refused", "error"}


def test_a_stop_record_ends_the_run_and_queues_the_notice_only_when_it_stopped():
    key = srv().run_key()
    ctx = {"user": "alice"}
    for outcome in StopOutcome:
        rec = stop_record(key, Asked(outcome, "HTTP 204", T0), "idle 10h", job_id="7",
                          end_reason="stopped by the reaper", notice_context=ctx, channels=("email",))
        assert rec.kind == outcome.record_kind and rec.ok == outcome.ok
        assert rec.detail == f"idle 10h | hub: {outcome.value} (HTTP 204)"
        if outcome.done:
            assert rec.end_reason == "stopped by the reaper" and rec.notice_context is ctx
            assert rec.channels == ("email",)
        else:
            assert rec.end_reason is None and rec.notice_context is None


class OrderStore(ReadOnlyStore):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def mark_stop_requested(self, run, now):
        self.log.append("intent")

    def record_stops(self, items, now):
        self.log.extend(f"record {it.kind} by {it.actor}" for it in items)
        return [None for _ in items]


@pytest.mark.parametrize("hub_says", ["stopped", "pending", "error"])
async def test_stop_now_remembers_the_intent_before_the_hub_is_asked_then_records_and_guards(hub_says):
    order: list[str] = []
    hub = FakeHub(stop_outcome=hub_says)
    hub.add(srv(), idle(T0))
    orig = hub.stop

    async def stop(user, name=""):
        order.append("hub stop")
        return await orig(user, name)

    hub.stop = stop
    guard = JobsGuard()
    stops = Stops(hub, OrderStore(order), guard, clock=Clock(T0), concurrency=2)
    outcome = await stops.stop_now("alice", "", actor="carol")
    assert outcome is StopOutcome(hub_says)
    assert order == ["intent", "hub stop", f"record {outcome.record_kind} by carol"]
    assert guard.after == [("alice", hub_says)]


async def test_a_refused_stop_is_recorded_logged_once_as_an_error_and_its_job_left_alone(caplog):
    # the hub said no on purpose (refresh_pre_stop): cancelling the job would overrule it
    order: list[str] = []
    hub = FakeHub(stop_outcome="refused")
    hub.add(srv(), idle(T0))
    guard = JobsGuard()
    stops = Stops(hub, OrderStore(order), guard, clock=Clock(T0), concurrency=2)
    with caplog.at_level("WARNING", logger="reaper.stops"):
        for _ in range(3):
            assert await stops.stop_now("alice", "", actor="carol") is StopOutcome.REFUSED
    assert order.count("record stop-refused by carol") == 3
    assert guard.after == []
    levels = [(r.levelname, "REFUSED" in r.getMessage()) for r in caplog.records]
    assert levels == [("ERROR", True), ("WARNING", False), ("WARNING", False)], caplog.text
    assert "3 times for this server run" in caplog.records[-1].getMessage()


async def test_stop_now_of_a_server_the_hub_no_longer_has_asks_nothing():
    hub = FakeHub()
    stops = Stops(hub, ReadOnlyStore(), JobsGuard(), clock=Clock(T0), concurrency=1)
    assert await stops.stop_now("alice", "", actor="carol") is StopOutcome.GONE
    assert hub.stops == []


def test_the_real_adapters_and_the_fakes_implement_the_sweeps_protocols(tmp_path):
    # Every method of each protocol is there: no capability of the sweep quietly turns off (a hub
    # without probe_status would once have turned confirm_with_status off).
    from reaper.hub import HubClient
    from reaper.notify.outbox import LogChannel, Outbox
    from reaper.ports import Guard, Hub, Notifier, StorePort
    from reaper.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        assert isinstance(FakeHub(), Hub) and isinstance(HubClient("http://127.0.0.1:1/hub/api", "t"), Hub)
        assert isinstance(store, StorePort)
        assert isinstance(Outbox(store, {"log": LogChannel()}), Notifier)
        assert isinstance(JobGuard(FakeBatch([]), store), Guard) and isinstance(JobsGuard(), Guard)
        assert not isinstance(object(), Hub)
    finally:
        store.close()


def test_the_stopped_notice_names_what_the_job_held_in_any_spawners_words():
    """reclaimed_words reads user_options through reaper.units: our spawner's ``memory``,
    batchspawner's ``req_*`` and slurmformspawner's MB and gres, not only ``cpus``/``mem``."""
    from datetime import UTC, datetime, timedelta

    from reaper.core.model import HubServer, Observation, State
    from reaper.sweep import reclaimed_words

    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def words(opts: dict, **kw) -> str:
        sv = HubServer(user="ana", name="", started=now - timedelta(hours=3), last_activity=None,
                       user_options=opts, state={"job_id": "42"})
        return reclaimed_words(Observation(server=sv, state=State.DETACHED, at=now, last_activity=None, **kw), now)

    assert words({"memory": "16G", "gpus": 1}).startswith("1 GPU, 16 GB (job 42")
    assert words({"req_nprocs": "4", "req_memory": "8G"}).startswith("4 CPUs, 8 GB")
    assert words({"nprocs": 2, "memory": 4096, "gpus": "gpu:a100:2"}).startswith("2 CPUs, 2 GPUs, 4 GB")
    assert words({}).startswith("its CPUs and memory")
    assert "5h before its walltime" in words({}, job_end=now + timedelta(hours=5))


# --------------------------------------------------------------------------- work (what the job runs)


def loop_in_terminal(cpu: float, started: datetime = T0 - H) -> Work:
    """The companion's report of a silent python loop in terminal 1 (its shell closed)."""
    return Work(programs=(Program("python", Where.TERMINAL, "1", cpu, started, 100),), companion="ok")


def final_for(since: datetime) -> History:
    """A run whose final notice for the spell since ``since`` went out 40 minutes ago: due to stop."""
    return History(notices=(SentNotice(NoticeKind.FINAL, since, T0 - 40 * M, T0 - 40 * M),),
                   last_state="detached", detached_since=since)


async def looked(sw: Sweeper, run: SweepRun) -> dict[str, Row]:
    await sw.collect(run)
    return {r.obs.server.user: r for r in await sw.look(run, run.servers)}


async def test_the_work_look_asks_only_where_it_can_change_the_decision_and_the_accounting_once_per_batch():
    hub = FakeHub()
    hub.add(srv("due", job="1"), idle(T0 - 2 * H))  # past warn_after: a warning without it
    hub.add(srv("early", job="2", la=T0 - 10 * M), idle(T0 - 10 * M))  # nothing due yet
    hub.add(srv("busy", job="3"), Probe(ok=True, status_last_activity=T0 - 2 * H,
                                        kernels=(Kernel("k", "python3", "busy", 0, T0 - 2 * H),)))
    hub.add(srv("was", job="4", la=T0 - 10 * M), idle(T0 - 10 * M))  # working at its last look
    hub.add(srv("nojob", job=""), idle(T0 - 2 * H))  # due, but no batch job: the companion only
    hub.activities[("due", "")] = loop_in_terminal(cpu=600.0)
    guard = JobsGuard(cpu={"1": 10.0, "4": 10.0})
    hists = {srv("was").run_key(): History(last_state="working", working_at=T0 - 5 * M)}
    sw = sweeper(ReadOnlyStore(hists), hub, guard=guard)
    run = run_of(sw, dry=True)
    rows = await looked(sw, run)
    assert sorted(hub.activity_calls) == [("due", ""), ("nojob", ""), ("was", "")]
    assert guard.cpu_calls == [["1", "4"]] and run.res.cpu_usage_calls == 1 and run.res.companion_asks == 3
    due = rows["due"]
    assert due.obs.state is State.WORKING and due.decision.action is Action.OK and due.decision.notice is None
    assert due.decision.reason == ("working: python in terminal 1 used 10m of CPU since it started 1h ago; "
                                   "a running program is protected (defaults)")
    assert rows["early"].obs.work is None and rows["busy"].obs.state is State.COMPUTING
    # the program that was running has ended: idle again, from the last look that saw it working
    assert rows["was"].obs.state is State.DETACHED and rows["was"].decision.spell == T0 - 5 * M


async def test_nothing_is_asked_under_working_count_nor_with_the_companion_off_and_no_batch_guard():
    hub = FakeHub()
    hub.add(srv(), idle(T0 - 2 * H))
    sw = sweeper(ReadOnlyStore(), hub, "  working: count\n")
    rows = await looked(sw, run_of(sw, dry=True))
    assert hub.activity_calls == [] and rows["alice"].decision.action is Action.WARN
    sw = Sweeper(parse_settings(POLICY.replace("probe: {skip_fresh: false}",
                                               "probe: {skip_fresh: false, companion: false}"), env={}),
                 hub, ReadOnlyStore(), clock=Clock(T0))
    rows = await looked(sw, run_of(sw, dry=True))
    assert hub.activity_calls == [] and rows["alice"].decision.action is Action.WARN


async def test_a_server_without_the_companion_is_told_once_per_run_and_the_batch_accounting_decides(caplog):
    hub = FakeHub()
    hub.add(srv(), idle(T0 - 2 * H))  # no companion report: 404, "absent"
    job = Job("7", "alice", "jupyterhub-reaper", JobState.RUNNING, start=T0 - 5 * H)
    guard = JobsGuard({"7": job}, cpu={"7": 5 * 3600 * 0.2})  # 20 % of a core since the job began
    sw = sweeper(ReadOnlyStore(), hub, guard=guard)
    with caplog.at_level(logging.INFO, logger="reaper.sweep"):
        for _ in range(2):
            row = (await looked(sw, run_of(sw, dry=True)))["alice"]
            sw._log_decision(row)  # the sweep's line for the decision
    told = [r for r in caplog.records if "no companion extension" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.INFO
    assert row.obs.state is State.WORKING and row.obs.detail == "job 7 used 1h of CPU since it started 5h ago"
    assert any("alice (default): working job 7 -> ok: working: job 7 used 1h" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("companion,cpu_error", [
    ("activity: timeout after 5s", None),  # slow
    ("activity: invalid JSON", None),  # malformed
    ("activity: HTTP 500", "sstat: exit 1: slurm_load_jobs error"),  # both failing
    ("absent", "sstat: garbage on line 1"),  # no companion, the accounting failing
])
async def test_a_failing_source_is_one_clear_log_line_and_never_a_stop(caplog, companion, cpu_error):
    hub = FakeHub()
    s = srv(la=T0 - 5 * H)
    hub.add(s, idle(T0 - 5 * H))
    hub.activities[("alice", "")] = Work(companion=companion)
    guard = JobsGuard(cpu_error=cpu_error)
    store = ReadOnlyStore({s.run_key(): final_for(T0 - 5 * H)}, could={s.run_key()})
    with caplog.at_level(logging.INFO, logger="reaper.sweep"):
        res = await sweeper(store, hub, guard=guard).run_once(dry_run=True)
    (row,) = res.rows
    assert row.decision.action is Action.OK and "stop held: could not tell whether a program runs" in row.decision.reason
    assert hub.stops == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if companion != "absent":
        assert any(f"alice: companion: {companion}; never taken as idle" in m for m in lines)
    if cpu_error:
        assert any("batch accounting for 1 job(s) failed" in m and cpu_error in m for m in lines)
    # without any failure, the same run is stopped (a dry run says so)
    hub.activities[("alice", "")] = Work(companion="absent")
    res = await sweeper(store, hub, guard=JobsGuard()).run_once(dry_run=True)
    assert res.rows[0].decision.action is Action.STOP


async def test_a_failure_is_logged_once_per_server_run(caplog):
    hub = FakeHub()
    hub.add(srv(), idle(T0 - 2 * H))
    hub.activities[("alice", "")] = Work(companion="activity: timeout after 5s")
    sw = sweeper(ReadOnlyStore(), hub)
    with caplog.at_level(logging.INFO, logger="reaper.sweep"):
        for _ in range(3):
            await looked(sw, run_of(sw, dry=True))
    assert sum("activity: timeout after 5s" in r.getMessage() for r in caplog.records) == 1


async def test_a_server_working_at_its_last_look_that_no_source_answers_for_stays_working():
    hub = FakeHub()
    s = srv(la=T0 - 5 * H)
    hub.add(s, idle(T0 - 5 * H))
    hub.activities[("alice", "")] = Work(companion="activity: timeout after 5s")
    was = History(last_state="working", working_at=T0 - 5 * M, last_detail="python in terminal 1 used 3m of CPU")
    sw = sweeper(ReadOnlyStore({s.run_key(): was}), hub, guard=JobsGuard(cpu_error="sstat: timeout"))
    row = (await looked(sw, run_of(sw, dry=True)))["alice"]
    assert row.obs.state is State.WORKING and row.decision.action is Action.OK and row.decision.notice is None


async def test_a_streamed_stop_waits_for_the_work_look_and_a_running_program_cancels_it():
    hub = FakeHub()
    s = srv(la=T0 - 5 * H)
    hub.add(s, idle(T0 - 5 * H))
    hub.activities[("alice", "")] = loop_in_terminal(cpu=1200.0)
    store = ReadOnlyStore({s.run_key(): final_for(T0 - 5 * H)}, could={s.run_key()})
    sw = sweeper(store, hub)
    run = run_of(sw)
    rows = await looked(sw, run)
    assert run.stream and hub.stops == [] and rows["alice"].obs.state is State.WORKING
    assert rows["alice"].decision.action is Action.OK
