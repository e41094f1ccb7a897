"""Make sure no batch job outlives its server.

* After every stop (the reaper's own, or a user's "Stop now"), confirm through the batch system that
  the server's job is gone; if it is still there after ``slurm.cancel_grace``, or the hub's stop
  failed, cancel it ourselves (with retries), and record what was done.
* Orphans: jobs with the hub's job name that no running hub server owns, for longer than
  ``orphans.grace``, are reported and (unless ``orphans.cancel: false`` or dry run) cancelled, and
  their user is told.
* The batch system's view (walltime end, partition, GPUs) feeds observations and rule matching.

A batch command that fails or times out means "unknown": never "gone", never a reason to act.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.model import HubServer, NoticeKind, RunKey
from ..store.context import NoticeContext
from .base import BatchError, BatchSystem, Job

log = logging.getLogger("reaper.batch")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class JobGuard:
    def __init__(
        self,
        batch: BatchSystem,
        store: Any,
        *,
        job_name: str = "jupyterhub-reaper",
        cancel_grace: timedelta = timedelta(seconds=30),
        cancel_retries: int = 3,
        poll_every: timedelta = timedelta(seconds=2),
        orphan_grace: timedelta = timedelta(minutes=10),
        orphan_cancel: bool = True,
        channels: Iterable[str] = ("log",),
        clock: Callable[[], datetime] = _utcnow,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.batch = batch
        self.store = store
        self.job_name = job_name
        self.cancel_grace = cancel_grace
        self.cancel_retries = cancel_retries
        self.poll_every = poll_every
        self.orphan_grace = orphan_grace
        self.orphan_cancel = orphan_cancel
        self.channels = list(channels)
        self.clock = clock
        self.sleep = sleep
        self._orphan_seen: dict[str, datetime] = {}
        self.scancels = 0
        self.scancel_failures = 0
        self.orphans_cancelled = 0

    async def _db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # ------------------------------------------------------------------ the hub's jobs

    async def hub_jobs(self) -> dict[str, Job] | None:
        """Every job with the hub's job name, by id; None when the batch system cannot tell."""
        try:
            jobs = await self.batch.jobs(name=self.job_name)
        except BatchError as e:
            log.warning("cannot list the hub's batch jobs (state unknown, nothing done): %s", e)
            return None
        return {j.id: j for j in jobs}

    async def cpu_usage(self, job_ids: Sequence[str]) -> dict[str, float]:
        """CPU seconds each job has used so far, from the batch system's accounting (one command
        for all the ids; BatchSystem.cpu_usage). Passed through: a failing or unreadable command
        raises BatchError for the caller to log. A job absent from the answer (finished, pending,
        not accounted, or no batch system at all, where there is no guard to ask) means UNKNOWN,
        never "idle": the caller must not take absence, or an empty dict, as "no CPU used"."""
        ids = [j for j in job_ids if j]
        if not ids:
            return {}
        return await self.batch.cpu_usage(ids)

    # ------------------------------------------------------------------ after a stop

    async def after_stop(self, server: HubServer, outcome: str, now: datetime) -> str:
        """Confirm the server's job is gone; cancel it if not. Returns what happened, in a word."""
        job_id = server.job_id
        if not job_id:
            return "no job"
        key = server.run_key()
        deadline = self.clock() + self.cancel_grace
        last_error = ""
        # The hub's stop normally cancels the job itself (the spawner's scancel): give it the grace.
        # A failed hub stop means the spawner's own cancel may never come: cancel at once.
        while outcome != "error":
            try:
                job = await self.batch.job(job_id)
            except BatchError as e:
                job, last_error = "unknown", str(e)  # type: ignore[assignment]
            if job is None or (isinstance(job, Job) and job.finished):
                await self._db(self.store.reports.record_action, key, "job-gone", True,
                               f"job {job_id} is gone after the stop", self.clock(), job_id=job_id)
                log.info("%s: job %s is gone", server.label, job_id)
                return "gone"
            if self.clock() >= deadline:
                break
            await self.sleep(self.poll_every.total_seconds())
        why = "the hub's stop failed" if outcome == "error" else \
            f"still there {int(self.cancel_grace.total_seconds())}s after the stop"
        if last_error:
            why += f" (last squeue error: {last_error})"
        return await self._cancel(key, job_id, server.user, why)

    async def _cancel(self, key: RunKey | None, job_id: str, user: str | None, why: str) -> str:
        err = ""
        for attempt in range(1, self.cancel_retries + 1):
            try:
                await self.batch.cancel(job_id, user=user)
            except BatchError as e:
                err = str(e)
                log.warning("scancel %s failed (attempt %d/%d): %s", job_id, attempt, self.cancel_retries, e)
                if attempt < self.cancel_retries:
                    await self.sleep(min(2.0 ** attempt, 30.0) * 0.5)
                continue
            self.scancels += 1
            await self._db(self.store.reports.record_action, key, "scancel", True,
                           f"cancelled job {job_id}: {why}", self.clock(), job_id=job_id)
            log.warning("cancelled job %s ourselves: %s", job_id, why)
            return "cancelled"
        self.scancel_failures += 1
        await self._db(self.store.reports.record_action, key, "scancel-failed", False,
                       f"could not cancel job {job_id} after {self.cancel_retries} tries ({why}): {err}",
                       self.clock(), job_id=job_id)
        log.error("job %s could NOT be cancelled after %d tries: %s", job_id, self.cancel_retries, err)
        return "cancel failed"

    # ------------------------------------------------------------------ orphans

    async def reconcile(self, servers: Iterable[HubServer], jobs: dict[str, Job] | None, now: datetime,
                        *, dry_run: bool = False) -> list[Job]:
        """Jobs of the hub that no running server owns, past the grace: report, cancel, tell the user.

        A dry run reports them (logged) and changes nothing, not even the guard's first sightings:
        a job it has not seen before counts from its start (a dry run from the command line has
        seen nothing before)."""
        if jobs is None:
            return []
        owned = {s.job_id for s in servers if s.job_id}
        users_starting = {s.user for s in servers if s.pending == "spawn" or not s.ready}
        orphans: list[Job] = []
        live = set()
        for job in jobs.values():
            if job.finished or job.id in owned:
                continue
            live.add(job.id)
            if dry_run:
                first = self._orphan_seen.get(job.id) or job.start or now
            else:
                first = self._orphan_seen.setdefault(job.id, now)
            if job.user in users_starting:
                continue  # a spawn in progress: the hub has not recorded the job id yet
            if now - first < self.orphan_grace:
                continue
            orphans.append(job)
        if not dry_run:
            for gone in set(self._orphan_seen) - live:
                self._orphan_seen.pop(gone, None)
        for job in orphans:
            where = f"job {job.id} of {job.user} ({job.partition or '?'} on {job.node or '?'})"
            if dry_run or not self.orphan_cancel:
                log.warning("orphan %s: no hub server owns it%s", where,
                            " (dry run: not cancelled)" if dry_run else " (orphans.cancel is false: reported only)")
                if not dry_run:
                    await self._db(self.store.reports.record_action, None, "orphan-seen", True,
                                   f"{where}: no hub server owns it", now, job_id=job.id)
                continue
            run = RunKey(job.user, f"job-{job.id}", job.start or first_seen(self._orphan_seen, job, now))
            result = await self._cancel(run, job.id, job.user, "orphan: no hub server owns it")
            if result == "cancelled":
                self.orphans_cancelled += 1
                await self._db(
                    self.store.outbox.add_notice, run, NoticeKind.ORPHAN, None, now, channels=self.channels,
                    context=NoticeContext(
                        user=job.user, server="", started=job.start or now, job_id=job.id, state="detached",
                        reason=f"batch job {job.id} was still running but no server of yours owned it",
                        user_options={"partition": job.partition, "gpus": job.gpus, "cpus": job.cpus}),
                )
                await self._db(self.store.runs.end_run, run, now, "orphan job cancelled")
                self._orphan_seen.pop(job.id, None)
            # a failed cancel keeps the job on the list: the next sweep tries again at once
        return orphans


def first_seen(seen: dict[str, datetime], job: Job, now: datetime) -> datetime:
    return seen.get(job.id, now)


def build_guard(settings: Any, store: Any = None, *, system: str | None = None) -> JobGuard | None:
    """The guard over ``settings.batch``; None when no batch system is used. ``system``: the one
    already chosen (reaper.config.choose_batch_system); default: chosen here (auto probes)."""
    from . import make_batch_system

    batch = make_batch_system(settings.batch, system=system)  # type: ignore[arg-type]
    if batch is None:
        return None
    sl = settings.slurm
    return JobGuard(
        batch,
        store,
        job_name=sl.job_name,
        cancel_grace=sl.cancel_grace,
        cancel_retries=sl.cancel_retries,
        orphan_grace=settings.orphans.grace,
        orphan_cancel=settings.orphans.cancel,
        channels=settings.defaults.channels,
    )
