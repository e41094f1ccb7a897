"""The service's schedule: a sweep that outlasts sweep_every is said once, with how long it took
and when the next starts, not once per skipped tick (APScheduler's "skipped: maximum number of
running instances reached" warning). Real parts: APScheduler's AsyncIOScheduler, a SQLite store
for the lease; the sweep itself is a stand-in that takes longer than the interval."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from reaper.config import parse_settings
from reaper.service import ON_TIME_MARGIN, ReaperService, on_time_sweep_at, overrun_message
from reaper.store import Store
from reaper.sweep import SweepResult


class SlowSweeper:
    """Sweeps that take ``took`` seconds (the service's tick asks nothing else of it)."""

    stop_hook = None

    def __init__(self, took: float) -> None:
        self.took = took
        self.sweeps = 0

    async def run_once(self) -> SweepResult:
        await asyncio.sleep(self.took)
        self.sweeps += 1
        now = datetime.now(UTC)
        return SweepResult(started_at=now, finished_at=now, ok=True)


async def test_a_sweep_longer_than_sweep_every_is_said_once_not_once_per_skipped_tick(tmp_path, caplog):
    st = parse_settings("sweep_every: 1s\n", env={}).model_copy(update={"sweep_every": timedelta(seconds=0.2)})
    svc = ReaperService(None, st)
    svc.store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    svc.sweeper = SlowSweeper(1.0)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO):
        svc.schedule(st)
        try:
            for _ in range(60):  # two slow sweeps, each skipping about four ticks
                await asyncio.sleep(0.1)
                if svc.sweeper.sweeps >= 2:
                    break
        finally:
            svc.scheduler.shutdown(wait=False)
            svc.store.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "maximum number of running instances" in m], messages
    overruns = [m for m in messages if m.startswith("sweep took")]
    assert len(overruns) == svc.sweeper.sweeps >= 2, messages
    assert all("longer than sweep_every (0.2s)" in m and "the next sweep starts at " in m for m in overruns)
    assert any(int(m.split(": ")[1].split(" ")[0]) >= 2 for m in overruns), overruns  # "N tick(s) skipped"


def test_the_overrun_line_says_how_long_how_many_ticks_and_when_next():
    at = datetime(2026, 11, 25, 12, 1, 25, tzinfo=UTC)
    line = overrun_message(80.24, timedelta(seconds=5), 16, at)
    assert line.startswith("sweep took 80.2s, longer than sweep_every (5s): 16 tick(s) skipped; the next sweep starts at ")
    assert at.astimezone().strftime("%H:%M:%S") in line
    assert overrun_message(7, timedelta(seconds=5), 1, None).endswith("starts at the next tick")


# -- a sweep on time for the earliest stop (ReaperService.sweep_on_time) -------------------------

EVERY = timedelta(minutes=5)
START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_the_next_tick_moves_to_a_stop_due_before_it():
    due = START + timedelta(minutes=4)
    assert on_time_sweep_at(due, START, EVERY, START + EVERY) == due + ON_TIME_MARGIN


def test_a_stop_due_just_after_the_tick_delays_the_tick_to_it_not_a_whole_interval():
    # from cold: final notices at 12:00:00.4, stops due at 12:30:00.4, the tick at 12:30:00.0
    # would look 0.4 s too early and the stops would wait for 12:35
    due = START + timedelta(minutes=30, milliseconds=400)
    assert on_time_sweep_at(due, START + timedelta(minutes=25), EVERY, START + timedelta(minutes=30)) == (
        due + ON_TIME_MARGIN)


def test_a_stop_far_after_the_tick_or_none_leaves_the_tick():
    assert on_time_sweep_at(START + timedelta(minutes=8), START, EVERY, START + EVERY) is None
    assert on_time_sweep_at(None, START, EVERY, START + EVERY) is None
    assert on_time_sweep_at(START + timedelta(minutes=1), START, EVERY, None) is None


def test_sweeps_stay_half_an_interval_apart():
    due = START + timedelta(seconds=10)
    assert on_time_sweep_at(due, START, EVERY, START + EVERY) == START + EVERY / 2


class DueSweeper(SlowSweeper):
    """Each sweep says a stop falls due ``due_in`` after its start (SweepResult.next_stop_at)."""

    def __init__(self, due_in: float) -> None:
        super().__init__(0.0)
        self.due_in = due_in
        self.starts: list[datetime] = []

    async def run_once(self) -> SweepResult:
        now = datetime.now(UTC)
        self.starts.append(now)
        self.sweeps += 1
        return SweepResult(started_at=now, finished_at=now, ok=True,
                           next_stop_at=now + timedelta(seconds=self.due_in))


async def test_the_service_moves_its_next_sweep_to_the_earliest_stop_due(tmp_path):
    st = parse_settings("sweep_every: 1h\n", env={}).model_copy(update={"sweep_every": timedelta(seconds=2)})
    svc = ReaperService(None, st)
    svc.store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    svc.sweeper = DueSweeper(0.3)  # type: ignore[assignment]
    svc.schedule(st)
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if svc.sweeper.sweeps >= 1:
                break
        await asyncio.sleep(0.05)
        first = svc.sweeper.starts[0]
        moved = svc.scheduler.get_job("sweep").next_run_time
        # due 0.3 s after the sweep's start (then 1 s of margin), before the tick 2 s after it
        assert moved == first + timedelta(seconds=0.3) + ON_TIME_MARGIN
        for _ in range(100):
            await asyncio.sleep(0.05)
            if svc.sweeper.sweeps >= 2:
                break
        assert svc.sweeper.starts[1] >= moved
        # the interval then counts from the moved sweep (and is moved again by its answer)
        assert svc.scheduler.get_job("sweep").next_run_time == svc.sweeper.starts[1] + timedelta(seconds=0.3) + ON_TIME_MARGIN
    finally:
        svc.scheduler.shutdown(wait=False)
        svc.store.close()


async def test_a_sweep_says_when_its_first_stop_falls_due(tmp_path):
    """A real sweep from cold: alice idle 10 h gets her final notice now, her stop is due
    min_notice after it; bob, only warned, is not a stop (his next step is a final notice)."""
    from reaper.notify.outbox import LogChannel, Outbox
    from reaper.sweep import Sweeper
    from tests.fakes import Clock, FakeHub
    from tests.unit.test_sweep import POLICY, T0, detached_probe, server

    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        hub, clock = FakeHub(), Clock(T0)
        hub.add(server("alice", la=T0 - timedelta(hours=10)), detached_probe(T0 - timedelta(hours=10)))
        hub.add(server("bob", la=T0 - timedelta(minutes=70)), detached_probe(T0 - timedelta(minutes=70)))
        sw = Sweeper(parse_settings(POLICY, env={}), hub, store, notifier=Outbox(store, {"log": LogChannel()}),
                     clock=clock)
        res = await sw.run_once()
        assert res.ok and res.next_stop_at == T0 + timedelta(minutes=30)
        clock.advance(timedelta(minutes=31))
        res = await sw.run_once()
        assert hub.stops == [("alice", "")]
        assert res.next_stop_at is None  # bob's final notice is due at 2h30m idle, not a stop
    finally:
        store.close()
