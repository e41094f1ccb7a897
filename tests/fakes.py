"""An in-memory stand-in for reaper.hub.HubClient, for sweep tests of the pure-core wiring. It
implements the whole of the sweep's hub protocol (reaper.ports.Hub), so that no capability of
the sweep quietly turns off in a test.

It is not the proof that the hub integration works (tests/integration does that against a real
JupyterHub); it lets sweep tests script time, probes and failures exactly.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from reaper.core.model import HubServer, Probe, Work
from reaper.hub import HubError, HubListingError, StopResult


@dataclass
class FakeHub:
    servers: dict[tuple[str, str], HubServer] = field(default_factory=dict)
    probes: dict[tuple[str, str], Probe] = field(default_factory=dict)
    fail_listing: bool = False
    stop_outcome: str = "stopped"  # stopped | pending | refused | error
    stops: list[tuple[str, str]] = field(default_factory=list)
    probe_calls: list[tuple[str, str]] = field(default_factory=list)  # full probes
    status_calls: list[tuple[str, str]] = field(default_factory=list)  # /api/status alone
    probes_after_status: list[tuple[str, str]] = field(default_factory=list)  # full probes given that status
    # called right before each status-only probe and hub lookup: lets a test make the user come back
    before_recheck: object = None
    # the page's login: token -> the hub's user model (GET /hub/api/user); OAuth codes granted
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    identify_calls: list[str] = field(default_factory=list)
    hub_down: bool = False  # identify and oauth_token raise HubError, as after the retries
    # the companion extension's report per server (GET api/reaper/activity), as HubClient.activity
    # gives it; a server without one answers as without the companion (404: "absent")
    activities: dict[tuple[str, str], Work] = field(default_factory=dict)
    activity_calls: list[tuple[str, str]] = field(default_factory=list)

    def add(self, server: HubServer, probe: Probe | None = None) -> None:
        self.servers[(server.user, server.name)] = server
        if probe is not None:
            self.probes[(server.user, server.name)] = probe

    async def list_active_servers(self) -> list[HubServer]:
        if self.fail_listing:
            raise HubListingError("GET /users page 2: HTTP 500 after 3 tries")
        return list(self.servers.values())

    async def refresh_targets(self) -> int:
        """No route table: every scripted server has its own address."""
        return 0

    async def target_for(self, server: HubServer) -> str | None:
        return server.target or None

    async def probe(self, server: HubServer, *, status: Probe | None = None) -> Probe:
        key = (server.user, server.name)
        self.probe_calls.append(key)
        if status is not None:
            self.probes_after_status.append(key)
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

    async def activity(self, server: HubServer) -> Work:
        key = (server.user, server.name)
        self.activity_calls.append(key)
        return self.activities.get(key, Work(companion="absent"))

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
        if self.stop_outcome == "refused":
            return StopResult("refused", 403, "HTTP 403 Missing or invalid credentials.")
        return StopResult("error", 500, "HTTP 500")

    # -- the page's login, as the hub answers it

    def grant(self, token: str, *, client_id: str, redirect_uri: str, code_challenge: str,
              code_challenge_method: str = "S256", **_: str) -> str:
        """The hub's authorize step for the holder of ``token``: a one-time code for that login."""
        code = secrets.token_urlsafe(8)
        self.codes[code] = {"token": token, "client_id": client_id, "redirect_uri": redirect_uri,
                            "challenge": code_challenge, "method": code_challenge_method}
        return code

    async def identify(self, token: str) -> dict[str, Any] | None:
        self.identify_calls.append(token)
        if self.hub_down:
            raise HubError("identify a login token: ConnectError after 4 attempts")
        model = self.identities.get(token)
        return dict(model) if model is not None else None

    async def oauth_token(self, *, client_id: str, code: str, redirect_uri: str, code_verifier: str) -> str:
        """POST /hub/api/oauth2/token as the hub checks it: a code is good once, for its client and
        redirect URI, with the verifier whose S256 hash is the challenge given at authorize."""
        if self.hub_down:
            raise HubError("trade the login code for a token: ConnectError after 1 attempts")
        grant = self.codes.pop(code, None)
        digest = base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest()).decode().rstrip("=")
        if (grant is None or grant["client_id"] != client_id or grant["redirect_uri"] != redirect_uri
                or grant["method"] != "S256" or grant["challenge"] != digest):
            raise HubError('trade the login code for a token: HTTP 400 {"error": "invalid_grant"}', status=400)
        return grant["token"]

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
