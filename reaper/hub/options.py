"""The hub client's settings, in two frozen groups: the hub API calls, and the probes of the
single-user servers. Built from config in one place (``reaper.service.make_hub_client``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class HubOptions:
    """Hub API calls (listing, proxy table, stop, re-check).

    ``http``: the transport under every request, probes included (``reaper.hub.transport``).
    ``stop_timeout``: a stop's DELETE lasts as long as the spawner takes (never less than
    ``timeout``); stops have their own ``stop_concurrency`` slots instead of holding the hub
    calls' ``concurrency``."""

    http: Literal["aiohttp", "httpx"] = "aiohttp"
    timeout: float = 10.0
    stop_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    concurrency: int = 4
    stop_concurrency: int = 8
    page_size: int = 200

    def __post_init__(self) -> None:
        if self.http not in ("aiohttp", "httpx"):
            raise ValueError(f"http must be 'aiohttp' or 'httpx', not {self.http!r}")
        if self.page_size < 1 or self.concurrency < 1 or self.retries < 0:
            raise ValueError("page_size and concurrencies must be >= 1, retries >= 0")


@dataclass(frozen=True, slots=True)
class ProbeOptions:
    """Probes of the single-user servers (``/api/status``, ``/api/kernels``, ``/api/terminals``).

    ``via="direct"`` (default) asks each server at its own address; ``"proxy"`` asks through the
    proxy at ``public_url`` (the proxy then records every probe as activity: STACK.md).
    ``token`` (optional) is sent to the servers instead of the service's: give it only
    ``access:servers`` so that a compromised user server never sees the admin token. ``retries``
    is at most 1."""

    via: Literal["direct", "proxy"] = "direct"
    public_url: str | None = None
    timeout: float = 5.0
    retries: int = 1
    concurrency: int = 32
    terminals: bool = True
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.via not in ("direct", "proxy"):
            raise ValueError(f"probe_via must be 'direct' or 'proxy', not {self.via!r}")
        if self.via == "proxy" and not self.public_url:
            raise ValueError("probe_via='proxy' needs public_url")
        if self.concurrency < 1:
            raise ValueError("page_size and concurrencies must be >= 1, retries >= 0")
