"""What every handler of the page needs: the running service and the page's own settings."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..config import WebSettings
from ..core.keep import KeepPolicy
from ..metrics import METRICS, Metrics


@dataclass
class WebContext:
    """What every handler needs: the running service and the page's own settings."""

    service: Any  # reaper.service.ReaperService (or a test double with the same attributes)
    prefix: str
    hub_auth: Any  # jupyterhub.services.auth.HubOAuth (reaper.web.auth.hub_oauth)
    hub_home: str = "/hub/home"  # the hub's home page, linked from the page's top bar
    metrics: Metrics = METRICS
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    dry_run_at: datetime | None = None
    dry_run_result: Any = None
    dry_run_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    clock: Any = None  # () -> aware UTC datetime; default datetime.now(UTC)

    @property
    def settings(self) -> Any:
        return self.service.settings

    @property
    def web(self) -> WebSettings:
        """The ``web`` section (validated with the rest of config.yaml; reloads show at once)."""
        web: WebSettings = self.service.settings.web
        return web

    @property
    def keep(self) -> KeepPolicy:
        """The limits of "Keep running" (``web.keep``), as the core's keep_until takes them."""
        return self.web.keep.policy()

    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    def url(self, path: str = "") -> str:
        return self.prefix + path.lstrip("/")
