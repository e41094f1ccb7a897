"""The JupyterHub adapter: the hub's REST API (listing, stop, the route table) and the probes of
the single-user servers, over one transport.

- ``client.py``     HubClient: what the sweep asks of the hub (the :class:`Hub` protocol)
- ``options.py``    HubOptions, ProbeOptions: the client's settings
- ``api.py``        HubAPI: one retried hub API call, pagination; HubError, HubListingError
- ``transport.py``  Transport (``send -> Answer``), AiohttpTransport (the default)
- ``httpx_transport.py``  HttpxTransport (``hub.http: httpx``, the respx tests)
- ``routes.py``     RouteTable: each server's own address (spawner state, the proxy table)
- ``probe.py``      the servers' answers -> Probe (pure)
- ``models.py``     the hub's models -> HubServer, Kernel (pure)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from reaper.core.model import HubServer, Probe, Work

from .api import PAGINATION_MEDIA_TYPE, HubAPI, HubError, HubListingError
from .client import NO_TRACK, HubClient, StopResult
from .models import kernel_from_model, parse_time, quote_segment, server_from_model, servers_from_user
from .options import HubOptions, ProbeOptions
from .probe import probe_from_answers, probe_from_status
from .transport import Answer, Transport, TransportFailure, TransportTimeout


@runtime_checkable
class Hub(Protocol):
    """What a sweep needs of the hub (HubClient over HTTP; tests' FakeHub from a table).

    ``list_active_servers`` raises HubListingError on a failed or partial listing; ``get_server``
    raises HubError when the hub cannot tell; ``stop``, ``probe``, ``probe_status``, ``activity`` and
    ``refresh_targets`` never raise (failures are in their answers). Arguments are positional
    (``status`` excepted): an implementation names them as it likes."""

    async def list_active_servers(self) -> list[HubServer]: ...

    async def get_server(self, user: str, server_name: str = "", /) -> HubServer | None: ...

    async def stop(self, user: str, server_name: str = "", /) -> StopResult: ...

    async def probe(self, server: HubServer, /, *, status: Probe | None = None) -> Probe: ...

    async def probe_status(self, server: HubServer, /) -> Probe: ...

    async def activity(self, server: HubServer, /) -> Work: ...

    async def refresh_targets(self) -> int: ...

    async def target_for(self, server: HubServer, /) -> str | None: ...


__all__ = [
    "NO_TRACK",
    "PAGINATION_MEDIA_TYPE",
    "Answer",
    "Hub",
    "HubAPI",
    "HubClient",
    "HubError",
    "HubListingError",
    "HubOptions",
    "ProbeOptions",
    "StopResult",
    "Transport",
    "TransportFailure",
    "TransportTimeout",
    "kernel_from_model",
    "parse_time",
    "probe_from_answers",
    "probe_from_status",
    "quote_segment",
    "server_from_model",
    "servers_from_user",
]
