"""Fixtures and helpers of the fault suite (tests/faults).

Real parts: the session's real JupyterHub (`real_hub`, from tests/integration/conftest.py), more
hubs from `hub_factory` (one that survives a restart: `restartable_hub`), the fault proxy
(tests/harness/faultproxy.py) between the reaper and the hub or a single-user server, SMTP sinks,
PostgreSQL. Each test counts what it injected and what came of it in `fault_tally`; the table is
printed at the end of the run (and kept in tests/faults/.last-results.json) and is the source of
tests/faults/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reaper.config import Settings, parse_settings
from reaper.core.model import Action
from reaper.hub import HubClient
from reaper.notify.outbox import LogChannel, Outbox
from reaper.service import make_hub_client
from reaper.store import ActionRow, NoticeRow, Store
from reaper.sweep import Sweeper, SweepResult
from tests.harness.faultproxy import FaultProxy
from tests.harness.hub import HUB_CONFIG, RealHub, processes_with_env
from tests.integration.conftest import hub_factory, pytest_runtest_makereport, real_hub  # noqa: F401

RESULTS_JSON = Path(__file__).with_name(".last-results.json")


# --------------------------------------------------------------------------- the tally


@dataclass
class Tally:
    fault: str  # fault class
    injected: str  # what was injected
    times: int  # how many injections (counted by the proxy / the test)
    wrongful_stops: int = 0
    lost_notices: int = 0
    duplicate_notices: int = 0
    orphan_jobs: int = 0
    note: str = ""


_TALLY: list[Tally] = []


class FaultTally:
    def add(self, fault: str, injected: str, times: int, **outcome: Any) -> Tally:
        t = Tally(fault, injected, times, **outcome)
        _TALLY.append(t)
        print(f"FAULT {fault} | {injected} | x{times} | wrongful stops {t.wrongful_stops}, lost notices "
              f"{t.lost_notices}, duplicate notices {t.duplicate_notices}, orphan jobs {t.orphan_jobs}"
              + (f" | {t.note}" if t.note else ""))
        return t


@pytest.fixture
def fault_tally() -> FaultTally:
    return FaultTally()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TALLY:
        return
    tr = terminalreporter
    tr.section("fault suite: injected faults and outcomes")
    tr.write_line("| fault class | what was injected | times | wrongful stops | lost notices | duplicate notices | orphan jobs |")
    tr.write_line("|---|---|---|---|---|---|---|")
    for t in _TALLY:
        tr.write_line(f"| {t.fault} | {t.injected} | {t.times} | {t.wrongful_stops} | {t.lost_notices} | "
                      f"{t.duplicate_notices} | {t.orphan_jobs} |")
    try:
        RESULTS_JSON.write_text(json.dumps([asdict(t) for t in _TALLY], indent=1))
    except OSError:
        pass


# --------------------------------------------------------------------------- hubs


@pytest.fixture
def restartable_hub(hub_factory: Callable[..., RealHub], tmp_path: Path) -> RealHub:  # noqa: F811
    """A real hub whose single-user servers outlive the hub process (cleanup_servers = False), so
    that `restart_hub_process` is a hub restart and not a mass stop."""
    wrapper = tmp_path / "jupyterhub_config_keep_servers.py"
    wrapper.write_text(
        f"load_subconfig({str(HUB_CONFIG)!r})\n"
        "c.JupyterHub.cleanup_servers = False\n"
    )
    return hub_factory(config_file=wrapper)


def kill_hub_process(hub: RealHub) -> None:
    """SIGTERM the hub process alone (its servers survive with cleanup_servers = False)."""
    proc = hub.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(30)
    if hub._client is not None:
        hub._client.close()
        hub._client = None
    if hub._log_file is not None:
        hub._log_file.close()
        hub._log_file = None


def start_hub_process(hub: RealHub) -> None:
    hub.proc = None
    hub.start()


def start_servers(hub: RealHub, users: list[str], timeout: float = 90) -> None:
    """Create the users and start their default servers concurrently; wait until all are ready."""
    for u in users:
        hub.create_user(u)
        r = hub.api("POST", f"users/{u}/server", json={})
        assert r.status_code in (201, 202), r.text
    hub.wait_for(
        lambda: all((m := hub.server_model(u)) is not None and m.get("ready") for u in users),
        timeout=timeout,
        what=f"servers of {users} ready",
    )


def running(hub: RealHub, users: list[str]) -> list[str]:
    """Which of these users' default servers the hub (asked directly, not through a proxy) lists."""
    return [u for u in users if hub.server_model(u) is not None]


def server_processes(user: str) -> set[int]:
    """Live single-user server processes of `user` (the local spawner's stand-in for a batch job)."""
    return processes_with_env(exact=[f"JUPYTERHUB_USER={user}".encode()])


def stop_leftovers(hub: RealHub, users: list[str], timeout: float = 60) -> None:
    """Stop whatever servers of `users` still run (all at once) and wait until they are gone."""
    try:
        if not hub.running:
            return
        left = running(hub, users)
        for u in left:
            hub.api("DELETE", f"users/{u}/server")
        hub.wait_for(lambda: not running(hub, left), timeout=timeout, what=f"servers of {left} stopped")
    except Exception as e:  # cleanup must not hide the test's own failure
        print(f"cleanup of {users}: {e}")

# --------------------------------------------------------------------------- the reaper in-process


POLICY = """
sweep_every: 1s
hub:
  api_url: "{api_url}"
  api_token: "${{FAULT_TOKEN}}"
  public_url: "{public}"
  timezone: UTC
  timeout: {hub_timeout}
  retries: {retries}
  page_size: {page_size}
probe: {{skip_fresh: false, attached_within: 1s, timeout: {probe_timeout}}}
safety: {{max_stops_per_sweep: {max_stops}, max_stop_fraction: 1.0, stop_concurrency: {stop_concurrency},
          pending_stop_timeout: {pending_timeout}}}
defaults:
  exempt: true            # servers of other tests on the shared hub are never touched
  channels: [log]
rules:
  - name: faults
    match: {{users: ["{prefix}*"]}}
    exempt: false
    detached: {{warn_after: {warn}, stop_after: {stop}}}
    attached: {{warn_after: {warn}, stop_after: {stop}}}
    remind_every: 1h
    min_notice: {min_notice}
"""


def fault_settings(hub: RealHub, api_url: str, prefix: str, *, max_stops: int = 20, **kw: Any) -> Settings:
    values: dict[str, Any] = dict(
        api_url=api_url, public=hub.base_url, hub_timeout="1s", retries=1, page_size=1,
        probe_timeout="1s", stop_concurrency=1, pending_timeout="4s", prefix=prefix,
        warn="1s", stop="3s", min_notice="1s", max_stops=max_stops,
    )
    values.update(kw)
    return parse_settings(POLICY.format(**values), env={"FAULT_TOKEN": hub.service_token})


class Reaper:
    """One in-process reaper: settings, hub client (through `api_url`), store, log outbox."""

    def __init__(self, hub: RealHub, api_url: str, prefix: str, db_url: str, **kw: Any) -> None:
        self.settings = fault_settings(hub, api_url, prefix, **kw)
        # The same policy with no stop allowed: drives servers to "stop due" without stopping them.
        self.hold = fault_settings(hub, api_url, prefix, **{**kw, "max_stops": 0})
        self.store = Store.open(db_url)
        self.client: HubClient = make_hub_client(self.settings)
        self.sweeper = Sweeper(self.settings, self.client, self.store,
                               notifier=Outbox(self.store, {"log": LogChannel()}))

    async def sweep(self, *, dry_run: bool = False) -> SweepResult:
        self.sweeper.settings = self.settings
        return await self.sweeper.run_once(dry_run=dry_run)

    async def would_stop(self, users: list[str]) -> list[str]:
        """Users whose server a complete, fault-free sweep would stop now (dry run: changes nothing)."""
        res = await self.sweep(dry_run=True)
        assert res.ok, res.error
        return sorted(r.obs.server.user for r in res.rows
                      if r.obs.server.user in users and r.decision.action is Action.STOP)

    async def drive_to_stop_due(self, users: list[str], timeout: float = 40) -> None:
        """Sweep (stops held) until every server of `users` would be stopped by the next sweep:
        warning and final notice recorded and delivered, min_notice elapsed."""
        deadline = time.monotonic() + timeout
        while True:
            if await self.would_stop(users) == sorted(users):
                return
            assert time.monotonic() < deadline, "servers did not become due for a stop"
            self.sweeper.settings = self.hold
            res = await self.sweeper.run_once()
            assert res.ok, res.error
            assert res.stops == 0
            await asyncio.sleep(0.5)

    def notices(self, users: list[str]) -> list[NoticeRow]:
        since = datetime.now(UTC) - timedelta(hours=1)
        return [n for n in self.store.reports.recent_notices(since, 10_000) if n.user in users]

    def actions(self, users: list[str]) -> list[ActionRow]:
        since = datetime.now(UTC) - timedelta(hours=1)
        return [a for a in self.store.reports.recent_actions(since, 10_000) if a.user in users]

    async def close(self) -> None:
        await self.client.aclose()
        self.store.close()


@pytest.fixture
async def hub_proxy(real_hub: RealHub) -> AsyncIterator[FaultProxy]:  # noqa: F811
    """A fault proxy in front of the session hub's API."""
    proxy = FaultProxy(real_hub.hub_url, name="hub-fault-proxy")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def notice_counts(notices: list[NoticeRow]) -> dict[tuple[str, str], int]:
    """(user, kind) -> how many notices of that kind were recorded."""
    out: dict[tuple[str, str], int] = {}
    for n in notices:
        out[(n.user, n.kind)] = out.get((n.user, n.kind), 0) + 1
    return out
