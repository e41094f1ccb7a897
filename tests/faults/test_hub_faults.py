"""Hub API faults: the reaper never stops a server on partial data, and recovers on the next sweep.

Real parts: JupyterHub 6 + configurable-http-proxy + single-user servers (local spawner), the
fault proxy between the reaper and the hub API, the reaper's SQLite store. Every server is first
driven to "stop due" (warning and final notice delivered, min_notice elapsed, shown by a dry-run
sweep), so that any complete, fault-free sweep WOULD stop it: a stop during a faulty sweep would be
a wrongful stop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from reaper.core.model import Action, NoticeKind
from tests.faults.conftest import (
    FaultTally,
    Reaper,
    kill_hub_process,
    notice_counts,
    running,
    server_processes,
    start_hub_process,
    start_servers,
    stop_leftovers,
)
from tests.harness.faultproxy import FaultProxy
from tests.harness.hub import RealHub

pytestmark = pytest.mark.integration


def page(offset: int) -> str:
    """The user listing's page at `offset` (page_size 1: one user per page)."""
    return rf"^/hub/api/users\?(?=.*state=active).*\boffset={offset}(&|$)"


def active_user_count(hub: RealHub) -> int:
    r = hub.api("GET", "users", params={"state": "active", "limit": 200},
                headers={"Accept": "application/jupyterhub-pagination+json"})
    r.raise_for_status()
    return int(r.json()["_pagination"]["total"])


async def test_listing_faults_on_any_page_stop_nothing_and_the_next_clean_sweep_stops_everything(
    real_hub: RealHub, hub_proxy: FaultProxy, tmp_path: Path, fault_tally: FaultTally
) -> None:
    users = ["hf-list-a", "hf-list-b", "hf-list-c"]
    start_servers(real_hub, users)
    reaper = Reaper(real_hub, hub_proxy.url + "/hub/api", "hf-list-", f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        await reaper.drive_to_stop_due(users)
        before = notice_counts(reaper.notices(users))
        # (a server idle past stop_after - min_notice at its first sweep gets the final notice first)
        assert all(before.get((u, "final")) == 1 for u in users) and max(before.values()) == 1, before
        last = active_user_count(real_hub) - 1
        assert last >= 2, "page_size 1 and three servers: at least three pages"
        T = 1.5  # longer than hub.timeout (1s)
        scenarios = [
            ("HTTP 500 on page 1 (every attempt)", lambda p: p.fail("GET", page(0), status=500, times=None)),
            ("HTTP 502 on page 2 (every attempt)", lambda p: p.fail("GET", page(1), status=502, times=None)),
            ("HTTP 503 on the last page (every attempt)", lambda p: p.fail("GET", page(last), status=503, times=None)),
            ("timeout on page 1 (every attempt)", lambda p: p.timeout("GET", page(0), seconds=T, times=None)),
            ("timeout on page 2 (every attempt)", lambda p: p.timeout("GET", page(1), seconds=T, times=None)),
            ("timeout on the last page (every attempt)", lambda p: p.timeout("GET", page(last), seconds=T, times=None)),
            ("invalid JSON (200) on page 2", lambda p: p.garbage("GET", page(1), times=None)),
            ("connection dropped on the last page (every attempt)", lambda p: p.drop("GET", page(last), times=None)),
            ("HTTP 403 on page 2", lambda p: p.fail("GET", page(1), status=403, times=None)),
        ]
        injected_total = 0
        for what, inject in scenarios:
            hub_proxy.clear()
            rule = inject(hub_proxy)
            deletes_before = hub_proxy.count("DELETE", r".")
            res = await reaper.sweep()
            assert not res.ok, f"{what}: the sweep should fail"
            assert "list active users" in (res.error or ""), res.error
            assert rule.injected >= 1
            assert res.stops == 0 and res.notices == 0
            assert hub_proxy.count("DELETE", r".") == deletes_before, f"{what}: a stop was sent"
            wrongful = 3 - len(running(real_hub, users))
            assert wrongful == 0, f"{what}: a server was stopped"
            assert notice_counts(reaper.notices(users)) == before, f"{what}: notices changed"
            # The fault gone, a complete listing would stop every server: the fault alone held them.
            hub_proxy.clear()
            assert await reaper.would_stop(users) == sorted(users), what
            injected_total += rule.injected
            fault_tally.add("hub listing", what, rule.injected, wrongful_stops=wrongful)

        # A transient 503 is retried within the sweep: the sweep completes (dry run: it would act).
        hub_proxy.clear()
        rule = hub_proxy.fail("GET", page(1), status=503, times=1)
        res = await reaper.sweep(dry_run=True)
        assert res.ok, res.error
        assert rule.injected == 1
        assert sorted(r.obs.server.user for r in res.rows
                      if r.decision.action is Action.STOP and r.obs.server.user in users) == sorted(users)
        fault_tally.add("hub listing", "HTTP 503 once on page 2 (retried in the sweep)", 1, note="sweep completed")

        # Slow but within the timeout, on every hub call: the sweep acts normally and stops all three.
        hub_proxy.clear()
        slow = hub_proxy.slow(None, r"^/hub/api/", seconds=0.3, times=None)
        t0 = time.monotonic()
        res = await reaper.sweep()
        took = time.monotonic() - t0
        assert res.ok, res.error
        assert res.stops == 3, res.summary()
        assert running(real_hub, users) == []
        # three pages, then a stop per server (the re-check before a stop asks the server itself,
        # and the route table is not fetched again while every server's address is known)
        assert slow.injected >= 3 + 3
        await reaper.sweeper.notifier.drain(reaper.sweeper.clock())  # type: ignore[union-attr]
        after = notice_counts(reaper.notices(users))
        dup = sum(max(0, n - 1) for n in after.values())
        lost = sum(1 for u in users for k in ("final", "stopped") if after.get((u, k), 0) == 0)
        orphans = sum(len(server_processes(u)) for u in users)
        assert (dup, lost, orphans) == (0, 0, 0), after
        fault_tally.add("hub slow", "0.3 s added to every hub call (timeout 1 s)", slow.injected,
                        duplicate_notices=dup, lost_notices=lost, orphan_jobs=orphans,
                        note=f"sweep took {took:.1f}s, stopped 3 of 3")
    finally:
        await reaper.close()
        stop_leftovers(real_hub, users)


async def test_hub_restart_between_listing_and_stop_stops_nothing_and_the_next_sweep_does(
    restartable_hub: RealHub, tmp_path: Path, fault_tally: FaultTally
) -> None:
    hub = restartable_hub
    users = ["hr-a", "hr-b"]
    start_servers(hub, users)
    proxy = await FaultProxy(hub.hub_url, name="hub-restart-proxy").start()
    reaper = Reaper(hub, proxy.url + "/hub/api", "hr-", f"sqlite:///{tmp_path / 'r.sqlite'}")
    restarts = 0
    try:
        await reaper.drive_to_stop_due(users)
        pids = {u: server_processes(u) for u in users}
        assert all(pids.values())

        down = threading.Lock()

        def hub_goes_down() -> None:  # idempotent: concurrent requests all wait for the hub to die
            with down:
                if hub.running:
                    kill_hub_process(hub)

        for where, method, path in [
            ("after the listing, at the route-table fetch (probes then fail)", "GET", r"^/hub/api/proxy"),
            ("at the stop requests (the DELETEs never reach the hub)", "DELETE", r"^/hub/api/users/hr-[ab]/server$"),
        ]:
            proxy.clear()
            rule = proxy.hook(method, path, hub_goes_down, times=None)
            # The route table is fetched only for servers whose address the sweeper does not know
            # yet (a restarted reaper, a server that moved): make it so for this sweep.
            reaper.sweeper._target_known.clear()
            res = await reaper.sweep()
            assert rule.injected >= 1, f"{where}: the hook did not fire: {res.summary()}"
            assert res.stops == 0, res.summary()
            # the hub is down: its servers must all still be running
            alive = [u for u in users if server_processes(u) == pids[u]]
            deletes_at_end = proxy.count("DELETE", r".")
            start_hub_process(hub)
            restarts += 1
            await asyncio.sleep(1.5)
            # Nothing of a failed sweep may outlive it: no stop request after run_once returned.
            late = proxy.count("DELETE", r".") - deletes_at_end
            wrongful = len(users) - len(alive) + len([u for u in users if u not in running(hub, users)])
            fault_tally.add("hub restart", f"hub process restarted mid-sweep, {where}", 1,
                            wrongful_stops=wrongful, note=f"{late} stop request(s) sent after the sweep returned")
            assert late == 0, f"{where}: {late} stop request(s) sent after the failed sweep had returned"
            assert wrongful == 0 and running(hub, users) == sorted(users), f"{where}: a server went away"
            proxy.clear()
            hub.wait_for(lambda: all(hub.server_model(u) and hub.server_model(u).get("ready") for u in users),
                         what="servers ready after the hub restart")
            assert await reaper.would_stop(users) == sorted(users), where

        res = await reaper.sweep()
        assert res.ok, res.error
        assert res.stops == 2, res.summary()
        assert running(hub, users) == []
        await reaper.sweeper.notifier.drain(reaper.sweeper.clock())  # type: ignore[union-attr]
        counts = notice_counts(reaper.notices(users))
        dup = sum(max(0, n - 1) for n in counts.values())
        lost = sum(1 for u in users for k in ("final", "stopped") if counts.get((u, k), 0) == 0)
        fault_tally.add("hub restart", "next sweep after the two restarts", 2, duplicate_notices=dup,
                        lost_notices=lost, note=f"stopped 2 of 2; notices {sorted(counts.items())}")
        assert lost == 0, counts
        # A duplicate here is a warning sent again for the same idle spell: while the hub was down
        # the probes failed, the server was 'unreachable' and its spell was taken from the hub's
        # last_activity instead of detached_since, which looked like a new spell.
        assert dup == 0, f"duplicate notices after the hub restart: {counts}"
        hub.wait_for(lambda: not any(server_processes(u) for u in users), timeout=15, what="servers gone")
    finally:
        await reaper.close()
        await proxy.close()
        stop_leftovers(hub, users)


async def test_a_202_stop_that_never_completes_is_pending_followed_up_not_repeated_and_reported(
    real_hub: RealHub, hub_proxy: FaultProxy, tmp_path: Path, fault_tally: FaultTally,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = "hf-202"
    start_servers(real_hub, [user])
    reaper = Reaper(real_hub, hub_proxy.url + "/hub/api", "hf-202", f"sqlite:///{tmp_path / 'r.sqlite'}",
                    pending_timeout="4s")
    try:
        await reaper.drive_to_stop_due([user])
        accept = hub_proxy.accept("DELETE", rf"^/hub/api/users/{user}/server$", times=None)
        caplog.set_level(logging.INFO, logger="reaper")
        res = await reaper.sweep()
        assert res.ok, res.error
        assert res.stops_pending == 1 and res.stops == 0, res.summary()
        kinds = [a.kind for a in reaper.actions([user])]
        assert "stop-pending" in kinds, kinds
        t_first = time.monotonic()
        sweeps = 1
        while time.monotonic() - t_first < 10:  # 2.5 x pending_stop_timeout, one sweep a second
            await asyncio.sleep(1)
            res = await reaper.sweep()
            assert res.ok, res.error
            sweeps += 1
        deletes = accept.injected
        assert real_hub.server_model(user) is not None  # the proxy swallowed every DELETE
        counts = notice_counts(reaper.notices([user]))
        assert counts.get((user, NoticeKind.STOPPED.value), 0) == 0, "a 'stopped' notice for a server still running"
        # Followed up, not repeated every sweep: at most one more DELETE per pending_stop_timeout.
        fault_tally.add("hub stop 202", "DELETE answered 202 and never forwarded", deletes,
                        note=f"{deletes} DELETEs in {sweeps} sweeps over 10 s (pending_stop_timeout 4 s)")
        assert deletes <= 1 + 10 // 4, f"the stop was repeated {deletes} times in {sweeps} sweeps"
        reported = [r for r in caplog.records if r.levelno >= logging.ERROR and user in r.getMessage()
                    and "pending" in r.getMessage()]
        assert reported, "a stop pending longer than pending_stop_timeout must be reported (ERROR log)"
    finally:
        await reaper.close()
        hub_proxy.clear()
        stop_leftovers(real_hub, [user])
