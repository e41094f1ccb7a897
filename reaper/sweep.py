"""One sweep: collect -> probe -> classify -> decide -> act -> record.

The imperative shell around the pure core (activity.classify, policy.decide). Outside systems come
in as objects: the hub client, the store, the notifier (outbox), and optionally a batch system.

The listing is read whole; then the servers go through in batches of ``BATCH``: a batch's
histories are read, its servers looked at (and its streamed stops issued), its notices limited, and
its rows recorded, before the next batch is read. A sweep so holds the listing and one batch, not
a row and a history per server of the hub (the service's sweeper keeps only the counts).

Never harm on doubt:
* a failed or partial listing ends the sweep before anything is decided or done;
* a failed probe makes a server ``unreachable`` (hub data only), never idle;
* a stop follows a fresh look: streamed, the look that decided it is taken inside its stop slot
  (and an old listing is checked against the hub); otherwise it is probed again, re-classified
  and re-decided right before it is stopped;
* a stop's intent is durable before the hub is asked, so a crash never loses a stop;
* a sweep that would stop more servers than the safety limits stops none and alerts;
* ``dry_run`` decides and reports, and changes nothing (not even the store).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from .config import ResolvedRule, Settings
from .core.activity import classify, confirm_detached, continue_spell, needs_probe
from .core.model import (
    Action,
    Decision,
    History,
    HubServer,
    NoticeKind,
    Observation,
    Probe,
    RunKey,
    State,
    humanize,
)
from .core.policy import decide, probe_horizon, select_rule
from .faults import crashpoint
from .groupcommit import GroupWriter

if TYPE_CHECKING:
    from .store import NoticeContext

log = logging.getLogger("reaper.sweep")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Notifier(Protocol):
    async def drain(self, now: datetime) -> int: ...


class StopHook(Protocol):
    """Called after the hub stopped (or failed to stop) a server: the batch-system guard."""

    async def after_stop(self, server: HubServer, outcome: str, now: datetime) -> None: ...


@dataclass(slots=True)
class Row:
    obs: Observation
    decision: Decision
    rule: ResolvedRule
    outcome: str = ""  # what was done: "stopped", "stop pending", "notice queued", "would stop" ...
    streamed: bool = False  # its stop went out during the sweep's look (see Sweeper._stop_streamed)
    stop: tuple[Any, datetime] | None = None  # a streamed stop's hub answer and time, recorded in step 8
    answered_started: datetime | None = None  # /api/status "started" of the server that answered


@dataclass
class SweepResult:
    started_at: datetime
    finished_at: datetime | None = None
    ok: bool = False
    dry_run: bool = False
    error: str | None = None
    rows: list[Row] = field(default_factory=list)  # kept for dry runs and when the Sweeper keeps rows
    servers: int = 0
    states: dict[str, int] = field(default_factory=dict)  # servers by state
    actions: dict[str, list[Any]] = field(default_factory=dict)  # "action (outcome)" -> [count, a reason]
    queued: dict[tuple[str, str], int] = field(default_factory=dict)  # (channel, notice kind) -> notices queued
    held: int = 0  # stops held back by the safety limits
    probes: int = 0
    probes_status_only: int = 0  # looks answered by /api/status alone (probe.confirm_with_status)
    notices: int = 0
    stops: int = 0
    stops_pending: int = 0
    stops_failed: int = 0
    safety_tripped: bool = False
    orphans: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds spent in each step
    phases_cpu: dict[str, float] = field(default_factory=dict)  # process CPU seconds in each step
    phases_rss: dict[str, float] = field(default_factory=dict)  # peak RSS (MB) at each step's end
    _cpu_mark: float = field(default=0.0, repr=False)

    def phase(self, name: str, since: float) -> float:
        """Add the time since ``since`` (time.monotonic()) to the phase, and the process CPU since
        the last phase ended; returns the new start. Phases that overlap share their CPU."""
        t, c = time.monotonic(), time.process_time()
        self.phases[name] = round(self.phases.get(name, 0.0) + t - since, 3)
        if self._cpu_mark:
            self.phases_cpu[name] = round(self.phases_cpu.get(name, 0.0) + c - self._cpu_mark, 3)
        self._cpu_mark = c
        # the process's peak so far: the step where it grows is the step that needs the memory
        self.phases_rss[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return t

    def count(self, rows: list[Row], keep: bool) -> None:
        """Add finished rows to the counts (and to ``rows`` if kept)."""
        self.servers += len(rows)
        for r in rows:
            st = r.obs.state.value
            self.states[st] = self.states.get(st, 0) + 1
            d = r.decision
            what = d.action.value + (f" ({r.outcome})" if r.outcome else "")
            entry = self.actions.get(what)
            if entry is None:
                self.actions[what] = [1, d.reason]
            else:
                entry[0] += 1
            if d.notice is not None and r.outcome.endswith(" queued") and "already" not in r.outcome:
                for channel in d.channels or ("log",):
                    k = (channel, d.notice.value)
                    self.queued[k] = self.queued.get(k, 0) + 1
        if keep:
            self.rows.extend(rows)

    def counts(self) -> dict[str, int]:
        return dict(self.states)

    def summary(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "states": self.counts(),
            "probes": self.probes,
            "probes_status_only": self.probes_status_only,
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


class Sweeper:
    def __init__(
        self,
        settings: Settings,
        hub: Any,
        store: Any,
        *,
        notifier: Notifier | None = None,
        stop_hook: StopHook | None = None,
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
        self.stop_hook = stop_hook
        self.clock = clock
        self._last_probed: dict[RunKey, datetime] = {}
        self._last_logged: dict[RunKey, tuple[str, str]] = {}
        self._target_known: set[RunKey] = set()  # runs whose address the route table had
        self._lock = asyncio.Lock()
        self._rules_cache: tuple[Settings, list[ResolvedRule], ResolvedRule] | None = None
        self._after_sem = asyncio.Semaphore(settings.safety.stop_concurrency)
        self._pending_timeouts: list[tuple[RunKey | None, datetime, str | None]] = []
        # A streamed sweep's stop intents, group-committed (see groupcommit.py): stops are paced
        # by the hub, so a batch lingers 50 ms for company instead of one transaction per stop.
        self._intents: GroupWriter[tuple[RunKey, datetime]] = GroupWriter(self._write_intents, linger=0.05)

    def _write_intents(self, items: Any) -> None:
        self.store.runs.mark_stops_requested([k for k, _ in items], max(t for _, t in items))

    # ------------------------------------------------------------------ helpers

    def _rule_for_key(self, key: RunKey) -> ResolvedRule:
        return self._rule(HubServer(user=key.user, name=key.server, started=key.started, last_activity=None))

    def _rules(self) -> tuple[list[ResolvedRule], ResolvedRule]:
        """The resolved rules of the current settings, resolved once per settings object (a reload
        brings a new one) instead of once per server."""
        s = self.settings
        cached = self._rules_cache
        if cached is None or cached[0] is not s:
            cached = self._rules_cache = (s, s.resolved_rules(), s.default_rule())
        return cached[1], cached[2]

    def _rule(self, server: HubServer, job: Any = None) -> ResolvedRule:
        rules, default = self._rules()
        return select_rule(
            rules, default, server,
            job_gpus=getattr(job, "gpus", None), job_partition=getattr(job, "partition", None),
        )

    async def _db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

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

    async def _ensure_targets(self, to_probe: list[HubServer]) -> None:
        """Fetch the proxy's route table only when a server about to be probed has no address of
        its own (spawner state) and none known for its current run: on a big hub the table costs
        one request per 200 routes, and the hub rebuilds the whole table for each of them."""
        if self.settings.probe.via != "direct" or not hasattr(self.hub, "refresh_targets"):
            return
        needed = [sv for sv in to_probe if self._needs_address(sv)]
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

    async def _probe(self, server: HubServer, *, status: Probe | None = None) -> Probe:
        return await self.hub.probe(server, status=status)

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

    async def _run(self, dry_run: bool) -> SweepResult:
        now = self.clock()
        res = SweepResult(started_at=now, dry_run=dry_run)
        sweep_id = None
        try:
            if not dry_run:
                sweep_id = await self._db(self.store.reports.start_sweep, now, dry_run=dry_run)
            await self._sweep(res, now, dry_run)
            res.ok = True
        except Exception as e:  # the sweep fails cleanly; the next one starts afresh
            res.error = f"{type(e).__name__}: {e}"
            log.error("sweep failed, nothing more done this sweep: %s", res.error)
        res.finished_at = self.clock()
        if sweep_id is not None:
            try:
                await self._db(self.store.reports.finish_sweep, sweep_id, res.finished_at, res.ok, res.summary())
            except Exception as e:  # pragma: no cover - the store is down too
                log.error("could not record the end of the sweep: %s", e)
        took = (res.finished_at - res.started_at).total_seconds()
        log.info(
            "sweep %s in %.1fs: %d servers %s, %d probed (%d by status alone), %d notices, %d stopped, %d pending, "
            "%d failed%s",
            "done" if res.ok else "FAILED",
            took,
            res.servers,
            res.counts(),
            res.probes,
            res.probes_status_only,
            res.notices,
            res.stops,
            res.stops_pending,
            res.stops_failed,
            " (dry run)" if dry_run else "",
        )
        return res

    async def _sweep(self, res: SweepResult, now: datetime, dry_run: bool) -> None:
        s = self.settings
        t = time.monotonic()
        res._cpu_mark = time.process_time()
        # 1. collect: the whole listing or nothing (HubListingError propagates and ends the sweep).
        servers: list[HubServer] = await self.hub.list_active_servers()
        # (the proxy's route table is fetched below, only when a server to probe needs it)

        guard = self.stop_hook if hasattr(self.stop_hook, "hub_jobs") else None
        jobs = await guard.hub_jobs() if guard is not None else None  # type: ignore[union-attr]

        keys = [k for k in (sv.run_key() for sv in servers) if k is not None]
        # The runs that could be stopped this sweep (policy.could_stop: a final notice settled),
        # asked of the store in one query; each batch reads its own histories for its look.
        could: set[RunKey] = await self._db(self.store.runs.could_stop_runs, keys) if keys else set()
        self._rules_cache = None  # the policy may have changed in place since the last sweep
        rules, default = self._rules()
        horizon = probe_horizon(rules, default)
        t = res.phase("collect", t)

        # 2-4. probe (bounded by the client), classify, decide
        def plan(part: list[HubServer]) -> list[tuple[HubServer, Any, ResolvedRule, bool]]:
            out = []
            for server in part:
                job = jobs.get(server.job_id) if jobs is not None and server.job_id else None
                rule = self._rule(server, job)
                out.append((server, job, rule, self._should_probe(server, rule, now, horizon)))
            return out

        # the route table, if a server to probe has no address (planned here for those alone)
        lacking = plan([sv for sv in servers if self._needs_address(sv)])
        await self._ensure_targets([sv for sv, _, _, should in lacking if should])
        del lacking

        # Streaming: a stop needs a final notice already settled (policy.could_stop). If even all
        # such runs stopping stays within the safety limits, the limits cannot trip this sweep, so
        # each stop goes out right after the look that decided it, inside its stop slot: the look
        # is fresh when the hub is asked, and a 10,000-server reap keeps the hub busy from the
        # first probe on instead of after the last one. (Only the runs counted here stream: one
        # whose final notice settled since is stopped, if at all, through the safety check below.)
        stream = not dry_run and bool(could) and not self._too_many(len(could), len(servers))
        slot = asyncio.Semaphore(s.safety.stop_concurrency)
        histories: dict[RunKey, History] = {}
        confirm = s.probe.confirm_with_status and hasattr(self.hub, "probe_status")

        def hist_of(server: HubServer) -> History:
            key = server.run_key()
            return (histories.get(key) if key else None) or History()

        async def one(server: HubServer, job: Any, rule: ResolvedRule, should: bool) -> Row:
            if not (stream and server.run_key() in could):
                return await look(server, job, rule, should)
            async with slot:
                row = await look(server, job, rule, should)
                if row.decision.action is Action.STOP:
                    await self._stop_streamed(row, hist_of(server), res)
            return row

        async def look(server: HubServer, job: Any, rule: ResolvedRule, should: bool) -> Row:
            probe: Probe | None = None
            obs: Observation | None = None
            hist = hist_of(server)
            if should:
                if confirm and hist.last_state == State.DETACHED.value:
                    # detached at the last look: one /api/status request tells whether anything
                    # happened since (a failed one is the failed probe a full probe would give)
                    probe = await self.hub.probe_status(server)
                    if probe.ok:
                        obs = confirm_detached(server, probe, hist, now, fresh_within=s.probe.attached_within)
                        if obs is None:  # something happened: the full look, without asking the status again
                            probe = await self._probe(server, status=probe)
                        else:
                            res.probes_status_only += 1
                else:
                    probe = await self._probe(server)
                res.probes += 1
                key = server.run_key()
                if key is not None and probe.ok:
                    self._last_probed[key] = now
            if obs is None:
                obs = classify(server, probe, now, fresh_within=s.probe.attached_within)
            if job is not None:
                obs = replace(obs, job_end=job.end)
            obs = continue_spell(obs, hist)
            dec = decide(obs, hist, rule, now, s.tz)
            return Row(obs, dec, rule, answered_started=probe.status_started if probe is not None else None)

        # The hub in batches: each batch is looked at (a bounded pool of workers, not one task per
        # server: 10,000 parked tasks cost ~30 MB), its notices limited, and then recorded and let
        # go, so that a sweep holds one batch of rows and histories, not the whole hub's.
        keep = dry_run or self.keep_rows
        limiter = _NoticeLimiter()
        held: list[Row] = []  # stops that did not stream: safety-checked, recorded and done in step 8
        workers = s.probe.concurrency + s.safety.stop_concurrency
        for c in range(0, len(servers), BATCH):
            part_plan = plan(servers[c : c + BATCH])
            histories = await self._db(
                self.store.runs.histories, [k for k in (p[0].run_key() for p in part_plan) if k is not None]
            )
            rows: list[Row] = await bounded_map(one, part_plan, workers)
            if stream:
                await self._record_pending_timeouts(now)
            t = res.phase("probe", t)  # (with the streamed stops)
            await self._limit_notices(rows, now, limiter)
            done = []
            for r in rows:
                (held if r.decision.action is Action.STOP and not r.streamed else done).append(r)
            t = await self._record_rows(done, res, now, dry_run, t)
            res.count(done, keep)
            del rows, done, part_plan
        histories = {}

        # 5. safety: too many stops at once means something is wrong upstream.
        # (A streamed sweep's stops are already done: it streamed because they could not trip it.)
        running = len(servers)
        limit = s.safety.max_stops_per_sweep
        if held and self._too_many(len(held), running):
            res.safety_tripped = True
            res.held = len(held)
            msg = (
                f"SAFETY LIMIT: this sweep would stop {len(held)} of {running} servers "
                f"(limits: {limit} per sweep, {s.safety.max_stop_fraction:.0%} of running servers); "
                "stopping none. Check the hub and the policy, then raise safety.max_stops_per_sweep if intended."
            )
            log.error(msg)
            for r in held:
                r.decision = replace(r.decision, action=Action.OK, reason=f"{r.decision.reason} [held: safety limit]")
            if not dry_run:
                await self._db(self.store.reports.record_action, None, "safety-limit", False, msg, now)
        t = await self._record_rows(held, res, now, dry_run, t)

        # 6. servers the hub no longer lists: their runs have ended
        if not dry_run:
            current = set(keys)
            gone = [k for k in await self._db(self.store.runs.open_runs) if k not in current]
            del current
            gone_hist = await self._db(self.store.runs.histories, gone) if gone else {}
            for k in gone:
                h = gone_hist.get(k)
                if h is not None and h.stop_requested_at is not None:
                    # We asked the hub to stop it and then lost track (a crash, a 202 that completed
                    # later): make sure the user still hears that we stopped it. Idempotent.
                    from .store import NoticeContext

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
            crashpoint("after-record")
        t = res.phase("record", t)
        # 7. deliver notices now (a final notice must be delivered before its stop can come)
        if not dry_run and self.notifier is not None:
            try:
                await self.notifier.drain(now)
            except Exception as e:
                log.error("notice delivery failed this sweep (will retry): %s", e)

        if not dry_run:
            crashpoint("after-notify")
        t = res.phase("notify", t)
        # 8. stops that did not stream: re-checked, the intent recorded, issued concurrently, the
        # outcome recorded (streamed stops were recorded with their batch)
        if not dry_run and not res.safety_tripped:
            todo = [r for r in held if r.decision.action is Action.STOP]
            if todo:
                await self._stops(todo, res)
            t = res.phase("stop", t)
            if guard is not None:
                orphans = await guard.reconcile(servers, jobs, now)  # type: ignore[union-attr]
                res.orphans = len(orphans)
                t = res.phase("orphans", t)
            if (res.stops or res.orphans) and self.notifier is not None:
                try:  # "we stopped your server" right away, not at the next sweep
                    await self.notifier.drain(self.clock())
                except Exception as e:
                    log.error("notice delivery failed after the stops (will retry): %s", e)
                res.phase("notify", t)
        res.count(held, keep)  # (counted last: step 8 gave them their outcomes)

    async def _record_rows(self, rows: list[Row], res: SweepResult, now: datetime, dry_run: bool,
                           t: float) -> float:
        """Record a batch's observations, decisions and notices (the outbox), and the outcomes of
        its streamed stops (with their "stopped" notices), a few transactions per batch. Returns
        the new phase mark."""
        for r in rows:
            # One INFO line per decision that does something, and per change of state or action.
            key = r.obs.server.run_key()
            seen = _shared((r.obs.state.value, r.decision.action.value))
            changed = key is not None and self._last_logged.get(key) != seen
            if key is not None:
                self._last_logged[key] = seen
            acting = r.decision.action not in (Action.OK, Action.EXEMPT)
            level = logging.INFO if acting or changed else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "%s %s: %s%s -> %s: %s",
                    r.obs.server.user,
                    r.obs.server.name or "(default)",
                    r.obs.state.value,
                    f" job {r.obs.job_id}" if r.obs.job_id else "",
                    r.decision.action.value,
                    r.decision.reason,
                )
        if dry_run:
            for r in rows:
                if r.decision.notice is not None:
                    r.outcome = f"would send {r.decision.notice.value}"
                if r.decision.action is Action.STOP:
                    r.outcome = "would stop"
            return t
        if not rows:
            return t
        recordable = [r for r in rows if r.obs.server.run_key() is not None]
        ids = await self._db(self.store.runs.record_many, [(r.obs, r.decision) for r in recordable], now)
        queued = {r.obs.server.run_key() for r, nid in zip(recordable, ids, strict=True) if nid is not None}
        del recordable, ids
        for r in rows:
            if r.decision.notice is not None:
                if r.obs.server.run_key() in queued:
                    res.notices += 1
                    r.outcome = _shared(f"{r.decision.notice.value} queued")
                else:
                    r.outcome = _shared(f"{r.decision.notice.value} already queued")
        if self.settings.slurm.walltime_notice is not None:
            await self._walltime_notices(rows, now)
        t = res.phase("record", t)
        streamed = [r for r in rows if r.stop is not None]
        if streamed:
            for c in range(0, len(streamed), 100):  # (each record holds its notice's context)
                records = [self._stop_record(r, r.obs, r.decision, *r.stop) for r in streamed[c : c + 100]]  # type: ignore[misc]
                await self._db(self.store.runs.record_stops, records, self.clock())
            crashpoint("after-stop")
            await asyncio.gather(*(self._after_stop(r, r.stop[0].outcome) for r in streamed))  # type: ignore[index]
            t = res.phase("stop.record", t)
        return t

    async def _walltime_notices(self, rows: list[Row], now: datetime) -> None:
        """Tell users their server will end at its walltime (once per run)."""
        from .store import notice_context

        lead = self.settings.slurm.walltime_notice
        assert lead is not None
        for r in rows:
            end = r.obs.job_end
            key = r.obs.server.run_key()
            if end is None or key is None or r.rule.exempt or r.obs.state is State.PENDING:
                continue
            if now < end <= now + lead:
                nid = await self._db(self.store.outbox.add_notice, key, NoticeKind.WALLTIME, None, now,
                                     channels=list(r.rule.channels), context=notice_context(r.obs, r.decision, now))
                if nid is not None:
                    log.info("%s: walltime ends at %s: notice queued", r.obs.server.label, end.isoformat())

    async def _limit_notices(self, rows: list[Row], now: datetime, limiter: _NoticeLimiter | None = None) -> None:
        """Quiet hours and the per-user daily cap postpone warnings and reminders (never a final
        notice: the stop waits for the final notice instead, so postponing it gains nothing).
        ``limiter`` carries the per-user counts from one batch of the sweep to the next: they are
        read from the store once, before this sweep recorded any notice."""
        n = self.settings.notify
        soft = (NoticeKind.WARNING, NoticeKind.REMINDER)
        candidates = [r for r in rows if r.decision.notice in soft]
        if not candidates:
            return
        quiet_until = quiet_hours_end(n.quiet_hours, now, self.settings.tz) if n.quiet_hours else None
        limiter = limiter or _NoticeLimiter()
        if limiter.counts is None:
            limiter.counts = {}
            if n.max_notices_per_day is not None:
                since = now - timedelta(days=1)
                for item in await self._db(self.store.reports.recent_notices, since, 100_000):
                    if item.kind in (NoticeKind.WARNING.value, NoticeKind.REMINDER.value):
                        limiter.counts[item.user] = limiter.counts.get(item.user, 0) + 1
        counts = limiter.counts
        for r in candidates:
            why = None
            if quiet_until is not None:
                why = f"quiet hours until {quiet_until.astimezone(self.settings.tz):%H:%M}"
            elif n.max_notices_per_day is not None:
                user = r.obs.server.user
                if counts.get(user, 0) >= n.max_notices_per_day:
                    why = f"{user} already got {n.max_notices_per_day} notices in 24 h"
                else:
                    counts[user] = counts.get(user, 0) + 1
            if why:
                notice = r.decision.notice.value if r.decision.notice else "notice"
                r.decision = replace(
                    r.decision, action=Action.OK, notice=None, channels=(),
                    reason=f"{r.decision.reason} [{notice} postponed: {why}]",
                )

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
            if row.obs.probed and hasattr(self.hub, "probe_status"):
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
                    key = server.run_key()
                    h = await self._history(key, hist)
                    obs = replace(row.obs, at=now)
                    return obs, decide(obs, h, row.rule, now, self.settings.tz)
        probe = await self._probe(fresh)
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

    def _stop_outcome(self, row: Row, dec: Decision, result: Any, res: SweepResult) -> None:
        """Count and log one stop's outcome (as it happens)."""
        label = row.obs.server.label
        if result.outcome in ("stopped", "gone"):
            res.stops += 1
            row.outcome = "stopped"
            log.info("%s stopped: %s", label, dec.reason)
        elif result.outcome == "pending":
            res.stops_pending += 1
            row.outcome = "stop pending"
            log.info("%s stop pending at the hub (202); following up", label)
        else:
            res.stops_failed += 1
            row.outcome = f"stop failed: {result.detail}"
            log.error("%s stop FAILED: %s", label, result.detail)

    @staticmethod
    def _stop_record(row: Row, obs: Observation, dec: Decision, result: Any, now: datetime) -> Any:
        """One stop's record for the store (with the "stopped" notice's context when it stopped)."""
        from .store import StopRecord

        server = row.obs.server
        detail = f"{dec.reason} | hub: {result.outcome} ({result.detail})"
        key = server.run_key()
        assert key is not None
        if result.outcome in ("stopped", "gone"):
            return StopRecord(key, "stop", True, detail, job_id=server.job_id, end_reason="stopped by the reaper",
                              notice_context=stopped_context(obs, dec, now), channels=tuple(row.rule.channels))
        if result.outcome == "pending":
            return StopRecord(key, "stop-pending", True, detail, job_id=server.job_id)
        return StopRecord(key, "stop-failed", False, detail, job_id=server.job_id)

    async def _after_stop(self, row: Row, outcome: str) -> None:
        """The batch-system guard's look after a stop (is the job gone? cancel it if not)."""
        if self.stop_hook is None:
            return
        async with self._after_sem:
            try:
                await self.stop_hook.after_stop(row.obs.server, outcome, self.clock())
            except Exception as e:
                log.error("%s: after-stop check failed: %s", row.obs.server.label, e)

    async def _stop_streamed(self, row: Row, h: History, res: SweepResult) -> None:
        """Stop one server right after the look that decided it (the caller holds its stop slot):
        the intent is made durable first, then the hub is asked. The outcome is kept on the row and
        recorded with the others after the sweep's record step (if the reaper dies before that,
        the durable intent lets the next sweep finish: the run ends and its notice goes out)."""
        row.streamed = True
        server = row.obs.server
        key = server.run_key()
        assert key is not None
        if self._asked_already(row, h, self.clock()):
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
            await self._intents.add((key, self.clock()))
        except Exception as e:  # never stop what we could not remember asking for
            row.outcome = f"not stopped: the intent could not be recorded ({e})"
            log.error("%s: not stopped, the store did not take the intent: %s", server.label, e)
            return
        result = await self.hub.stop(server.user, server.name)
        self._stop_outcome(row, row.decision, result, res)
        row.stop = (result, self.clock())  # its record is built when written (step 8), in slices

    async def _stops(self, todo: list[Row], res: SweepResult) -> None:
        """Stop many servers when the sweep could not stream them: re-checked right before, a few
        transactions in all, not a few per server (a 10,000-server hub must not wait on its
        database), and never a stop without a fresh look first."""
        keys = [k for k in (r.obs.server.run_key() for r in todo) if k is not None]
        hist = await self._db(self.store.runs.histories, keys)
        now = self.clock()
        todo = [r for r in todo if not self._asked_already(r, hist.get(r.obs.server.run_key()), now)]  # type: ignore[arg-type]
        await self._record_pending_timeouts(now)
        t = time.monotonic()
        checked = await asyncio.gather(*(self._recheck(r, res.started_at, hist) for r in todo))
        t = res.phase("stop.recheck", t)
        go: list[tuple[Row, Observation, Decision]] = []
        for row, c in zip(todo, checked, strict=True):
            server = row.obs.server
            if c is None:
                row.outcome = "gone before the stop"
                continue
            obs, dec = c
            if dec.action is not Action.STOP:
                row.obs, row.decision = obs, dec
                row.outcome = "not stopped: activity on re-check"
                log.info("%s: not stopped after all, re-check says %s: %s", server.label, obs.state.value, dec.reason)
                await self._db(self.store.runs.record, obs, dec, self.clock())
                continue
            go.append((row, obs, dec))
        if not go:
            return
        # The intent first: if we die after the hub stopped a server, the next sweep still knows.
        await self._db(self.store.runs.mark_stops_requested, [r.obs.server.run_key() for r, _, _ in go], self.clock())
        results = await asyncio.gather(*(self.hub.stop(r.obs.server.user, r.obs.server.name) for r, _, _ in go))
        t = res.phase("stop.hub", t)
        now = self.clock()
        records = []
        for (row, obs, dec), result in zip(go, results, strict=True):
            self._stop_outcome(row, dec, result, res)
            records.append(self._stop_record(row, obs, dec, result, now))
        await self._db(self.store.runs.record_stops, records, now)
        crashpoint("after-stop")
        t = res.phase("stop.record", t)
        await asyncio.gather(*(self._after_stop(row, result.outcome)
                               for (row, _, _), result in zip(go, results, strict=True)))


BATCH = 1000  # servers looked at, recorded and let go together (see Sweeper._sweep)


class _NoticeLimiter:
    """The per-user notice counts of the daily cap, carried across a sweep's batches."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None


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


def stopped_context(obs: Observation, dec: Decision, now: datetime) -> NoticeContext:
    """The context of a "we stopped your server" notice: the observation and decision that led to
    the stop, plus when it ran and what it held."""
    from .store import notice_context

    reclaimed = reclaimed_words(obs, now) if obs.server.started is not None else None
    return replace(notice_context(obs, dec, now), stopped_at=now, reclaimed=reclaimed)


def reclaimed_words(obs: Observation, now: datetime) -> str:
    """What the stop gave back, in words: "4 CPUs, 1 GPU, 16G (job 42; 5h20m before its walltime)"."""
    opts = obs.server.user_options if isinstance(obs.server.user_options, dict) else {}
    parts = []
    for key, unit in (("cpus", "CPU"), ("gpus", "GPU")):
        v = opts.get(key)
        if v not in (None, "", 0, "0"):
            parts.append(f"{v} {unit}{'s' if str(v) != '1' else ''}")
    if opts.get("mem"):
        parts.append(str(opts["mem"]))
    what = ", ".join(parts) if parts else "its CPUs and memory"
    extra = []
    if obs.job_id:
        extra.append(f"job {obs.job_id}")
    if obs.job_end is not None and obs.job_end > now:
        extra.append(f"{humanize(obs.job_end - now)} before its walltime")
    return what + (f" ({'; '.join(extra)})" if extra else "")


def quiet_hours_end(q: Any, now: datetime, tz: Any) -> datetime | None:
    """If ``now`` falls in the quiet hours (hub time zone), when they end; else None."""
    local = now.astimezone(tz)
    sh, sm = map(int, q.start.split(":"))
    eh, em = map(int, q.end.split(":"))
    start = local.replace(hour=sh, minute=sm, second=0, microsecond=0)
    end = local.replace(hour=eh, minute=em, second=0, microsecond=0)
    if start == end:
        return None
    if start < end:  # e.g. 12:00-14:00
        return end if start <= local < end else None
    # over midnight, e.g. 22:00-07:00
    if local >= start:
        return end + timedelta(days=1)
    if local < end:
        return end
    return None


def format_table(res: SweepResult, tz: Any, now: datetime | None = None) -> str:
    """The dry-run table: one line per server with state, idle time, job, action and reason."""
    now = now or res.started_at
    header = ("USER", "SERVER", "STATE", "IDLE", "JOB", "ACTION", "REASON")
    lines = []
    for r in sorted(res.rows, key=lambda r: (r.obs.server.user, r.obs.server.name)):
        o = r.obs
        idle = humanize(now - o.idle_since) if o.idle_since and o.state is not State.COMPUTING else "-"
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
        + f"; sweep {verdict}"
        + ("; dry run: nothing was changed" if res.dry_run else "")
    )
    return "\n".join(out)



async def stop_now(sweeper: Sweeper, user: str, name: str, *, actor: str) -> str:
    """Stop one server at a person's request (the web page's "Stop now"), through the same path as
    the reaper's own stops: hub stop, record, batch-job guard. Returns the outcome word."""
    server = await sweeper.hub.get_server(user, name)
    if server is None:
        return "gone"
    key = server.run_key()
    now = sweeper.clock()
    if key is not None:
        await sweeper._db(sweeper.store.runs.mark_stop_requested, key, now)
    result = await sweeper.hub.stop(user, name)
    now = sweeper.clock()
    ok = result.outcome in ("stopped", "gone", "pending")
    kind = {"stopped": "stop", "gone": "stop", "pending": "stop-pending"}.get(result.outcome, "stop-failed")
    await sweeper._db(sweeper.store.reports.record_action, key, kind, ok,
                      f"stop requested by {actor} | hub: {result.outcome} ({result.detail})", now,
                      actor=actor, job_id=server.job_id)
    if result.outcome in ("stopped", "gone") and key is not None:
        await sweeper._db(sweeper.store.runs.end_run, key, now, f"stopped by {actor}")
    log.info("%s: stop requested by %s: %s", server.label, actor, result.outcome)
    if sweeper.stop_hook is not None:
        try:
            await sweeper.stop_hook.after_stop(server, result.outcome, now)
        except Exception as e:
            log.error("%s: after-stop check failed: %s", server.label, e)
    return result.outcome
