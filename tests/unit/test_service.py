"""The service's own bookkeeping around a sweep (reaper.service.ReaperService.tick)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from reaper.metrics import METRICS
from reaper.service import ReaperService
from tests.unit.test_sweep import T0, Clock, FakeHub, detached_probe, make, server, settings, store  # noqa: F401


async def test_the_service_sweeps_keeping_counts_not_rows(store, tmp_path, monkeypatch):
    # The service builds its sweeper to keep counts, not one row per server (10,000 rows are
    # memory the next sweep needs); its tick feeds the metrics from those counts.
    from reaper import service

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")
    monkeypatch.setattr(service.ReaperService, "start_web", lambda self: asyncio.sleep(0))
    st = settings().model_copy(update={"database_url": f"sqlite:///{tmp_path / 'svc.sqlite'}"})
    started = ReaperService(None, st)
    await started.start()
    try:
        assert started.sweeper is not None and started.sweeper.keep_rows is False
    finally:
        await started.stop()

    hub, clock = FakeHub(), Clock(T0)
    for i in range(3):
        since = T0 - timedelta(minutes=70)
        hub.add(server(user=f"u{i}", la=since), detached_probe(since))
    svc = ReaperService(None, settings())
    svc.store, svc.sweeper = store, make(store, hub, clock)
    svc.sweeper.keep_rows = False  # as start() builds it
    METRICS.servers.labels(state="detached").set(0)
    await svc.tick()
    res = svc.last_result
    assert res is not None and res.ok
    assert METRICS.servers.labels(state="detached")._value.get() == 3
    assert res.rows == [] and res.summary()["servers"] == 3 and res.counts() == {"detached": 3}


def test_the_service_process_loads_no_orm_no_alembic_no_httpx_no_jupyterhub(tmp_path):
    # Memory a long-running service would hold for nothing: SQLAlchemy's ORM (~6 MB; the store
    # uses Core statements only), alembic (~11 MB; a needed migration runs in a child), httpx
    # (only for hub.http "httpx") and JupyterHub itself, nor PostgreSQL's dialect with SQLite
    # (2.3 MB; imported when a PostgreSQL store inserts). Checked in a fresh interpreter, as the
    # service starts. The page, when served, logs in with JupyterHub's HubOAuth: its
    # jupyterhub.services.auth imports JupyterHub's ORM (about 18 MB, accepted), and only then.
    import subprocess
    import sys

    code = (
        "import sys, reaper.service, reaper.web.app, reaper.notify.email, reaper.notify.outbox\n"
        "from reaper.config import parse_settings\n"
        "from reaper.store import Store\n"
        "from reaper.hub import HubClient\n"
        f"s = Store.open('sqlite:///{tmp_path / 'r.sqlite'}', isolated=True)\n"
        "s.reports.record_action(None, 'test', True, 'x', __import__('datetime').datetime.now(__import__('datetime').UTC))\n"
        "hub = HubClient('http://127.0.0.1:1/hub/api', 't')\n"
        "loaded = ('sqlalchemy.orm', 'alembic', 'httpx', 'jupyterhub', 'mako', 'pygments',\n"
        "          'sqlalchemy.dialects.postgresql')\n"
        "print(' '.join(m for m in loaded if m in sys.modules) or 'none')\n"
        "import os; os.environ['JUPYTERHUB_API_TOKEN'] = 't'\n"
        "service = type('S', (), {'settings': parse_settings('{}', env={}), 'store': s, 'hub': hub})()\n"
        "reaper.web.app.make_app(service)\n"
        "print('jupyterhub.services.auth' in sys.modules, 'httpx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["none", "True", "False"]
