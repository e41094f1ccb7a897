"""The durable outbox: notices are rows written with the decision that caused them; this drains them.

Each notice has one delivery per channel. A delivery is tried, and on a temporary failure retried
with exponential backoff; a permanent failure is recorded with its reason. The store keeps the
state, so a restart neither loses nor repeats a notice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from ..groupcommit import GroupWriter

log = logging.getLogger("reaper.notify")


class DeliveryError(Exception):
    """A channel could not deliver. ``permanent``: retrying will not help (bad address, bad token).
    ``quiet``: the channel has said why once already (the "lab" channel's server without the
    companion): the failure is logged at DEBUG only."""

    def __init__(self, message: str, *, permanent: bool = False, quiet: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.quiet = quiet


class Channel(Protocol):
    name: str

    async def deliver(self, delivery: Any) -> None:
        """Deliver one notice on this channel; raise DeliveryError on failure."""


class LogChannel:
    """Records the notice in the log only (the default channel, and the one used in dry demos)."""

    name = "log"

    async def deliver(self, delivery: Any) -> None:
        log.info("NOTICE %s to %s: %s", delivery.kind, delivery.run.label, delivery.context.reason)


class Outbox:
    def __init__(
        self,
        store: Any,
        channels: Mapping[str, Channel],
        *,
        max_attempts: int = 8,
        base_delay: timedelta = timedelta(seconds=30),
        max_delay: timedelta = timedelta(hours=1),
        batch: int = 200,
        concurrency: int = 8,
        observer: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.channels = dict(channels)
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.batch = batch
        self.concurrency = concurrency
        self.delivered = 0
        self.failed = 0
        self.observer = observer  # (channel, kind, "sent" | "retry" | "failed"), e.g. metrics
        self._lock = asyncio.Lock()  # one drain at a time: a delivery is never tried twice at once
        # Delivered marks are group-committed: a burst of 10,000 notices is a few dozen
        # transactions, and each delivery still waits for its own mark to be durable.
        self._delivered: GroupWriter[tuple[int, datetime]] = GroupWriter(store.outbox.mark_delivered_many)

    def backoff(self, attempts: int) -> timedelta:
        delay = self.base_delay * (2 ** max(attempts - 1, 0))
        delay = min(delay, self.max_delay)
        return delay * (0.8 + 0.4 * random.random())

    def _observe(self, channel: str, kind: Any, result: str) -> None:
        if self.observer is not None:
            try:
                self.observer(channel, str(getattr(kind, "value", kind)), result)
            except Exception:  # metrics must never break delivery
                log.debug("notice observer failed", exc_info=True)

    async def drain(self, now: datetime, *, max_batches: int = 1000) -> int:
        """Try every due delivery once (batch after batch). Returns how many were delivered."""
        async with self._lock:
            done = 0
            tried: set[int] = set()
            for _ in range(max_batches):
                due = [d for d in await asyncio.to_thread(self.store.outbox.due_deliveries, now, self.batch)
                       if d.id not in tried]
                if not due:
                    break
                tried.update(d.id for d in due)
                done += await self._send(due, now)
            return done

    async def _send(self, due: list[Any], now: datetime) -> int:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(d: Any) -> int:
            return await self._one(d, now, sem)

        return sum(await asyncio.gather(*(one(d) for d in due)))

    async def _one(self, d: Any, now: datetime, sem: asyncio.Semaphore) -> int:
        """Try one delivery (holding one of the ``concurrency`` slots only while the channel
        works); 1 if it was delivered."""
        channel = self.channels.get(d.channel)
        if channel is None:
            await asyncio.to_thread(
                self.store.outbox.mark_failed, d.id, now, f"channel {d.channel!r} is not configured",
                permanent=True, retry_at=None,
            )
            self.failed += 1
            self._observe(d.channel, d.kind, "failed")
            log.error("notice %s for %s: channel %s is not configured", d.kind, d.run.label, d.channel)
            return 0
        try:
            async with sem:
                await channel.deliver(d)
        except DeliveryError as e:
            attempts = d.attempts + 1
            permanent = e.permanent or attempts >= self.max_attempts
            retry_at = None if permanent else now + self.backoff(attempts)
            await asyncio.to_thread(
                self.store.outbox.mark_failed, d.id, now, str(e), permanent=permanent, retry_at=retry_at
            )
            self._observe(d.channel, d.kind, "failed" if permanent else "retry")
            if permanent:
                self.failed += 1
                (log.debug if e.quiet else log.error)("notice %s for %s via %s FAILED permanently: %s", d.kind, d.run.label, d.channel, e)
            else:
                log.warning("notice %s for %s via %s failed (attempt %d), retry at %s: %s",
                            d.kind, d.run.label, d.channel, attempts, retry_at, e)
            return 0
        except Exception as e:  # an unexpected bug in a channel: retry later, say so
            attempts = d.attempts + 1
            await asyncio.to_thread(
                self.store.outbox.mark_failed, d.id, now, f"{type(e).__name__}: {e}",
                permanent=attempts >= self.max_attempts, retry_at=now + self.backoff(attempts),
            )
            log.exception("notice %s for %s via %s: unexpected error", d.kind, d.run.label, d.channel)
            return 0
        await self._delivered.add((d.id, now))
        self._observe(d.channel, d.kind, "sent")
        self.delivered += 1
        return 1
