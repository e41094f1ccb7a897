"""An in-memory stand-in for reaper.hub.HubClient, for sweep tests of the pure-core wiring.

It is not the proof that the hub integration works (tests/integration does that against a real
JupyterHub); it lets sweep tests script time, probes and failures exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from reaper.hub import HubListingError, StopResult
from reaper.model import HubServer, Probe


@dataclass
class FakeHub:
    servers: dict[tuple[str, str], HubServer] = field(default_factory=dict)
    probes: dict[tuple[str, str], Probe] = field(default_factory=dict)
    fail_listing: bool = False
    stop_outcome: str = "stopped"  # stopped | pending | error
    stops: list[tuple[str, str]] = field(default_factory=list)
    probe_calls: list[tuple[str, str]] = field(default_factory=list)  # full probes
    status_calls: list[tuple[str, str]] = field(default_factory=list)  # /api/status alone
    # called right before each status-only probe and hub lookup: lets a test make the user come back
    before_recheck: object = None

    def add(self, server: HubServer, probe: Probe | None = None) -> None:
        self.servers[(server.user, server.name)] = server
        if probe is not None:
            self.probes[(server.user, server.name)] = probe

    async def list_active_servers(self) -> list[HubServer]:
        if self.fail_listing:
            raise HubListingError("GET /users page 2: HTTP 500 after 3 tries")
        return list(self.servers.values())

    async def refresh_targets(self) -> None:
        return None

    async def probe(self, server: HubServer) -> Probe:
        key = (server.user, server.name)
        self.probe_calls.append(key)
        return self.probes.get(key, Probe.failed("no such server"))

    async def probe_status(self, server: HubServer) -> Probe:
        """Status only, as the look at a server detached at its last sweep and the re-check before a
        stop ask: what /api/status would say of the scripted full probe."""
        key = (server.user, server.name)
        self.status_calls.append(key)
        if callable(self.before_recheck):
            self.before_recheck(self, server.user, server.name)
        full = self.probes.get(key, Probe.failed("no such server"))
        if not full.ok:
            return full
        kernel_times = [k.last_activity for k in full.kernels if k.last_activity is not None]
        la = full.status_last_activity
        return Probe(ok=True, status_last_activity=max([la, *kernel_times]) if la else la,
                     status_connections=sum(k.connections for k in full.kernels),
                     status_kernels=len(full.kernels), status_started=full.status_started)

    async def get_server(self, user: str, name: str = "") -> HubServer | None:
        if callable(self.before_recheck):
            self.before_recheck(self, user, name)
        return self.servers.get((user, name))

    async def stop(self, user: str, name: str = "") -> StopResult:
        self.stops.append((user, name))
        if self.stop_outcome == "stopped":
            self.servers.pop((user, name), None)
            return StopResult("stopped", 204, "stopped")
        if self.stop_outcome == "pending":
            s = self.servers[(user, name)]
            self.servers[(user, name)] = replace(s, pending="stop")
            return StopResult("pending", 202, "stop pending")
        return StopResult("error", 500, "HTTP 500")

    async def aclose(self) -> None:
        return None


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta) -> datetime:
        self.now = self.now + delta
        return self.now
