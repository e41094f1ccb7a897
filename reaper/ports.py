"""What the sweep and the stop procedure need of their collaborators, as Protocols.

The sweep takes these objects in and calls them; it never asks whether one can do something
(``hasattr``): a collaborator implements its whole protocol, and a missing one is ``None``.
The hub's is the hub adapter's own declaration, ``reaper.hub.Hub``, re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .core.model import Decision, History, HubServer, NoticeKind, Observation, RunKey
from .hub import Hub

if TYPE_CHECKING:
    from .batch.base import Job
    from .store import NoticeContext, NoticeRow, StopRecord


@runtime_checkable
class RunsPort(Protocol):
    """Server runs and their observations (reaper.store.Runs)."""

    def could_stop_runs(self, runs: Iterable[RunKey]) -> set[RunKey]: ...
    def histories(self, runs: Iterable[RunKey]) -> dict[RunKey, History]: ...
    def record(self, obs: Observation, decision: Decision, now: datetime) -> int | None: ...
    def record_many(self, items: list[tuple[Observation, Decision]], now: datetime,
                    jobs: Mapping[str, Any] | None = None) -> list[int | None]: ...
    def mark_stop_requested(self, run: RunKey, now: datetime) -> None: ...
    def mark_stops_requested(self, runs: Iterable[RunKey], now: datetime) -> None: ...
    def record_stops(self, items: Iterable[StopRecord], now: datetime) -> list[int | None]: ...
    def end_run(self, run: RunKey, now: datetime, reason: str) -> None: ...
    def open_runs(self) -> list[RunKey]: ...


@runtime_checkable
class OutboxPort(Protocol):
    """Queued notices (reaper.store.Outbox)."""

    def add_notice(self, run: RunKey, kind: NoticeKind, spell: datetime | None, now: datetime, *,
                   channels: list[str], context: NoticeContext) -> int | None: ...


@runtime_checkable
class ReportsPort(Protocol):
    """Sweeps, actions and what was sent (reaper.store.Reports)."""

    def start_sweep(self, now: datetime, *, dry_run: bool) -> int: ...
    def finish_sweep(self, sweep_id: int, now: datetime, ok: bool, summary: dict[str, Any]) -> None: ...
    def record_action(self, run: RunKey | None, kind: str, ok: bool, detail: str, now: datetime,
                      **kw: Any) -> Any: ...
    def recent_notices(self, since: datetime, limit: int = 200) -> list[NoticeRow]: ...


@runtime_checkable
class StorePort(Protocol):
    """The reaper's database (reaper.store.Store) by subject, as the sweep and the stops use it."""

    runs: RunsPort
    outbox: OutboxPort
    reports: ReportsPort


@runtime_checkable
class Notifier(Protocol):
    """The outbox: delivers the notices that are due."""

    async def drain(self, now: datetime) -> int: ...


@runtime_checkable
class Guard(Protocol):
    """The batch-system guard (reaper.batch.guard.JobGuard): the hub's jobs, the look after a stop,
    the orphans, the jobs' CPU accounting (absent from its answer = unknown, never idle)."""

    async def hub_jobs(self) -> dict[str, Job] | None: ...
    async def after_stop(self, server: HubServer, outcome: str, now: datetime) -> str: ...
    async def reconcile(self, servers: Iterable[HubServer], jobs: dict[str, Job] | None, now: datetime,
                        *, dry_run: bool = False) -> list[Job]: ...
    # The batch accounting: cumulative CPU seconds per job, from ONE batch command (Slurm sstat);
    # a job left out is unknown; raises reaper.batch.base.BatchError when the command fails.
    async def cpu_usage(self, job_ids: Sequence[str]) -> dict[str, float]: ...


__all__ = ["Guard", "Hub", "Notifier", "OutboxPort", "ReportsPort", "RunsPort", "StorePort"]
