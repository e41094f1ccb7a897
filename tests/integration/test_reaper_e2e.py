"""The reaper end to end on a real JupyterHub with real jupyter_server kernels.

Real parts started: JupyterHub (local process spawner), configurable-http-proxy (npm), single-user
servers with ipykernel kernels; the reaper's own SQLite store. Sweeps run in-process with the
reaper service's token (the managed-service test starts it as the hub's service instead).
The core-path tests (`core_hub`) run once per JupyterHub version in HUB_VERSIONS (5.4.x and 6.x).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from reaper.config import parse_settings
from reaper.core.model import Action, NoticeKind, State
from reaper.hub import HubClient, ProbeOptions
from reaper.notify.outbox import LogChannel, Outbox
from reaper.store import Store
from reaper.sweep import Sweeper

pytestmark = pytest.mark.integration

FAST = """
sweep_every: 1s
hub: {timezone: UTC}
probe: {skip_fresh: false, attached_within: 3s, timeout: 5s}
safety: {max_stops_per_sweep: 5, max_stop_fraction: 1.0}
defaults:
  detached: {warn_after: 4s, stop_after: 12s}
  attached: {warn_after: 1h, stop_after: 2h}
  remind_every: 3s
  min_notice: 3s
  channels: [log]
"""


def make_sweeper(hub, tmp_path: Path, extra: str = "") -> tuple[Sweeper, Store, HubClient]:
    settings = parse_settings(FAST + extra, env={})
    store = Store.open(f"sqlite:///{tmp_path / 'reaper.sqlite'}")
    client = HubClient(hub.api_url, hub.service_token, probes=ProbeOptions(public_url=hub.base_url, timeout=5))
    return Sweeper(settings, client, store, notifier=Outbox(store, {"log": LogChannel()})), store, client


def row_for(result, user):
    rows = [r for r in result.rows if r.obs.server.user == user]
    assert rows, f"{user} not in the sweep: {[r.obs.server.user for r in result.rows]}"
    return rows[0]


async def sweep_until(sweeper, user, predicate, timeout=40.0, interval=1.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        res = await sweeper.run_once()
        assert res.ok, res.error
        rows = [r for r in res.rows if r.obs.server.user == user]
        if rows:
            seen.append((rows[0].obs.state.value, rows[0].decision.action.value))
            if predicate(rows[0]):
                return rows[0], seen
        elif predicate(None):
            return None, seen
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not reached for {user}; seen {seen}")


async def test_attached_then_detached_then_warned_final_and_stopped_through_the_hub(core_hub, tmp_path):
    user = "e2e-detach"
    core_hub.create_user(user)
    core_hub.start_server(user)
    kid = core_hub.start_kernel(user)
    sweeper, store, client = make_sweeper(core_hub, tmp_path)
    try:
        ws = core_hub.open_kernel_ws(user, kid)
        core_hub.execute(ws, "x = 1")
        row, _ = await sweep_until(sweeper, user, lambda r: r is not None and r.obs.state is State.ATTACHED)
        assert row.obs.browser_connected and row.decision.action is Action.OK
        assert row.obs.job_id is None  # local spawner: no batch job

        ws.close()  # the browser window closes
        row, _ = await sweep_until(sweeper, user, lambda r: r is not None and r.obs.state is State.DETACHED)
        assert row.obs.detached_since is not None
        assert "no browser connected" in row.obs.detail

        row, seen = await sweep_until(sweeper, user, lambda r: r is None, timeout=60)
        assert core_hub.server_model(user) is None, "the hub still lists the server"
        actions = [a for _, a in seen]
        assert "warn" in actions and "final-warning" in actions and actions[-1] == "stop", seen
        acts = store.reports.recent_actions(sweeper.clock() - timedelta(hours=1))
        assert any(a.kind == "stop" and a.ok for a in acts)
        notices = store.reports.recent_notices(sweeper.clock() - timedelta(hours=1))
        kinds = [n.kind for n in notices if n.user == user]
        assert kinds.count(NoticeKind.WARNING.value) == 1 and kinds.count(NoticeKind.FINAL.value) == 1
        assert NoticeKind.STOPPED.value in kinds
    finally:
        await client.aclose()
        store.close()


async def test_busy_silent_kernel_is_computing_and_never_stopped_under_protect(real_hub, tmp_path):
    user = "e2e-busy"
    real_hub.create_user(user)
    real_hub.start_server(user)
    kid = real_hub.start_kernel(user)
    sweeper, store, client = make_sweeper(real_hub, tmp_path)
    try:
        ws = real_hub.open_kernel_ws(user, kid)
        real_hub.execute(ws, "import time; time.sleep(45)")
        ws.close()  # window closed while the computation runs, printing nothing
        states = []
        t_end = time.monotonic() + 25  # twice detached.stop_after
        while time.monotonic() < t_end:
            res = await sweeper.run_once()
            row = row_for(res, user)
            states.append(row.obs.state)
            assert row.decision.action is Action.OK, row.decision.reason
            await asyncio.sleep(1)
        assert states[-1] is State.COMPUTING and State.COMPUTING in states
        assert real_hub.server_model(user) is not None
    finally:
        await client.aclose()
        store.close()
        real_hub.stop_server(user)


async def test_sweeps_do_not_move_last_activity_on_the_server_or_the_hub(real_hub, tmp_path):
    user = "e2e-quiet"
    real_hub.create_user(user)
    real_hub.start_server(user)
    real_hub.start_kernel(user)
    # Let the server settle: wait until the hub's record stops moving (activity pushes are 2 s apart).
    direct = real_hub.direct_url(user)
    headers = {"Authorization": f"token {real_hub.service_token}"}

    def status_la():
        r = httpx.get(f"{direct}api/status", headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()["last_activity"]

    await asyncio.sleep(6)
    hub_before = real_hub.hub_last_activity(user)
    status_before = status_la()
    sweeper, store, client = make_sweeper(
        real_hub, tmp_path, "\nrules:\n  - name: hands-off\n    match: {users: [e2e-quiet]}\n    detached: {warn_after: 1h, stop_after: 2h}\n"
    )
    try:
        for _ in range(6):
            res = await sweeper.run_once()
            assert row_for(res, user).obs.probed
            await asyncio.sleep(1)
        # two of the hub's activity polls (2 s each) and one server push later:
        await asyncio.sleep(6)
        assert status_la() == status_before, "probing moved the server's own last_activity"
        assert real_hub.hub_last_activity(user) == hub_before, "probing moved the hub's last_activity"
    finally:
        await client.aclose()
        store.close()
        real_hub.stop_server(user)


async def test_probe_through_the_proxy_opt_in_does_count_as_activity(real_hub, tmp_path):
    """Why the default is direct: the same sweeps sent through the proxy keep the server 'active'."""
    user = "e2e-proxyprobe"
    real_hub.create_user(user)
    real_hub.start_server(user)
    await asyncio.sleep(6)
    before = real_hub.hub_last_activity(user)
    settings = parse_settings(
        FAST.replace("probe: {skip_fresh: false", "probe: {via: proxy, skip_fresh: false"), env={}
    )
    assert settings.probe.via == "proxy"
    store = Store.open(f"sqlite:///{tmp_path / 'p.sqlite'}")
    client = HubClient(real_hub.api_url, real_hub.service_token,
                       probes=ProbeOptions(public_url=real_hub.base_url, via="proxy"))
    sweeper = Sweeper(settings, client, store, notifier=Outbox(store, {"log": LogChannel()}))
    try:
        for _ in range(3):
            res = await sweeper.run_once()
            assert row_for(res, user).obs.probed
            await asyncio.sleep(1)
        await asyncio.sleep(6)
        after = real_hub.hub_last_activity(user)
        assert after is not None and before is not None and after > before
    finally:
        await client.aclose()
        store.close()
        real_hub.stop_server(user)
