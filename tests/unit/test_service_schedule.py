"""The service's schedule: a sweep that outlasts sweep_every is said once, with how long it took
and when the next starts, not once per skipped tick (APScheduler's "skipped: maximum number of
running instances reached" warning). Real parts: APScheduler's AsyncIOScheduler, a SQLite store
for the lease; the sweep itself is a stand-in that takes longer than the interval."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from reaper.config import parse_settings
from reaper.service import ReaperService, overrun_message
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
