"""Group commit: many concurrent tasks each wait for their own record to be written, and the
records are written a batch at a time, in a worker thread, one transaction per batch.

Used where a sweep writes one small record per server at a rate a database cannot take one
transaction each for (10,000 stops, 10,000 delivered notices): the intent of a stop, which must be
durable before the hub is asked, and a delivered notice, which must be durable soon after. While
one batch is being written the next one gathers, so the batch size follows the load on its own:
one record per transaction when servers trickle in, hundreds when they flood. A task's ``add``
returns only once its record is committed, so no ordering promise is weaker than one transaction
per record; if the write fails, every task of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupWriter(Generic[T]):
    def __init__(self, write: Callable[[Sequence[T]], object], *, max_batch: int = 1000) -> None:
        self._write = write  # synchronous; runs in a worker thread with the whole batch
        self._max = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written (for tests and metrics)

    async def add(self, item: T) -> None:
        """Queue ``item`` and wait until the batch holding it is written (raises what the write raised)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
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
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
