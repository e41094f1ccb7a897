"""One sweep, as named steps over a small context (:class:`SweepRun`):

    collect -> look -> decide -> limit notices -> safety -> record -> deliver -> stop held
    -> reconcile orphans

The imperative shell around the pure core (activity.classify, policy.decide, notices). Outside
systems come in as objects typed by their Protocols (reaper/ports.py): the hub client, the store,
the notifier (outbox) and the batch guard; a missing one is ``None``.

The listing is read whole (``collect``), then the servers go through in batches of ``BATCH``: a
batch's histories are read, its servers looked at and decided, the work of those about to be
warned or stopped looked at (one batch-accounting call, one companion request each), its streamed
stops issued, its
notices limited, and its rows recorded, before the next batch is read. A sweep so holds the listing
and one batch, not a row and a history per server of the hub (the service's sweeper keeps only the
counts). Probing starts once the whole listing is in.

Everything a sweep changes goes through its :class:`Effects`: the store, the outbox and the stops.
A dry run's effects (:class:`DryEffects`) record nothing, send nothing and stop nothing; the steps
are the same.

Never harm on doubt:
* a failed or partial listing ends the sweep before anything is decided or done;
* a failed probe makes a server ``unreachable`` (hub data only), never idle;
* a stop follows a fresh look: streamed, it goes out right after its batch's look (a look older
  than a minute by then is taken again, and an old listing is checked against the hub); otherwise
  it is probed again, re-classified and re-decided right before it is stopped;
* the look at what the job runs (the companion extension, the batch accounting) is taken only
  where it can change the decision; a source that fails or is absent never makes a server idle;
* a stop's intent is durable before the hub is asked, so a crash never loses a stop (stops.py);
* a sweep that would stop more servers than the safety limits stops none and alerts;
* ``dry_run`` decides and reports, and changes nothing (not even the store).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .config import Settings
from .core.activity import classify, classify_work, confirm_detached, continue_spell, needs_probe
from .core.model import (
    Action,
    Decision,
    History,
    HubServer,
    NoticeKind,
    Observation,
    Probe,
    Program,
    RunKey,
    State,
    Where,
    Work,
    humanize,
)
from .core.notices import SOFT, limit_notices, quiet_hours_end, soft_notice_counts
from .core.policy import decide, probe_horizon, select_rule
from .core.rules import ResolvedRule
from .faults import crashpoint
from .ports import Guard, Hub, Notifier, StorePort
from .stops import Asked, StopOutcome, Stops, stop_record
from .store import NoticeContext, notice_context
from .units import format_memory, read_user_options

if TYPE_CHECKING:
    from .batch.base import Job

log = logging.getLogger("reaper.sweep")

__all__ = ["BATCH", "DryEffects", "Effects", "Row", "SweepResult", "SweepRun", "Sweeper", "format_table",
           "quiet_hours_end", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Row:
    obs: Observation
    decision: Decision
    rule: ResolvedRule
    outcome: str = ""  # what was done, in words: "stopped", "stop pending", "warning queued", "would stop" ...
    queued: bool = False  # its notice was queued by this sweep (not already queued before)
    streamed: bool = False  # its stop went out during the sweep's look (see Sweeper._stop_streamed)
    stop: Asked | None = None  # a streamed stop's hub answer, recorded with its batch's rows
    answered_started: datetime | None = None  # /api/status "started" of the server that answered
    looked_at: datetime | None = None  # when its look ended (the look at its work included)


@dataclass
class SweepResult:
    started_at: datetime
    finished_at: datetime | None = None
    ok: bool = False
    dry_run: bool = False
    error: str | None = None
    keep_rows: bool = True  # whether ``rows`` keeps the finished rows (dry runs always do)
    rows: list[Row] = field(default_factory=list)
    servers: int = 0
    states: dict[str, int] = field(default_factory=dict)  # servers by state
    actions: dict[str, list[Any]] = field(default_factory=dict)  # "action (outcome)" -> [count, a reason]
    queued: dict[tuple[str, str], int] = field(default_factory=dict)  # (channel, notice kind) -> notices queued
    held: int = 0  # stops held back by the safety limits
    probes: int = 0
    probes_status_only: int = 0  # looks answered by /api/status alone (probe.confirm_with_status)
    companion_asks: int = 0  # requests to the companion extension (the look at the job's work)
    cpu_usage_calls: int = 0  # batch accounting calls (one per batch at most)
    notices: int = 0
    stops: int = 0
    stops_pending: int = 0
    stops_failed: int = 0
    safety_tripped: bool = False
    orphans: int = 0
    # the earliest moment after this sweep's start at which a stop (or its final notice) falls
    # due, as decided: the service moves its next sweep there (ReaperService.sweep_on_time)
    next_stop_at: datetime | None = None
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds spent in each step
    phases_cpu: dict[str, float] = field(default_factory=dict)  # process CPU seconds in each step
    phases_rss: dict[str, float] = field(default_factory=dict)  # peak RSS (MB) at each step's end
    _cpu_mark: float = field(default=0.0, repr=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall time to the phase, and the process CPU since the last phase ended
        (a phase inside another gets its own CPU; the outer one the rest)."""
        t = time.monotonic()
        try:
            yield
        finally:
            c = time.process_time()
            self.phases[name] = round(self.phases.get(name, 0.0) + time.monotonic() - t, 3)
            self.phases_cpu[name] = round(self.phases_cpu.get(name, 0.0) + c - self._cpu_mark, 3)
            self._cpu_mark = c
            # the process's peak so far: the step where it grows is the step that needs the memory
            self.phases_rss[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def count(self, rows: list[Row]) -> None:
        """Add finished rows to the counts (and to ``rows`` if kept)."""
        self.servers += len(rows)
        for r in rows:
            st = r.obs.state.value
            self.states[st] = self.states.get(st, 0) + 1
            d = r.decision
            if d.stop_at is not None and d.next_at == d.stop_at and d.stop_at > self.started_at and (
                    self.next_stop_at is None or d.stop_at < self.next_stop_at):
                self.next_stop_at = d.stop_at
            what = d.action.value + (f" ({r.outcome})" if r.outcome else "")
            entry = self.actions.get(what)
            if entry is None:
                self.actions[what] = [1, d.reason]
            else:
                entry[0] += 1
            if d.notice is not None and r.queued:
                for channel in d.channels or ("log",):
                    k = (channel, d.notice.value)
                    self.queued[k] = self.queued.get(k, 0) + 1
        if self.keep_rows:
            self.rows.extend(rows)

    def counted_stop(self, row: Row, outcome: StopOutcome, detail: str, reason: str) -> None:
        """Count and log one stop's outcome (as it happens), and say it on the row."""
        label = row.obs.server.label
        if outcome.done:
            self.stops += 1
            row.outcome = "stopped"
            log.info("%s stopped: %s", label, reason)
        elif outcome is StopOutcome.PENDING:
            self.stops_pending += 1
            row.outcome = "stop pending"
            log.info("%s stop pending at the hub (202); following up", label)
        elif outcome is StopOutcome.REFUSED:  # logged by Stops.refused (once per run as an error)
            self.stops_failed += 1
            row.outcome = f"stop refused by the hub: {detail}"
        else:
            self.stops_failed += 1
            row.outcome = f"stop failed: {detail}"
            log.error("%s stop FAILED: %s", label, detail)

    def counts(self) -> dict[str, int]:
        return dict(self.states)

    def summary(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "states": self.counts(),
            "probes": self.probes,
            "probes_status_only": self.probes_status_only,
            "companion_asks": self.companion_asks,
            "cpu_usage_calls": self.cpu_usage_calls,
            "notices": self.notices,
            "stops": self.stops,
            "stops_pending": self.stops_pending,
            "stops_failed": self.stops_failed,
            "safety_tripped": self.safety_tripped,
            "orphans": self.orphans,
            "dry_run": self.dry_run,
            "error": self.error,
            "phases": self.phases,
            "phases_cpu": self.phases_cpu,
            "phases_rss": self.phases_rss,
        }


Plan = tuple[HubServer, "Job | None", ResolvedRule, bool]  # a server, its batch job, its rule, whether to probe


@dataclass
class SweepRun:
    """One sweep's state, shared by its steps."""

    res: SweepResult
    now: datetime
    effects: Effects
    servers: list[HubServer] = field(default_factory=list)  # the listing (collect)
    keys: list[RunKey] = field(default_factory=list)  # their runs
    jobs: dict[str, Job] | None = None  # the hub's batch jobs by id; None when unknown
    could: set[RunKey] = field(default_factory=set)  # runs that could be stopped (a final notice settled)
    horizon: timedelta | None = None  # how idle a server must be before its look can change a decision
    stream: bool = False  # stops go out right after their look (the safety limits cannot trip)
    slot: asyncio.Semaphore | None = None  # the streamed stops' slots
    histories: dict[RunKey, History] = field(default_factory=dict)  # the current batch's
    notice_counts: dict[str, int] | None = None  # the daily cap's counts per user, read once
    held: list[Row] = field(default_factory=list)  # stops that did not stream: safety-checked, then done

    def history(self, server: HubServer) -> History:
        key = server.run_key()
        return (self.histories.get(key) if key else None) or History()


class Effects:
    """Everything a sweep changes: the store's sweep log, rows, notices and run ends, the outbox's
    deliveries, the stops and the orphans' cancels. The steps call these and nothing else that
    writes."""

    def __init__(self, sweeper: Sweeper) -> None:
        self.sw = sweeper

    @property
    def stops(self) -> Stops | None:
        """The stop procedure (None: nothing is stopped)."""
        return self.sw.stops

    async def begin(self, now: datetime) -> int | None:
        return await self.sw._db(self.sw.store.reports.start_sweep, now, dry_run=False)  # type: ignore[no-any-return]

    async def finish(self, sweep_id: int | None, res: SweepResult) -> None:
        if sweep_id is None:
            return
        try:
            await self.sw._db(self.sw.store.reports.finish_sweep, sweep_id, res.finished_at, res.ok, res.summary())
        except Exception as e:  # pragma: no cover - the store is down too
            log.error("could not record the end of the sweep: %s", e)

    async def record(self, run: SweepRun, rows: list[Row]) -> None:
        """A batch's observations, decisions and notices (the outbox), a few transactions per batch."""
        sw = self.sw
        if not rows:
            return
        recordable = [r for r in rows if r.obs.server.run_key() is not None]
        ids = await sw._db(sw.store.runs.record_many, [(r.obs, r.decision) for r in recordable], run.now,
                           jobs=run.jobs)  # the batch jobs: what each notice's server holds
        queued = {r.obs.server.run_key() for r, nid in zip(recordable, ids, strict=True) if nid is not None}
        del recordable, ids
        for r in rows:
            if r.decision.notice is not None:
                if r.obs.server.run_key() in queued:
                    run.res.notices += 1
                    r.queued = True
                    r.outcome = _shared(f"{r.decision.notice.value} queued")
                else:
                    r.outcome = _shared(f"{r.decision.notice.value} already queued")
        if sw.settings.slurm.walltime_notice is not None:
            await sw._walltime_notices(rows, run.now)
        lab = getattr(sw.notifier, "channels", {}).get("lab")
        if lab is not None:  # a spell that ended: its notice leaves the user's JupyterLab (reaper/notify/lab.py)
            await lab.spells_ended(rows, run.histories, run.now)

    async def note(self, kind: str, ok: bool, detail: str, now: datetime) -> None:
        """An action of the sweep itself (no run), e.g. the safety limit."""
        await self.sw._db(self.sw.store.reports.record_action, None, kind, ok, detail, now)

    async def end_runs(self, run: SweepRun) -> None:
        await self.sw._end_gone_runs(run)
        crashpoint("after-record")

    async def deliver(self, now: datetime, *, point: str | None = None) -> None:
        """The outbox's due notices; ``point`` names the crash point after it (reaper/faults.py)."""
        if self.sw.notifier is not None:
            try:
                await self.sw.notifier.drain(now)
            except Exception as e:
                log.error("notice delivery failed (will retry): %s", e)
        if point is not None:
            crashpoint(point)

    async def reconcile(self, guard: Guard, run: SweepRun) -> int:
        return len(await guard.reconcile(run.servers, run.jobs, run.now))


class DryEffects(Effects):
    """A dry run's effects: nothing is recorded, sent or stopped; the rows say what would be, and
    orphans are reported (logged), not cancelled."""

    @property
    def stops(self) -> Stops | None:
        return None

    async def begin(self, now: datetime) -> int | None:
        return None

    async def record(self, run: SweepRun, rows: list[Row]) -> None:
        for r in rows:
            if r.decision.notice is not None:
                r.outcome = f"would send {r.decision.notice.value}"
            if r.decision.action is Action.STOP:
                r.outcome = "would stop"

    async def note(self, kind: str, ok: bool, detail: str, now: datetime) -> None:
        return None

    async def end_runs(self, run: SweepRun) -> None:
        return None

    async def deliver(self, now: datetime, *, point: str | None = None) -> None:
        return None

    async def reconcile(self, guard: Guard, run: SweepRun) -> int:
        return len(await guard.reconcile(run.servers, run.jobs, run.now, dry_run=True))


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        store: StorePort,
        *,
        notifier: Notifier | None = None,
        stop_hook: Guard | None = None,
        clock: Callable[[], datetime] = utcnow,
        keep_rows: bool = True,
    ) -> None:
        self.settings = settings
        # Whether a (real) sweep's result keeps one row per server. The service does not: it
        # needs the counts, and 10,000 rows are memory a sweep need not hold. Dry runs always do.
        self.keep_rows = keep_rows
        self.hub = hub
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.stops = Stops(hub, store, stop_hook, clock=clock, concurrency=settings.safety.stop_concurrency)
        self._last_probed: dict[RunKey, datetime] = {}
        self._last_logged: dict[RunKey, tuple[str, str]] = {}
        self._target_known: set[RunKey] = set()  # runs whose address the route table had
        self._work_noted: dict[RunKey, set[tuple[str, str]]] = {}  # source outcomes logged, per run
        self._jobs: dict[str, Job] | None = None  # the batch jobs of the last sweep (for rule_for)
        self._lock = asyncio.Lock()
        self._rules_cache: tuple[Settings, list[ResolvedRule], ResolvedRule] | None = None
        self._pending_timeouts: list[tuple[RunKey | None, datetime, str | None]] = []

    @property
    def stop_hook(self) -> Guard | None:
        """The batch guard (None: no batch system): the stops' look after a stop, the orphans."""
        return self.stops.guard

    @stop_hook.setter
    def stop_hook(self, guard: Guard | None) -> None:
        self.stops.guard = guard

    @property
    def _intents(self) -> Any:
        """The streamed stops' group writer (benchmarks/run.py reports its batches)."""
        return self.stops._intents

    # ------------------------------------------------------------------ rules

    def _rules(self) -> tuple[list[ResolvedRule], ResolvedRule]:
        """The resolved rules of the current settings, resolved once per settings object (a reload
        brings a new one) instead of once per server."""
        s = self.settings
        cached = self._rules_cache
        if cached is None or cached[0] is not s:
            cached = self._rules_cache = (s, s.resolved_rules(), s.default_rule())
        return cached[1], cached[2]

    def rule_for(self, server: HubServer, job: Job | None = None) -> ResolvedRule:
        """The rule that governs ``server``, matched with its batch job (GPUs, partition) when
        known: the one lookup of the sweep and of the web page."""
        rules, default = self._rules()
        return select_rule(rules, default, server,
                           job_gpus=job.gpus if job is not None else None,
                           job_partition=job.partition if job is not None else None)

    def known_job(self, server: HubServer) -> Job | None:
        """The server's batch job as the last sweep's listing of the batch system had it."""
        jobs = self._jobs
        return jobs.get(server.job_id) if jobs is not None and server.job_id else None

    def _rule_for_key(self, key: RunKey) -> ResolvedRule:
        return self.rule_for(HubServer(user=key.user, name=key.server, started=key.started, last_activity=None))

    async def _db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    def _too_many(self, stops: int, running: int) -> bool:
        """Whether ``stops`` stops among ``running`` servers break the safety limits."""
        safety = self.settings.safety
        if stops > safety.max_stops_per_sweep:
            return True
        return running > safety.fraction_applies_above and stops > safety.max_stop_fraction * running

    # ------------------------------------------------------------------ the sweep

    async def run_once(self, *, dry_run: bool | None = None) -> SweepResult:
        if self._lock.locked():
            log.warning("a sweep is already running; skipping this one")
        async with self._lock:
            return await self._run(self.settings.dry_run if dry_run is None else dry_run)

    @property
    def running(self) -> bool:
        """Whether a sweep is running now."""
        return self._lock.locked()

    async def _run(self, dry_run: bool) -> SweepResult:
        now = self.clock()
        effects = DryEffects(self) if dry_run else Effects(self)
        res = SweepResult(started_at=now, dry_run=dry_run, keep_rows=dry_run or self.keep_rows)
        run = SweepRun(res, now, effects)
        sweep_id = None
        try:
            sweep_id = await effects.begin(now)
            await self._sweep(run)
            res.ok = True
        except Exception as e:  # the sweep fails cleanly; the next one starts afresh
            res.error = f"{type(e).__name__}: {e}"
            log.error("sweep failed, nothing more done this sweep: %s", res.error)
        res.finished_at = self.clock()
        await effects.finish(sweep_id, res)
        log.info(
            "sweep %s in %.1fs: %d servers %s, %d probed (%d by status alone), %d notices, %d stopped, %d pending, "
            "%d failed%s",
            "done" if res.ok else "FAILED", (res.finished_at - res.started_at).total_seconds(), res.servers,
            res.counts(), res.probes, res.probes_status_only, res.notices, res.stops, res.stops_pending,
            res.stops_failed, " (dry run)" if dry_run else "",
        )
        return res

    async def _sweep(self, run: SweepRun) -> None:
        """The steps, in order; each batch of the listing is looked at, limited and recorded
        before the next is read."""
        res = run.res
        res._cpu_mark = time.process_time()
        with res.phase("collect"):
            await self.collect(run)
        with res.phase("probe"):
            await self.find_addresses(run)
        for c in range(0, len(run.servers), BATCH):
            with res.phase("probe"):  # (with the streamed stops)
                rows = await self.look(run, run.servers[c : c + BATCH])
            with res.phase("record"):
                await self.limit(run, rows)
                done = self.hold(run, rows)
                await self.record(run, done)
            if any(r.stop is not None for r in done):
                with res.phase("stop.record"):
                    await self.record_streamed(done)
            res.count(done)
            del rows, done
        run.histories = {}
        with res.phase("record"):
            await self.safety(run)
            await self.record(run, run.held)
            await run.effects.end_runs(run)
        with res.phase("notify"):
            # a final notice must be delivered before its stop can come
            await run.effects.deliver(run.now, point="after-notify")
        await self.stop_held(run)
        await self.reconcile_orphans(run)
        await self.deliver_stopped(run)
        res.count(run.held)  # (counted last: stop_held gave them their outcomes)

    # ------------------------------------------------------------------ collect

    async def collect(self, run: SweepRun) -> None:
        """The whole listing or nothing (HubListingError propagates and ends the sweep), the hub's
        batch jobs, the runs that could be stopped, the rules; whether stops stream."""
        run.servers = await self.hub.list_active_servers()
        guard = self.stop_hook
        run.jobs = self._jobs = await guard.hub_jobs() if guard is not None else None
        run.keys = [k for k in (sv.run_key() for sv in run.servers) if k is not None]
        # The runs that could be stopped this sweep (policy.could_stop: a final notice settled),
        # asked of the store in one query; each batch reads its own histories for its look.
        run.could = await self._db(self.store.runs.could_stop_runs, run.keys) if run.keys else set()
        self._rules_cache = None  # the policy may have changed in place since the last sweep
        run.horizon = probe_horizon(*self._rules())
        # Streaming: a stop needs a final notice already settled (policy.could_stop). If even all
        # such runs stopping stays within the safety limits, the limits cannot trip this sweep, so
        # each stop goes out right after its batch's look (and look at the jobs' work), inside its
        # stop slot: the look is fresh when the hub is asked (else taken again), and a 10,000-server
        # reap keeps the hub busy from the first batch on instead of after the last one. (Only the runs counted here stream: one
        # whose final notice settled since is stopped, if at all, through the safety check.)
        run.stream = (run.effects.stops is not None and bool(run.could)
                      and not self._too_many(len(run.could), len(run.servers)))
        run.slot = asyncio.Semaphore(self.settings.safety.stop_concurrency)

    def _plan(self, run: SweepRun, server: HubServer) -> Plan:
        jobs = run.jobs
        job = jobs.get(server.job_id) if jobs is not None and server.job_id else None
        rule = self.rule_for(server, job)
        return server, job, rule, self._should_probe(server, rule, run.now, run.horizon)

    def _should_probe(self, server: HubServer, rule: ResolvedRule, now: datetime, horizon: timedelta | None) -> bool:
        s = self.settings
        if server.pending or not server.ready:
            return False
        if not s.probe.skip_fresh:
            return True
        if rule.exempt:
            return False
        key = server.run_key()
        last = self._last_probed.get(key) if key else None
        if last is None or now - last >= s.probe.reprobe_every:
            return True
        if rule.max_age is not None and server.started is not None:
            if server.started + rule.max_age - rule.min_notice <= now + s.sweep_every:
                return True
        if horizon is None:
            return False
        # Probe one sweep early so a warning is not a whole sweep late.
        return needs_probe(server, now, max(horizon - s.sweep_every, timedelta(0)))

    async def find_addresses(self, run: SweepRun) -> None:
        """Fetch the proxy's route table only when a server about to be probed has no address of
        its own (spawner state) and none known for its current run: on a big hub the table costs
        one request per 200 routes, and the hub rebuilds the whole table for each of them."""
        if self.settings.probe.via != "direct":
            return
        needed = [p[0] for p in (self._plan(run, sv) for sv in run.servers if self._needs_address(sv)) if p[3]]
        if not needed:
            return
        await self.hub.refresh_targets()
        # Remember only the addresses the fresh table really has: a failed fetch (the hub down)
        # must be tried again next sweep, not taken as "known".
        for sv in needed:
            key = sv.run_key()
            if key is not None and await self.hub.target_for(sv):
                self._target_known.add(key)

    def _needs_address(self, sv: HubServer) -> bool:
        """No address of its own (spawner state) and none known for its current run."""
        return not sv.target and not (sv.state or {}).get("server_url") and sv.run_key() not in self._target_known

    # ------------------------------------------------------------------ look, decide

    async def look(self, run: SweepRun, part: list[HubServer]) -> list[Row]:
        """One batch: its histories read, each server looked at and decided (a bounded pool of
        workers, not one task per server: 10,000 parked tasks cost ~30 MB), then the look at the
        job's work for the servers whose decision it can change (:meth:`work`), then the streamed
        stops."""
        plans = [self._plan(run, sv) for sv in part]
        run.histories = await self._db(self.store.runs.histories,
                                       [k for k in (p[0].run_key() for p in plans) if k is not None])
        s = self.settings
        rows: list[Row] = await bounded_map(self._look_and_decide, [(run, *p) for p in plans],
                                            s.probe.concurrency + s.safety.stop_concurrency)
        await self.work(run, rows)
        if run.stream:
            await self.stop_streamed(run, rows)
            await self._record_pending_timeouts(run.now)
        return rows

    async def _look_and_decide(self, run: SweepRun, server: HubServer, job: Job | None, rule: ResolvedRule,
                               should: bool) -> Row:
        row = self.decide(run, rule, *await self.observe(run, server, job, should))
        row.looked_at = self.clock()
        return row

    async def stop_streamed(self, run: SweepRun, rows: list[Row]) -> None:
        """The batch's stops of runs that could stop (collect), each in a stop slot, right after
        the batch's look: a look older than a minute by then is taken again first (_recheck)."""
        todo = [r for r in rows if r.decision.action is Action.STOP and r.obs.server.run_key() in run.could]
        if todo:
            await asyncio.gather(*(self._stop_in_slot(run, r) for r in todo))

    async def _stop_in_slot(self, run: SweepRun, row: Row) -> None:
        assert run.slot is not None
        async with run.slot:
            if row.looked_at is not None and self.clock() - row.looked_at > timedelta(seconds=60):
                row.streamed = True  # (decided here, either way: not a held stop)
                checked = await self._recheck(row, run.res.started_at, run.histories)
                if checked is None:
                    row.outcome = "gone before the stop"
                    return
                row.obs, row.decision = checked
                if row.decision.action is not Action.STOP:
                    row.outcome = "not stopped: activity on re-check"
                    return
            await self._stop_streamed(run, row)

    # ------------------------------------------------------------------ work (what the job runs)

    def wants_work(self, run: SweepRun, row: Row) -> bool:
        """Whether the look at the job's work can change this row's decision: a notice or a stop
        for its idle spell (not max_age's), under ``working: protect``; or the server was working
        at its last look (to see when it ends). A busy kernel or a fresh hub activity decides
        without it."""
        o, d, rule = row.obs, row.decision, row.rule
        if not (self.settings.probe.companion or self.stop_hook is not None):
            return False
        if rule.exempt or rule.working != "protect" or not o.probed:
            return False
        if o.state in (State.PENDING, State.COMPUTING, State.WORKING):
            return False
        if d.action in (Action.WARN, Action.REMIND, Action.FINAL, Action.STOP) and d.spell is not None:
            return True
        return run.history(o.server).last_state == State.WORKING.value

    async def work(self, run: SweepRun, rows: list[Row]) -> None:
        """The look at what the jobs of this batch run, for the rows it can change (wants_work):
        the batch accounting in ONE call for all their jobs, the companion once per server (at
        most probe.concurrency at once), both at once; then each is classified again
        (activity.classify_work) and decided again. A source that fails or is absent shows
        nothing (logged once per server run): it never makes a server look idle."""
        todo = [r for r in rows if self.wants_work(run, r)]
        if not todo:
            return
        s, res = self.settings, run.res
        with res.phase("work"):
            usage, batch_error = await self._cpu_usage(run, todo)
            asked = [r for r in todo if s.probe.companion and r.obs.state is not State.UNREACHABLE]
            answers = await bounded_map(self.hub.activity, [(r.obs.server,) for r in asked], s.probe.concurrency)
            res.companion_asks += len(asked)
            by_row = {id(r): a for r, a in zip(asked, answers, strict=True)}
            for r in todo:
                companion = by_row.get(id(r)) or Work(
                    companion="off" if not s.probe.companion else "not asked (server not reachable)")
                work = self._work_of(run, r.obs, companion, usage, batch_error)
                self._note_sources(r.obs.server, work)
                hist = run.history(r.obs.server)
                obs = classify_work(r.obs, work, hist, run.now, working_cpu=s.probe.working_cpu,
                                    protect_idle=s.working.protect_idle)
                r.obs, r.decision = obs, decide(obs, hist, r.rule, run.now, s.tz)
                r.looked_at = self.clock()

    async def _cpu_usage(self, run: SweepRun, todo: list[Row]) -> tuple[dict[str, float], str | None]:
        """The batch accounting of these rows' jobs, in one call: (CPU seconds by job id, None), or
        ({}, why not)."""
        guard = self.stop_hook
        if guard is None:
            return {}, "absent"
        ids = sorted({r.obs.job_id for r in todo if r.obs.job_id})
        if not ids:
            return {}, None
        run.res.cpu_usage_calls += 1
        try:
            return dict(await guard.cpu_usage(ids)), None
        except Exception as e:  # BatchError, or a guard without accounting: unknown, never idle
            why = f"failed ({type(e).__name__}: {e})"
            log.warning("batch accounting for %d job(s) %s: their CPU is unknown this sweep, "
                        "nothing is taken as idle for it", len(ids), why)
            return {}, why

    @staticmethod
    def _work_of(run: SweepRun, obs: Observation, companion: Work, usage: dict[str, float],
                 batch_error: str | None) -> Work:
        """The companion's report and the job's CPU of one server, as one Work."""
        job_id = obs.job_id
        programs = companion.programs
        if batch_error is not None:
            batch = batch_error
        elif job_id is None:
            batch = "absent"
        elif job_id not in usage:
            batch = f"no figure for job {job_id}"
        else:
            batch = "ok"
            job = run.jobs.get(job_id) if run.jobs is not None else None
            started = job.start if job is not None and job.start is not None else obs.server.started
            programs = (*programs, Program(name="job", where=Where.JOB, source=job_id, cpu_seconds=usage[job_id],
                                           started=started))
        return Work(programs=programs, companion=companion.companion, batch=batch)

    def _note_sources(self, server: HubServer, work: Work) -> None:
        """One log line per server run and source outcome that is not "ok": a server without the
        companion (404) is told once at INFO, a failure once at WARNING."""
        key = server.run_key()
        noted = self._work_noted.setdefault(key, set()) if key is not None else set()
        for source, outcome in (("companion", work.companion), ("batch accounting", work.batch)):
            if outcome in ("ok", "off") or outcome.startswith("not asked") or (source, outcome) in noted:
                continue
            noted.add((source, outcome))
            if outcome == "absent":
                if source == "companion":
                    log.info("%s: no companion extension in the server (404): the batch accounting alone tells "
                             "whether a program runs", server.label)
                continue
            if outcome.startswith("failed") and source == "batch accounting":
                continue  # the call's failure is logged once for the sweep (_cpu_usage)
            log.warning("%s: %s: %s; never taken as idle, the other sources decide", server.label, source, outcome)

    async def observe(self, run: SweepRun, server: HubServer, job: Job | None,
                      should: bool) -> tuple[Observation, Probe | None]:
        """The look at one server: probed if it should be (by /api/status alone when it was
        detached at its last look and nothing happened since), classified, its spell continued."""
        s, now, res = self.settings, run.now, run.res
        probe: Probe | None = None
        obs: Observation | None = None
        hist = run.history(server)
        if should:
            if s.probe.confirm_with_status and hist.last_state == State.DETACHED.value:
                # detached at the last look: one /api/status request tells whether anything
                # happened since (a failed one is the failed probe a full probe would give)
                probe = await self.hub.probe_status(server)
                if probe.ok:
                    obs = confirm_detached(server, probe, hist, now, fresh_within=s.probe.attached_within)
                    if obs is None:  # something happened: the full look, without asking the status again
                        probe = await self.hub.probe(server, status=probe)
                    else:
                        res.probes_status_only += 1
            else:
                probe = await self.hub.probe(server)
            res.probes += 1
            key = server.run_key()
            if key is not None and probe.ok:
                self._last_probed[key] = now
        if obs is None:
            obs = classify(server, probe, now, fresh_within=s.probe.attached_within)
        if job is not None:
            obs = replace(obs, job_end=job.end)
        return continue_spell(obs, hist), probe

    def decide(self, run: SweepRun, rule: ResolvedRule, obs: Observation, probe: Probe | None) -> Row:
        """The policy's decision on one observation, as the server's row."""
        dec = decide(obs, run.history(obs.server), rule, run.now, self.settings.tz)
        return Row(obs, dec, rule, answered_started=probe.status_started if probe is not None else None)

    # ------------------------------------------------------------------ limit, safety, record

    async def limit(self, run: SweepRun, rows: list[Row]) -> None:
        """Quiet hours and the per-user daily cap postpone warnings and reminders (core.notices).
        The per-user counts are read from the store once per sweep, before it recorded any
        notice, and carried from one batch to the next."""
        n = self.settings.notify
        soft = [r for r in rows if r.decision.notice in SOFT]
        if not soft:
            return
        if run.notice_counts is None:
            run.notice_counts = {}
            if n.max_notices_per_day is not None:
                recent = await self._db(self.store.reports.recent_notices, run.now - timedelta(days=1), 100_000)
                run.notice_counts = soft_notice_counts((n.user, n.kind) for n in recent)
        quiet_until = quiet_hours_end(n.quiet_hours, run.now, self.settings.tz) if n.quiet_hours else None
        decisions, run.notice_counts = limit_notices(
            [(r.obs.server.user, r.decision) for r in soft], run.notice_counts,
            cap=n.max_notices_per_day, quiet_until=quiet_until, tz=self.settings.tz,
        )
        for r, d in zip(soft, decisions, strict=True):
            r.decision = d

    @staticmethod
    def hold(run: SweepRun, rows: list[Row]) -> list[Row]:
        """Keep back the stops that did not stream (for the safety check); the rest are done."""
        done = []
        for r in rows:
            (run.held if r.decision.action is Action.STOP and not r.streamed else done).append(r)
        return done

    async def safety(self, run: SweepRun) -> None:
        """Too many stops at once means something is wrong upstream: stop none, and alert.
        (A streamed sweep's stops are already done: it streamed because they could not trip it.)"""
        s, held, running = self.settings.safety, run.held, len(run.servers)
        if not held or not self._too_many(len(held), running):
            return
        run.res.safety_tripped = True
        run.res.held = len(held)
        msg = (
            f"SAFETY LIMIT: this sweep would stop {len(held)} of {running} servers "
            f"(limits: {s.max_stops_per_sweep} per sweep, {s.max_stop_fraction:.0%} of running servers); "
            "stopping none. Check the hub and the policy, then raise safety.max_stops_per_sweep if intended."
        )
        log.error(msg)
        for r in held:
            r.decision = replace(r.decision, action=Action.OK, reason=f"{r.decision.reason} [held: safety limit]")
        await run.effects.note("safety-limit", False, msg, run.now)

    async def record(self, run: SweepRun, rows: list[Row]) -> None:
        """Log the rows' decisions and record them (observations, decisions, notices)."""
        for r in rows:
            self._log_decision(r)
        await run.effects.record(run, rows)

    def _log_decision(self, r: Row) -> None:
        """One INFO line per decision that does something, and per change of state or action."""
        key = r.obs.server.run_key()
        seen = _shared((r.obs.state.value, r.decision.action.value))
        changed = key is not None and self._last_logged.get(key) != seen
        if key is not None:
            self._last_logged[key] = seen
        acting = r.decision.action not in (Action.OK, Action.EXEMPT)
        level = logging.INFO if acting or changed else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s %s: %s%s -> %s: %s", r.obs.server.user, r.obs.server.name or "(default)",
                    r.obs.state.value, f" job {r.obs.job_id}" if r.obs.job_id else "",
                    r.decision.action.value, r.decision.reason)

    async def _walltime_notices(self, rows: list[Row], now: datetime) -> None:
        """Tell users their server will end at its walltime (once per run)."""
        lead = self.settings.slurm.walltime_notice
        assert lead is not None
        for r in rows:
            end = r.obs.job_end
            key = r.obs.server.run_key()
            if end is None or key is None or r.rule.exempt or r.obs.state is State.PENDING:
                continue
            if now < end <= now + lead:
                nid = await self._db(self.store.outbox.add_notice, key, NoticeKind.WALLTIME, None, now,
                                     channels=list(r.rule.channels), context=notice_context(r.obs, r.decision, now, self.known_job(r.obs.server)))
                if nid is not None:
                    log.info("%s: walltime ends at %s: notice queued", r.obs.server.label, end.isoformat())

    async def _end_gone_runs(self, run: SweepRun) -> None:
        """Servers the hub no longer lists: their runs have ended. One whose stop we asked for and
        then lost track of (a crash, a 202 that completed later) is recorded as stopped, and its
        user still hears of it (idempotent)."""
        now, current = run.now, set(run.keys)
        gone = [k for k in await self._db(self.store.runs.open_runs) if k not in current]
        del current
        gone_hist = await self._db(self.store.runs.histories, gone) if gone else {}
        for k in gone:
            h = gone_hist.get(k)
            if h is not None and h.stop_requested_at is not None:
                await self._db(
                    self.store.outbox.add_notice, k, NoticeKind.STOPPED, None, now,
                    channels=list(self._rule_for_key(k).channels),
                    context=NoticeContext(user=k.user, server=k.server, started=k.started, state="detached",
                                          reason="stopped by the reaper after the notices",
                                          stopped_at=h.stop_requested_at),
                )
                await self._db(self.store.runs.end_run, k, now, "stopped by the reaper")
                await self._db(self.store.reports.record_action, k, "stop", True,
                               f"stop asked at {h.stop_requested_at.isoformat()}; the hub no longer lists "
                               "the server: stopped", now)
            else:
                await self._db(self.store.runs.end_run, k, now, "no longer running on the hub")
            self._last_probed.pop(k, None)
            self._last_logged.pop(k, None)
            self._target_known.discard(k)
            self._work_noted.pop(k, None)

    # ------------------------------------------------------------------ stops

    async def _stop_streamed(self, run: SweepRun, row: Row) -> None:
        """Stop one server right after the look that decided it (the caller holds its stop slot):
        the intent is made durable first, then the hub is asked. The hub's answer is kept on the
        row and recorded with its batch's rows, after the batch's look (if the reaper dies before
        that, the durable intent lets the next sweep finish: the run ends and its notice goes out)."""
        stops, res = run.effects.stops, run.res
        assert stops is not None
        row.streamed = True
        server = row.obs.server
        key = server.run_key()
        assert key is not None
        if self._asked_already(row, run.history(server), self.clock()):
            return
        began = row.answered_started
        # the server that just answered was running a minute before the listing (clock skew margin)
        predates = began is not None and began + timedelta(seconds=60) <= res.started_at
        if self.clock() - res.started_at > timedelta(seconds=60) and not predates:
            # the listing is old by now: make sure this is still the run that was decided on
            fresh = await self.hub.get_server(server.user, server.name)
            if fresh is None or fresh.started != server.started:
                row.outcome = "gone before the stop"
                return
        try:
            await stops.intend(key)
        except Exception as e:  # never stop what we could not remember asking for
            row.outcome = f"not stopped: the intent could not be recorded ({e})"
            log.error("%s: not stopped, the store did not take the intent: %s", server.label, e)
            return
        row.stop = await stops.ask(server)
        res.counted_stop(row, row.stop.outcome, row.stop.detail, row.decision.reason)

    async def record_streamed(self, rows: list[Row]) -> None:
        """Record a batch's streamed stops (with their "stopped" notices) in slices, then the batch
        guard's look after each."""
        streamed = [r for r in rows if r.stop is not None]
        for c in range(0, len(streamed), 100):  # (each record holds its notice's context)
            await self.stops.record([self._stop_record(r, r.obs, r.decision, r.stop)  # type: ignore[arg-type]
                                     for r in streamed[c : c + 100]])
        crashpoint("after-stop")
        await asyncio.gather(*(self.stops.after(r.obs.server, r.stop.outcome) for r in streamed))  # type: ignore[union-attr]

    def _stop_record(self, row: Row, obs: Observation, dec: Decision, asked: Asked) -> Any:
        """One stop's record for the store (with the "stopped" notice's context when it stopped)."""
        key = row.obs.server.run_key()
        assert key is not None
        done = asked.outcome.done
        return stop_record(key, asked, dec.reason, job_id=row.obs.server.job_id, end_reason="stopped by the reaper",
                           notice_context=stopped_context(obs, dec, asked.at, self.known_job(obs.server)) if done else None,
                           channels=tuple(row.rule.channels))

    async def stop_held(self, run: SweepRun) -> None:
        """The stops that did not stream, unless the safety limits held them: re-checked right
        before, the intents recorded, issued concurrently, the outcomes recorded; a few
        transactions in all, not a few per server, and never a stop without a fresh look first."""
        stops, res = run.effects.stops, run.res
        todo = [r for r in run.held if r.decision.action is Action.STOP]
        if stops is None or res.safety_tripped:
            return
        with res.phase("stop"):
            if todo:
                await self._stop_many(run, stops, todo)

    async def _stop_many(self, run: SweepRun, stops: Stops, todo: list[Row]) -> None:
        res = run.res
        hist = await self._db(self.store.runs.histories, [k for k in (r.obs.server.run_key() for r in todo) if k])
        now = self.clock()
        todo = [r for r in todo if not self._asked_already(r, hist.get(r.obs.server.run_key()), now)]  # type: ignore[arg-type]
        await self._record_pending_timeouts(now)
        with res.phase("stop.recheck"):
            checked = await asyncio.gather(*(self._recheck(r, res.started_at, hist) for r in todo))
        go: list[tuple[Row, Observation, Decision]] = []
        for row, c in zip(todo, checked, strict=True):
            if c is None:
                row.outcome = "gone before the stop"
                continue
            obs, dec = c
            if dec.action is not Action.STOP:
                row.obs, row.decision = obs, dec
                row.outcome = "not stopped: activity on re-check"
                log.info("%s: not stopped after all, re-check says %s: %s", obs.server.label, obs.state.value,
                         dec.reason)
                await self._db(self.store.runs.record, obs, dec, self.clock())
                continue
            go.append((row, obs, dec))
        if not go:
            return
        with res.phase("stop.hub"):
            # The intent first: if we die after the hub stopped a server, the next sweep still knows.
            await stops.intend_many(r.obs.server.run_key() for r, _, _ in go)  # type: ignore[misc]
            answers = await asyncio.gather(*(stops.ask(r.obs.server) for r, _, _ in go))
        with res.phase("stop.record"):
            for (row, _, dec), asked in zip(go, answers, strict=True):
                res.counted_stop(row, asked.outcome, asked.detail, dec.reason)
            await stops.record([self._stop_record(row, obs, dec, asked)
                                for (row, obs, dec), asked in zip(go, answers, strict=True)])
            crashpoint("after-stop")
        await asyncio.gather(*(stops.after(row.obs.server, asked.outcome)
                               for (row, _, _), asked in zip(go, answers, strict=True)))

    async def _recheck(
        self, row: Row, listed_at: datetime, hist: dict[RunKey, History] | None = None
    ) -> tuple[Observation, Decision] | None:
        """Look again right before the stop and decide again. None if it is gone or restarted.

        If the listing is recent, one ``/api/status`` request tells whether anything happened since
        the sweep's probe (its last_activity counts kernels, terminals and browsers); only then is
        the server fetched and probed in full. A listing older than a minute is fetched again."""
        server = row.obs.server
        now = self.clock()
        if now - listed_at > timedelta(seconds=60):
            fresh = await self.hub.get_server(server.user, server.name)
            if fresh is None or fresh.started != server.started:
                return None
            if not fresh.target and server.target:
                fresh = replace(fresh, target=server.target)
        else:
            fresh = server
            if row.obs.probed:
                st = await self.hub.probe_status(server)
                unchanged = (
                    st.ok
                    and st.status_connections == 0
                    and not row.obs.browser_connected
                    and st.status_kernels == row.obs.kernels
                    and st.status_last_activity is not None
                    and row.obs.last_activity is not None
                    and st.status_last_activity <= row.obs.last_activity
                )
                if unchanged:
                    h = await self._history(server.run_key(), hist)
                    obs = replace(row.obs, at=now)
                    return obs, decide(obs, h, row.rule, now, self.settings.tz)
        probe = await self.hub.probe(fresh)
        obs = classify(fresh, probe, now, fresh_within=self.settings.probe.attached_within)
        h = await self._history(fresh.run_key(), hist)
        return obs, decide(obs, h, row.rule, now, self.settings.tz)

    async def _history(self, key: RunKey | None, prefetched: dict[RunKey, History] | None) -> History:
        if key is None:
            return History()
        if prefetched is not None and key in prefetched:
            return prefetched[key]
        return (await self._db(self.store.runs.histories, [key])).get(key) or History()

    def _asked_already(self, row: Row, h: History | None, now: datetime) -> bool:
        """A stop the hub accepted (202) but has not finished is not asked again every sweep: True
        (and the row says so) while it waits. Once safety.pending_stop_timeout has passed, it is
        reported and asked once more (False)."""
        asked = h.stop_requested_at if h is not None else None
        if asked is None:
            return False
        timeout = self.settings.safety.pending_stop_timeout
        if now - asked < timeout:
            row.outcome = f"stop pending since {asked.astimezone(self.settings.tz):%H:%M}"
            return True
        log.error("%s: stop pending since %s, longer than safety.pending_stop_timeout (%s): "
                  "asking the hub again; check the spawner", row.obs.server.label, asked.isoformat(), timeout)
        self._pending_timeouts.append((row.obs.server.run_key(), asked, row.obs.server.job_id))
        return False

    async def _record_pending_timeouts(self, now: datetime) -> None:
        items, self._pending_timeouts = self._pending_timeouts, []
        for key, asked, job_id in items:
            await self._db(self.store.reports.record_action, key, "stop-pending-timeout", False,
                           f"stop pending since {asked.isoformat()}", now, job_id=job_id)

    # ------------------------------------------------------------------ orphans

    async def reconcile_orphans(self, run: SweepRun) -> None:
        """Batch jobs of the hub that no running server owns: the guard reports them, and a real
        sweep cancels them (a dry run only reports)."""
        guard, res = self.stop_hook, run.res
        if guard is None or res.safety_tripped:
            return
        with res.phase("orphans"):
            res.orphans = await run.effects.reconcile(guard, run)

    async def deliver_stopped(self, run: SweepRun) -> None:
        """"We stopped your server" and the orphans' notices go out right away, not at the next
        sweep."""
        res = run.res
        if not res.safety_tripped and (res.stops or res.orphans):
            with res.phase("notify"):
                await run.effects.deliver(self.clock())


BATCH = 1000  # servers looked at, recorded and let go together (see Sweeper._sweep)


_SHARED: dict[Any, Any] = {}


def _shared(value: Any) -> Any:
    """One object per distinct value ("final queued", ("detached", "stop") ...), not one per
    server: the sweeper keeps such a value for every server of the hub."""
    return _SHARED.setdefault(value, value)


async def bounded_map(fn: Callable[..., Any], items: list[tuple[Any, ...]], workers: int) -> list[Any]:
    """``[await fn(*item) for item in items]`` run by at most ``workers`` tasks at once, in order.
    The first exception propagates (as with asyncio.gather)."""
    out: list[Any] = [None] * len(items)
    todo = iter(enumerate(items))

    async def worker() -> None:
        for i, item in todo:  # one shared iterator: each worker takes the next item
            out[i] = await fn(*item)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(items))))))
    return out


def stopped_context(obs: Observation, dec: Decision, now: datetime, job: Job | None = None) -> NoticeContext:
    """The context of a "we stopped your server" notice: the observation and decision that led to
    the stop, plus when it ran and what it held (its batch job's, when known)."""
    reclaimed = reclaimed_words(obs, now, job) if obs.server.started is not None else None
    return replace(notice_context(obs, dec, now, job), stopped_at=now, reclaimed=reclaimed)


def reclaimed_words(obs: Observation, now: datetime, job: Job | None = None) -> str:
    """What the stop gave back, in words: "4 CPUs, 1 GPU, 16 GB (job 42; 5h20m before its walltime)",
    from the spawner's user_options in any shape reaper.units reads (ours, batchspawner's,
    slurmformspawner's)."""
    asked = read_user_options(obs.server.user_options)
    cpus, gpus, mem = (job.cpus or asked.cpus, job.gpus or asked.gpus, job.mem_mb or asked.mem_mb) if job \
        else (asked.cpus, asked.gpus, asked.mem_mb)
    parts = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in ((cpus, "CPU"), (gpus, "GPU")) if n]
    if mem:
        parts.append(format_memory(mem))
    what = ", ".join(parts) if parts else "its CPUs and memory"
    extra = []
    if obs.job_id:
        extra.append(f"job {obs.job_id}")
    if obs.job_end is not None and obs.job_end > now:
        extra.append(f"{humanize(obs.job_end - now)} before its walltime")
    return what + (f" ({'; '.join(extra)})" if extra else "")


def format_table(res: SweepResult, tz: Any, now: datetime | None = None) -> str:
    """The dry-run table: one line per server with state, idle time, job, action and reason."""
    now = now or res.started_at
    header = ("USER", "SERVER", "STATE", "IDLE", "JOB", "ACTION", "REASON")
    lines = []
    for r in sorted(res.rows, key=lambda r: (r.obs.server.user, r.obs.server.name)):
        o = r.obs
        since = r.decision.spell or o.idle_since  # (the spell starts no earlier than the last working look)
        idle = humanize(now - since) if since and o.state not in (State.COMPUTING, State.WORKING) else "-"
        action = r.decision.action.value
        if r.outcome:
            action += f" ({r.outcome})"
        lines.append((o.server.user, o.server.name or "-", o.state.value, idle, o.job_id or "-", action,
                      r.decision.reason))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = 0
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    verdict = "ok" if res.ok else f"FAILED: {res.error}"
    out.append(
        f"-- {len(res.rows)} servers {res.counts()}; {res.probes} probed"
        + (f" ({res.probes_status_only} by status alone)" if res.probes_status_only else "")
        + (f"; {res.orphans} orphan batch job(s){' (not cancelled)' if res.dry_run else ''}" if res.orphans else "")
        + f"; sweep {verdict}"
        + ("; dry run: nothing was changed" if res.dry_run else "")
    )
    return "\n".join(out)



