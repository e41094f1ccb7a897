"""The "lab" channel: the notice in the user's open JupyterLab, through the companion in their server.

Delivering a notice PUTs it to the server's own ``api/reaper/notice`` (reaper/singleuser/notice.py) with
the service's token, through the hub client's probe path (the server's own address, never the proxy, and
``?no_track_activity=1``: telling the user must not count as their activity; with ``probe.via: proxy``
the proxy itself records these requests as activity, as it does the probes). JupyterLab's extension
(labextension/) shows it with Keep running / Stop now and a countdown.

When the spell the notice belongs to ends (the reaper's look sees activity: a new spell), or the user kept
the server from the reaper's page or a notice's keep link (``kept_until``: the warning's stop no longer
holds), the sweep calls :meth:`LabChannel.spells_ended`, which DELETEs the notice; the answer says whether the user pressed Keep
running in JupyterLab (``kept_at``), which is recorded as the action "keep" by the user, "kept from
JupyterLab". A stopped or gone server needs no clear: its companion went with it.

A server without the companion answers 404: that is not worth retrying (a permanent, quiet failure of
this one delivery, logged once per server run); the other channels of the notice are unaffected, and
stops never wait for this channel (a notice is settled when any channel delivered it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..core.model import HubServer, NoticeKind, RunKey, State
from .outbox import DeliveryError

log = logging.getLogger("reaper.notify.lab")

SHOWN = frozenset({NoticeKind.WARNING, NoticeKind.REMINDER, NoticeKind.FINAL, NoticeKind.WALLTIME})
PATH = "api/reaper/notice"
CLEAR_CONCURRENCY = 8


def isoformat(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def notice_body(delivery: Any, hub_name: str) -> dict[str, Any]:
    """What the companion stores: kind, stop_at, walltime_end, reason, hub, server, id."""
    ctx = delivery.context
    kind = NoticeKind(delivery.kind)
    return {
        "id": str(delivery.notice_id),
        "kind": kind.value,
        "stop_at": isoformat(ctx.stop_at) if ctx.stop_at else None,
        "walltime_end": isoformat(ctx.job_end) if ctx.job_end else None,
        "reason": ctx.reason or "",
        "hub": hub_name,
        "server": delivery.run.server,
    }


def server_of(run: RunKey, url: str = "", state: Mapping[str, Any] | None = None) -> HubServer:
    """The hub's server of a run, as far as the hub client needs it to reach the server."""
    return HubServer(user=run.user, name=run.server, started=run.started, last_activity=None,
                     url=url or "", state=dict(state or {}))


def notice_to_clear(obs: Any, history: Any, now: datetime | None = None) -> Any:
    """This run's last shown notice (a SentNotice), if JupyterLab should no longer show it: its spell
    has ended at this look, or (``now`` given) the run is kept running (``kept_until``, from the page or
    a keep link) and it is a warning, reminder or final notice, whose stop the keep has cancelled (a
    walltime notice stays: a keep does not move the job's end). None otherwise, and in doubt (the server
    unreachable or pending)."""
    if history is None or obs.state in (State.UNREACHABLE, State.PENDING):
        return None
    spells = [n for n in history.notices if n.kind in SHOWN and n.spell is not None]
    if not spells:
        return None
    last = max(spells, key=lambda n: n.created_at)
    if obs.idle_since != last.spell:
        return last
    kept = history.kept_until
    if now is not None and kept is not None and now < kept and last.kind is not NoticeKind.WALLTIME:
        return last
    return None


class LabChannel:
    name = "lab"

    def __init__(self, settings: Any, *, hub: Any = None, store: Any = None) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store
        self._absent: set[RunKey] = set()  # runs whose server has no companion (said once)
        self._cleared: set[tuple[RunKey, datetime]] = set()  # (run, notice created_at) cleared

    async def deliver(self, delivery: Any) -> None:
        kind = NoticeKind(delivery.kind)
        run: RunKey = delivery.run
        if kind not in SHOWN:
            return  # stopped / orphan: no open JupyterLab to show it in
        if self.hub is None:
            raise DeliveryError("lab: no hub client to reach the server", permanent=True)
        if run in self._absent:
            raise DeliveryError(f"lab: {run.label} has no companion (said before)", permanent=True, quiet=True)
        ctx = delivery.context
        status, answer = await self.hub.call_server(server_of(run, ctx.url, ctx.spawner_state), "PUT", PATH,
                                                    notice_body(delivery, self.settings.hub.name))
        if status is not None and 200 <= status < 300:
            log.info("notice %s shown in JupyterLab of %s", kind.value, run.label)
            return
        if status == 404:
            self._absent.add(run)
            log.info("lab: %s has no companion extension (api/reaper/notice: 404): its notices go by the "
                     "other channels only", run.label)
            raise DeliveryError(f"lab: {run.label} has no companion (404)", permanent=True, quiet=True)
        if status in (400, 401, 403):
            raise DeliveryError(f"lab: {run.label} refused the notice: HTTP {status} {answer}"[:300], permanent=True)
        raise DeliveryError(f"lab: {run.label}: {'HTTP ' + str(status) if status else answer}"[:300])

    async def spells_ended(self, rows: list[Any], histories: Mapping[RunKey, Any], now: datetime) -> None:
        """The sweep's hook after a batch is recorded: clear the notice of every spell that ended, and of
        every run kept running since it was shown."""
        todo = []
        for r in rows:
            key = r.obs.server.run_key()
            if key is None or key in self._absent or self.name not in (r.rule.channels or ()):
                continue
            last = notice_to_clear(r.obs, histories.get(key), now)
            if last is not None and (key, last.created_at) not in self._cleared:
                self._cleared.add((key, last.created_at))
                todo.append((key, r.obs.server))
        if not todo or self.hub is None:
            return
        slots = asyncio.Semaphore(CLEAR_CONCURRENCY)

        async def one(key: RunKey, server: HubServer) -> None:
            async with slots:
                await self.clear(key, server, now)

        await asyncio.gather(*(one(k, s) for k, s in todo))

    async def clear(self, key: RunKey, server: HubServer, now: datetime) -> None:
        """DELETE the notice; record a keep pressed in JupyterLab. Never raises."""
        status, answer = await self.hub.call_server(server, "DELETE", PATH)
        if status == 404:
            self._absent.add(key)
            return
        if status != 200 or not isinstance(answer, dict):
            log.warning("lab: could not clear the notice in JupyterLab of %s: %s", key.label,
                        f"HTTP {status}" if status else answer)
            return
        kept = answer.get("kept_at")
        log.info("lab: notice cleared in JupyterLab of %s (its spell ended%s)", key.label,
                 f"; kept from JupyterLab at {kept}" if kept else "")
        if kept and self.store is not None:
            try:
                await asyncio.to_thread(self.store.reports.record_action, key, "keep", True,
                                        f"kept from JupyterLab at {kept}", now, actor=key.user)
            except Exception:
                log.exception("lab: could not record the keep from JupyterLab of %s", key.label)
