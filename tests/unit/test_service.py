"""The service's own bookkeeping around a sweep (reaper.service.ReaperService.tick)."""

from __future__ import annotations

from datetime import timedelta

from reaper.service import ReaperService
from reaper.web.metrics import METRICS
from tests.unit.test_sweep import T0, Clock, FakeHub, detached_probe, make, server, settings, store  # noqa: F401


async def test_tick_counts_the_sweep_then_keeps_only_its_counts(store):
    hub, clock = FakeHub(), Clock(T0)
    for i in range(3):
        since = T0 - timedelta(minutes=70)
        hub.add(server(user=f"u{i}", la=since), detached_probe(since))
    svc = ReaperService(None, settings())
    svc.store, svc.sweeper = store, make(store, hub, clock)
    METRICS.servers.labels(state="detached").set(0)
    await svc.tick()
    res = svc.last_result
    assert res is not None and res.ok
    # the metrics saw the rows, then the rows were let go: the next sweep does not carry them
    assert METRICS.servers.labels(state="detached")._value.get() == 3
    assert res.rows == [] and res.summary()["servers"] == 3 and res.counts() == {"detached": 3}
