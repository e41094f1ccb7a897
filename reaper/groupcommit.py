"""Group commit: many concurrent tasks each wait for their own record to be written, and the
records are written a batch at a time, in a worker thread, one transaction per batch.

Used where a sweep writes one small record per server at a rate a database cannot take one
transaction each for (10,000 stops, 10,000 delivered notices): the intent of a stop, which must be
durable before the hub is asked, and a delivered notice, which must be durable soon after. While
one batch is being written the next one gathers, so the batch size follows the load on its own:
one record per transaction when servers trickle in, hundreds when they flood. ``linger`` lets a
batch wait a few milliseconds for company: worth it when records arrive steadily but slower than
one transaction takes (stops paced by the hub). A task's ``add`` returns only once its record is
committed, so no ordering promise is weaker than one transaction per record; if the write fails,
every task of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupWriter(Generic[T]):
    def __init__(
        self, write: Callable[[Sequence[T]], object], *, max_batch: int = 1000, linger: float = 0.0
    ) -> None:
        self._write = write  # synchronous; runs in a worker thread with the whole batch
        self._max = max_batch
        self._linger = linger  # seconds a batch waits for company before it is written
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written (for tests and metrics)
        self.items = 0  # records written
        self.busy = 0.0  # seconds spent writing (wall, in the worker thread)

    async def add(self, item: T) -> None:
        """Queue ``item`` and wait until the batch holding it is written (raises what the write raised)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._pending:
            if self._linger and len(self._pending) < self._max:
                await asyncio.sleep(self._linger)
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, [item for item, _ in batch])
            except BaseException as exc:  # every waiter of this batch learns of it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                self.batches += 1
                self.items += len(batch)
                self.busy += time.perf_counter() - t0
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
