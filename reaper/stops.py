"""The one stop procedure: durable intent, hub stop, record, batch guard.

Used by the sweep (a streamed stop right after its look, the held stops after the safety check)
and by the web page's "Stop now", so that every stop is remembered before the hub is asked, is
recorded with one outcome vocabulary, and has its batch job checked afterwards.

* **intent**: the run's ``stop_requested_at`` is written before the hub is asked: a reaper that
  dies after the hub stopped the server still knows (the next sweep ends the run and tells the
  user). Many at once are one transaction (``intend_many``) or group-committed (``intend``).
* **ask**: the hub's stop, as a :class:`StopOutcome`.
* **record**: the outcome's action row, the end of the run when it stopped, and (for the reaper's
  own stops) the "stopped" notice; many in one transaction.
* **guard**: the batch system's look after the stop (is the job gone? cancel it if not), bounded
  by ``safety.stop_concurrency``; a failure is logged, never raised. Not after a *refused* stop:
  the hub said no on purpose (e.g. ``refresh_pre_stop`` until the user logs in again), and
  cancelling the job behind its back would overrule it.

A refused stop is a state, not a silent retry: the first refusal of a server run is logged as an
ERROR with the hub's words, each one is recorded (action ``stop-refused``, shown on the page and
the admin view), and later sweeps ask again (the hub may allow it once the user logged in) with a
WARNING that counts the refusals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from .core.model import HubServer, RunKey
from .groupcommit import GroupWriter
from .ports import Guard, Hub, StorePort
from .store import NoticeContext, StopRecord

log = logging.getLogger("reaper.stops")


class StopOutcome(Enum):
    """What the hub said to a stop. The values are the hub client's words (StopResult.outcome)."""

    STOPPED = "stopped"  # the hub stopped it
    GONE = "gone"  # the hub no longer had it: as good as stopped
    PENDING = "pending"  # accepted (202), still stopping: followed up by the next sweeps
    REFUSED = "refused"  # the hub said no (403: the token may not, or the user must log in again)
    FAILED = "error"  # the hub failed or could not be reached

    @property
    def done(self) -> bool:
        """The server is no longer running: the run ends."""
        return self in (StopOutcome.STOPPED, StopOutcome.GONE)

    @property
    def ok(self) -> bool:
        return self not in (StopOutcome.FAILED, StopOutcome.REFUSED)

    @property
    def record_kind(self) -> str:
        """The action the store records for it."""
        return _MAP[self][0]

    @property
    def page_code(self) -> str:
        """The web page's result code."""
        return _MAP[self][1]


# The one map from a stop's outcome to its record kind and page code.
_MAP: dict[StopOutcome, tuple[str, str]] = {
    StopOutcome.STOPPED: ("stop", "stopped"),
    StopOutcome.GONE: ("stop", "gone"),
    StopOutcome.PENDING: ("stop-pending", "stop-pending"),
    StopOutcome.REFUSED: ("stop-refused", "stop-refused"),
    StopOutcome.FAILED: ("stop-failed", "stop-failed"),
}


@dataclass(frozen=True, slots=True)
class Asked:
    """One hub stop: its outcome, the hub's detail, and when the answer came."""

    outcome: StopOutcome
    detail: str
    at: datetime


def stop_record(key: RunKey, asked: Asked, why: str, *, job_id: str | None, actor: str = "reaper",
                end_reason: str, notice_context: NoticeContext | None = None,
                channels: tuple[str, ...] = ("log",)) -> StopRecord:
    """The store's record of one stop: ``end_reason`` and ``notice_context`` apply only when the
    server is no longer running."""
    done = asked.outcome.done
    return StopRecord(key, asked.outcome.record_kind, asked.outcome.ok,
                      f"{why} | hub: {asked.outcome.value} ({asked.detail})", job_id=job_id, actor=actor,
                      end_reason=end_reason if done else None,
                      notice_context=notice_context if done else None,
                      channels=channels if done and notice_context is not None else ("log",))


class Stops:
    def __init__(self, hub: Hub, store: StorePort, guard: Guard | None, *,
                 clock: Callable[[], datetime], concurrency: int) -> None:
        self.hub = hub
        self.store = store
        self.guard = guard
        self.clock = clock
        self._guard_slots = asyncio.Semaphore(concurrency)
        # Streamed stops' intents, group-committed (see groupcommit.py): stops are paced by the
        # hub, so a batch lingers 50 ms for company instead of one transaction per stop.
        self._intents: GroupWriter[tuple[RunKey, datetime]] = GroupWriter(self._write_intents, linger=0.05)
        self._refusals: dict[RunKey | str, int] = {}  # refused stops per server run (this process)

    def _write_intents(self, items: Any) -> None:
        self.store.runs.mark_stops_requested([k for k, _ in items], max(t for _, t in items))

    async def _db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # ------------------------------------------------------------------ the four parts

    async def intend(self, key: RunKey) -> None:
        """One stop's durable intent, group-committed with its neighbours; raises if not written."""
        await self._intents.add((key, self.clock()))

    async def intend_many(self, keys: Iterable[RunKey]) -> None:
        """Many stops' intents, in one transaction."""
        await self._db(self.store.runs.mark_stops_requested, list(keys), self.clock())

    async def ask(self, server: HubServer) -> Asked:
        result = await self.hub.stop(server.user, server.name)
        asked = Asked(StopOutcome(result.outcome), result.detail, self.clock())
        if asked.outcome is StopOutcome.REFUSED:
            self.refused(server, asked.detail)
        return asked

    def refused(self, server: HubServer, detail: str) -> int:
        """Log one refused stop: the run's first as an ERROR, later ones as a WARNING with their
        count. Returns how many times this run's stop was refused."""
        key: RunKey | str = server.run_key() or server.label
        n = self._refusals[key] = self._refusals.get(key, 0) + 1
        if n == 1:
            log.error("%s: stop REFUSED by the hub; the server keeps running and its job is left alone; "
                      "asked again at the next sweeps: %s", server.label, detail)
        else:
            log.warning("%s: stop refused by the hub again (%d times for this server run): %s",
                        server.label, n, detail)
        return n

    async def record(self, records: list[StopRecord]) -> None:
        await self._db(self.store.runs.record_stops, records, self.clock())

    async def after(self, server: HubServer, outcome: StopOutcome) -> None:
        """The batch guard's look after a stop (is the job gone? cancel it if not); none after a
        refused stop (the server runs on, as the hub decided)."""
        if self.guard is None or outcome is StopOutcome.REFUSED:
            return
        async with self._guard_slots:
            try:
                await self.guard.after_stop(server, outcome.value, self.clock())
            except Exception as e:
                log.error("%s: after-stop check failed: %s", server.label, e)

    # ------------------------------------------------------------------ a person's stop

    async def stop_now(self, user: str, name: str, *, actor: str) -> StopOutcome:
        """Stop one server at a person's request (the web page's "Stop now"): intent, hub stop,
        record, batch guard, as the reaper's own stops."""
        server = await self.hub.get_server(user, name)
        if server is None:
            return StopOutcome.GONE
        key = server.run_key()
        if key is not None:
            await self._db(self.store.runs.mark_stop_requested, key, self.clock())
        asked = await self.ask(server)
        why = f"stop requested by {actor}"
        if key is not None:
            await self.record([stop_record(key, asked, why, job_id=server.job_id, actor=actor,
                                           end_reason=f"stopped by {actor}")])
        else:
            await self._db(self.store.reports.record_action, None, asked.outcome.record_kind, asked.outcome.ok,
                           f"{why} | hub: {asked.outcome.value} ({asked.detail})", asked.at,
                           actor=actor, job_id=server.job_id)
        log.info("%s: stop requested by %s: %s", server.label, actor, asked.outcome.value)
        await self.after(server, asked.outcome)
        return asked.outcome
