"""Single-user server faults: a failed probe makes a server `unreachable`, judged on the hub's data,
warned at most, never given a final notice or stopped on the probe failure alone.

Real parts: JupyterHub 6 + configurable-http-proxy + single-user servers (local spawner), a fault
proxy in front of the hub API that rewrites `GET /hub/api/proxy` so that each faulty user's probes go
through that user's own fault proxy, the reaper's SQLite store. A control user without faults, on
the same policy, is stopped within the same sweeps: the thresholds are short enough to stop.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reaper.core.model import Action, State
from tests.faults.conftest import FaultTally, Reaper, running, start_servers, stop_leftovers
from tests.harness.faultproxy import FaultProxy, Rule
from tests.harness.hub import RealHub

pytestmark = pytest.mark.integration

ANY_API = r"/api/(status|kernels|terminals)"
SWEEPS_EACH = 2

FAULTS: dict[str, tuple[str, Any]] = {
    "pf-timeout": ("probe timeout (no answer for 1.5 s, probe timeout 1 s)",
                   lambda p: p.timeout("GET", ANY_API, seconds=1.5, times=None)),
    "pf-403": ("HTTP 403 from the server", lambda p: p.fail("GET", ANY_API, status=403, times=None)),
    "pf-404": ("HTTP 404 from the server", lambda p: p.fail("GET", r"/api/(status|kernels)", status=404, times=None)),
    "pf-502": ("HTTP 502 from the server", lambda p: p.fail("GET", ANY_API, status=502, times=None)),
    "pf-garbage": ("invalid JSON (200)", lambda p: p.garbage("GET", ANY_API, times=None, body=b"<html>oops")),
    "pf-shape": ("JSON of the wrong shape (200)",
                 lambda p: p.garbage("GET", r"/api/status", times=None, body=b'{"connections": "many", "kernels": 0}')),
    "pf-drop": ("connection dropped", lambda p: p.drop("GET", ANY_API, times=None)),
}


async def test_probe_failures_are_unreachable_use_hub_data_and_are_never_stopped_past_stop_after(
    real_hub: RealHub, hub_proxy: FaultProxy, tmp_path: Path, fault_tally: FaultTally
) -> None:
    faulty, control = "pf-faulty", "pf-control"
    users = [faulty, control]
    start_servers(real_hub, users)
    probe = await FaultProxy(name="probe-fault-proxy").start()
    hub_proxy.divert(faulty, "", probe)
    reaper = Reaper(real_hub, hub_proxy.url + "/hub/api", "pf-", f"sqlite:///{tmp_path / 'r.sqlite'}",
                    page_size=200)
    try:
        # The hub's last_activity of a fresh server is its start: let it age past stop_after (3 s)
        # so that hub data alone says "idle long enough to stop" from the first sweep on.
        await asyncio.sleep(3.5)
        t0 = time.monotonic()
        sweeps = 0
        control_stopped = False
        results: dict[str, tuple[Rule, list[str]]] = {}
        # Every fault class in turn, SWEEPS_EACH sweeps each, on one server whose hub data says it
        # has been idle past stop_after (3 s) for the whole time; the control is stopped meanwhile.
        for name, (what, inject) in FAULTS.items():
            probe.clear()
            rule = inject(probe)
            actions: list[str] = []
            for _ in range(SWEEPS_EACH):
                res = await reaper.sweep()
                assert res.ok, res.error
                sweeps += 1
                rows = {r.obs.server.user: r for r in res.rows}
                r = rows[faulty]
                actions.append(r.decision.action.value)
                assert r.obs.state is State.UNREACHABLE, (what, r.obs.state, r.obs.detail)
                assert "using the hub's last activity" in r.obs.detail, r.obs.detail
                la = r.obs.server.last_activity
                assert la is not None and r.obs.last_activity == la, "the hub's last_activity is used"
                assert r.obs.at - la > timedelta(seconds=3), "hub data: idle past stop_after"
                assert r.decision.action in (Action.OK, Action.WARN, Action.REMIND), (what, r.decision)
                assert faulty in running(real_hub, [faulty]), f"stopped during {what}"
                control_stopped = control_stopped or control not in running(real_hub, [control])
                await asyncio.sleep(0.3)
            assert rule.injected >= SWEEPS_EACH, (what, rule.injected)
            results[name] = (rule, actions)

        while not control_stopped:  # same policy, reachable: stopped (proves the thresholds bite)
            assert time.monotonic() - t0 < 30, "the control server was never stopped"
            res = await reaper.sweep()
            assert res.ok, res.error
            control_stopped = control not in running(real_hub, [control])
            await asyncio.sleep(0.5)

        notices = reaper.notices([faulty])
        kinds = [n.kind for n in notices]
        over = [k for k in kinds if k not in ("warning", "reminder")]
        wrongful = 0 if faulty in running(real_hub, [faulty]) else 1
        for name, (rule, actions) in results.items():
            fault_tally.add("probe", FAULTS[name][0], rule.injected, wrongful_stops=wrongful,
                            duplicate_notices=max(kinds.count("warning") - 1, 0),
                            note=f"state unreachable in {len(actions)} of {len(actions)} sweeps; actions {actions}")
        assert wrongful == 0, "stopped on a probe failure alone"
        assert over == [], f"a final notice or more on probe failures alone: {kinds}"
        assert kinds.count("warning") == 1, kinds  # warned (hub data says idle), once
        print(f"{sweeps} sweeps in {time.monotonic() - t0:.1f}s")
    finally:
        await reaper.close()
        await probe.close()
        stop_leftovers(real_hub, users)
