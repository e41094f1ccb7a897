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


def test_the_service_process_loads_no_orm_no_alembic_no_httpx(tmp_path):
    # Memory a long-running service would hold for nothing: SQLAlchemy's ORM (~6 MB; the store
    # uses Core statements only), alembic (~11 MB; a needed migration runs in a child) and httpx
    # (only for hub.http "httpx"). Checked in a fresh interpreter, as the service starts.
    import subprocess
    import sys

    code = (
        "import sys, reaper.service, reaper.web.app, reaper.notify.email, reaper.notify.outbox\n"
        "from reaper.store import Store\n"
        "from reaper.hub import HubClient\n"
        f"s = Store.open('sqlite:///{tmp_path / 'r.sqlite'}', isolated=True)\n"
        "s.record_action(None, 'test', True, 'x', __import__('datetime').datetime.now(__import__('datetime').UTC))\n"
        "HubClient('http://127.0.0.1:1/hub/api', 't')\n"
        "print(' '.join(m for m in ('sqlalchemy.orm', 'alembic', 'httpx') if m in sys.modules) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["none"]
