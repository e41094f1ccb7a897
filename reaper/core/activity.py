"""Pure classification: hub data + probe -> Observation.

The measured browser behaviour this relies on is in STACK.md ("What a real browser does"):

* computing  = any kernel reports ``execution_state == "busy"``: the only signal, because every
  timestamp stands still during a silent computation;
* attached   = a kernel websocket is open (``connections > 0``: a notebook tab, possibly hidden), or
  ``/api/status`` last_activity is fresh (a launcher, terminal or file tab polls every ~10 s);
* detached   = no kernel connection, nothing busy, and ``/api/status`` last_activity stale. It became
  detached at about the later of the kernel and status last_activity (nothing records the close
  itself; Lab's last poll is at most ~10 s before it);
* unreachable = the probe failed: hub data only, never a reason to stop.
* working    = a program of the job runs (:func:`classify_work`, after the look, for the servers
  whose decision it can change): the companion or the batch accounting shows a program using at
  least ``probe.working_cpu`` of a core since the last look, or a terminal has a command in the
  foreground (protected at most ``working.protect_idle`` without CPU).

No I/O, no clock: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .model import (
    CpuSample,
    History,
    HubServer,
    Observation,
    Probe,
    Program,
    State,
    Where,
    Work,
    WorkMemory,
    humanize,
)

# /api/status last_activity younger than this means a tab is open and polling (Lab polls every ~10 s
# while visible; a hidden tab stops within ~35 s). Generous on purpose: a false "attached" only delays.
FRESH_WITHIN = timedelta(seconds=90)
# Tolerated clock skew between the hub, the single-user servers and us.
CLOCK_SKEW = timedelta(seconds=30)


def _latest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


def classify(
    server: HubServer,
    probe: Probe | None,
    now: datetime,
    *,
    fresh_within: timedelta = FRESH_WITHIN,
) -> Observation:
    """Classify one server. ``probe`` is None when the sweep chose not to probe (fresh hub activity)."""
    if server.pending or not server.ready:
        what = server.pending or "not ready"
        return Observation(
            server=server,
            state=State.PENDING,
            at=now,
            last_activity=server.last_activity,
            detail=f"{what} pending on the hub",
        )

    if probe is None:
        # Not probed because the hub saw activity recently. Activity in the future or missing is
        # treated as fresh: never harm on doubt.
        la = server.last_activity
        ago = humanize(now - la) if la and la <= now else "just now"
        return Observation(
            server=server,
            state=State.ATTACHED,
            at=now,
            last_activity=min(la, now) if la else now,
            detail=f"active on the hub {ago} ago (not probed)",
            probed=False,
        )

    if not probe.ok:
        la = server.last_activity
        if la is None or la > now + CLOCK_SKEW:
            la = now  # unknown or future: treat as active
        return Observation(
            server=server,
            state=State.UNREACHABLE,
            at=now,
            last_activity=min(la, now),
            detail=f"probe failed ({probe.error}); using the hub's last activity",
            probed=True,
        )

    kernels = probe.kernels
    busy = [k for k in kernels if k.execution_state == "busy"]
    connections = sum(max(k.connections, 0) for k in kernels)
    status_la = probe.status_last_activity
    kernel_la = _latest(*(k.last_activity for k in kernels))
    last = _latest(status_la, kernel_la, probe.terminals_last_activity)

    # Timestamps in the future (clock skew) or missing: treat as fresh.
    status_unknown = status_la is None or status_la > now + CLOCK_SKEW
    status_fresh = status_unknown or (status_la is not None and now - status_la <= fresh_within)
    if last is None or last > now:
        last = now if last is None or last > now + CLOCK_SKEW else last
    last = min(last, now)

    kern = _kernels_words(len(kernels), len(busy), probe.terminals)
    base = dict(
        server=server,
        at=now,
        last_activity=last,
        browser_connected=connections > 0,
        busy_kernels=len(busy),
        kernels=len(kernels),
        terminals=probe.terminals,
        probed=True,
    )

    if busy:
        return Observation(state=State.COMPUTING, detail=f"a kernel is busy computing ({kern})", **base)  # type: ignore[arg-type]
    if connections > 0:
        detail = f"a browser is connected ({connections} connection{'s' if connections != 1 else ''}; {kern})"
        if not status_fresh and status_la is not None:
            detail += f", no activity for {humanize(now - status_la)}: a tab left open in the background?"
        return Observation(state=State.ATTACHED, detail=detail, **base)  # type: ignore[arg-type]
    if status_fresh:
        return Observation(
            state=State.ATTACHED,
            detail=f"a tab is open (activity {humanize(now - last)} ago; {kern})",
            **base,  # type: ignore[arg-type]
        )
    return Observation(
        state=State.DETACHED,
        detached_since=last,
        detail=detached_detail(len(kernels), probe.terminals),
        **base,  # type: ignore[arg-type]
    )


def detached_detail(kernels: int, terminals: int) -> str:
    """The detail of a detached server (its kernels are all idle)."""
    return f"no browser connected, {_kernels_words(kernels, 0, terminals)}"


def _kernels_words(kernels: int, busy: int, terminals: int) -> str:
    if kernels == 0:
        text = "no kernel running"
    elif busy == 0:
        text = "kernel idle" if kernels == 1 else f"{kernels} kernels, all idle"
    else:
        text = f"{busy} of {kernels} kernels busy"
    if terminals:
        text += f", {terminals} terminal{'s' if terminals != 1 else ''} open"
    return text


def needs_probe(server: HubServer, now: datetime, horizon: timedelta) -> bool:
    """False when the hub saw activity more recently than ``horizon`` (the shortest time after which
    any rule could warn): such a server cannot be due for a notice, so probing it is wasted work."""
    if server.pending or not server.ready:
        return False
    la = server.last_activity
    if la is None:
        return True
    if la > now + CLOCK_SKEW:
        return False  # the future: treat as active
    return now - la >= horizon


def confirm_detached(
    server: HubServer,
    status: Probe,
    history: History,
    now: datetime,
    *,
    fresh_within: timedelta = FRESH_WITHIN,
) -> Observation | None:
    """The server was detached at its last look and one ``/api/status`` answer says nothing has
    happened since: the same detached spell, without asking ``/api/kernels``. None when that cannot
    be told from the status alone (then the server is probed in full).

    What it relies on (jupyter_server 2.x, checked on a real server by
    tests/integration/test_real_hub_facts.py): ``last_activity`` moves with every request that is
    not ``no_track_activity``, terminal activity, and every kernel message answering a tracked
    request, and a kernel's ``execution_state`` turns busy only with such a message. So if it is
    no later than the spell's start, no kernel went busy and nothing connected. A kernel shut down
    (or started by the server itself) need not move it, but changes the kernel count, so the
    recorded detail must be the very words a full probe would give now ("kernel idle" ...). A
    server whose last look saw terminals (``probe.terminals``) is probed in full."""
    since = history.detached_since
    if history.last_state != State.DETACHED.value or since is None:
        return None
    la = status.status_last_activity
    if not status.ok or status.status_connections != 0 or status.status_kernels is None or la is None:
        return None
    if la > since or now - la <= fresh_within:
        return None
    detail = detached_detail(status.status_kernels, 0)
    if history.last_detail != detail:
        return None
    return Observation(
        server=server,
        state=State.DETACHED,
        at=now,
        last_activity=since,
        detached_since=since,
        kernels=status.status_kernels,
        detail=detail,
        probed=True,
    )


def continue_spell(obs: Observation, history: History) -> Observation:
    """A failed probe in the middle of a detached spell must not start a new spell (and so a second
    warning): if the server was detached at the last sweep and the hub has seen no activity since,
    the spell goes on from where it was."""
    if obs.state is not State.UNREACHABLE or history.last_state != State.DETACHED.value:
        return obs
    since, seen = history.detached_since, history.last_seen
    hub_la = obs.server.last_activity
    if since is None or seen is None or (hub_la is not None and hub_la > seen):
        return obs
    return replace(obs, last_activity=since, detail=f"{obs.detail}; detached since {since:%H:%M} UTC before that")


# --------------------------------------------------------------------------- work (a program running)

# The resolution of a CPU figure, in seconds: Slurm's sstat counts whole seconds (and PBS's cput is
# printed in seconds); the companion reads /proc, in clock ticks. A rate is told from a span only
# when the figure's resolution cannot decide it: "used" needs the growth minus one resolution step
# to reach the threshold, "not used" a span long enough for the threshold to exceed one step
# (50 s for sstat at 2 %, half a second for the companion). Otherwise the last look's verdict stands.
JOB_RESOLUTION = 1.0
PROCESS_RESOLUTION = 0.01
WORKING_CPU = 0.02  # the default probe.working_cpu: 2 % of a core
PROTECT_IDLE = timedelta(hours=2)  # the default working.protect_idle


@dataclass(frozen=True, slots=True)
class Use:
    """One program at one look: its sample for the next look and what it did since the last."""

    program: Program
    sample: CpuSample
    used: bool  # used at least working_cpu since the last look (first look: since its start)
    cpu: float = 0.0  # CPU seconds used over ``span``
    span: timedelta | None = None  # None: no rate (unknown CPU, too short)
    first: bool = False  # measured since its start (no earlier sample)


def resolution(program: Program) -> float:
    """How fine this program's CPU figure is, in seconds."""
    return JOB_RESOLUTION if program.where is Where.JOB else PROCESS_RESOLUTION


def measure(program: Program, prev: CpuSample | None, now: datetime, working_cpu: float) -> Use:
    """What one program did since its last sample (first look: since it started, which can only
    make it look busier: over-protect, never under-). A span too short for the figure's resolution
    to tell leaves the last look's verdict standing (and its sample, so the next look measures from
    there)."""
    since = program.started if program.started is not None and program.started <= now else None
    if since is None:
        since = prev.since if prev is not None else now
    cpu = program.cpu_seconds
    if cpu is None or cpu < 0:
        return Use(program, CpuSample(program.key, 0.0, now, since, prev.used_at if prev else None), used=False)
    if prev is not None and cpu >= prev.cpu_seconds and prev.at < now:
        span, used_cpu, first = now - prev.at, cpu - prev.cpu_seconds, False
    else:  # no sample, or the counter went back (a restarted program): since its start
        span, used_cpu, first = now - since, cpu, True
    seconds, step = span.total_seconds(), resolution(program)
    if seconds > 0 and used_cpu - step >= working_cpu * seconds:
        used = True
    elif seconds > 0 and working_cpu * seconds >= step:
        used = False
    else:  # too short to tell: the last look's verdict stands
        if first or prev is None:
            return Use(program, CpuSample(program.key, cpu, now, since, None), used=False)
        return Use(program, prev, used=prev.used_at is not None and prev.used_at >= prev.at)
    used_at = now if used else (prev.used_at if prev is not None else None)
    return Use(program, CpuSample(program.key, cpu, now, since, used_at), used=used, cpu=used_cpu, span=span,
               first=first)


def baseline_only(u: Use, work: Work) -> Use:
    """The job's first figure averages over the whole job, the server's start-up and any past use
    included: where the companion answered (it sees each program's own CPU), that figure is only
    the baseline for the next look, so an idle shell or a ``sleep`` is not protected by the job's
    past. Without the companion it stands (over-protect, never under-)."""
    if u.program.where is Where.JOB and u.first and u.used and work.companion == "ok":
        return replace(u, used=False, sample=replace(u.sample, used_at=None))
    return u


def _source_of(key: str) -> Where:
    """The source a sample came from: the batch accounting (JOB) or the companion (OTHER)."""
    return Where.JOB if key.startswith("job:") else Where.OTHER


def use_words(u: Use) -> str:
    """ "python in terminal 1 used 14m of CPU in the last 1h" """
    assert u.span is not None
    when = f"since it started {humanize(u.span)} ago" if u.first else f"in the last {humanize(u.span)}"
    return f"{u.program.label} used {humanize(timedelta(seconds=u.cpu))} of CPU {when}"


def classify_work(
    obs: Observation,
    work: Work,
    history: History,
    now: datetime,
    *,
    working_cpu: float = WORKING_CPU,
    protect_idle: timedelta = PROTECT_IDLE,
) -> Observation:
    """The look at the job's work, over an observation classified from the hub and the probe.

    ``working`` when a program used at least ``working_cpu`` (a fraction of one core) since the
    last look, or a terminal has a command in the foreground that used CPU (or started) less than
    ``protect_idle`` ago. A kernel reporting idle whose CPU grows (a background thread) is working.
    A source that failed or is absent shows nothing: it never makes a server look idle, and a
    server working at its last look that no source answers for stays working (for at most
    ``protect_idle`` after the last look that saw it working). A busy kernel (computing) and a
    pending server keep their state; their programs' samples are kept for the next look."""
    old = {s.key: s for s in history.samples}
    uses = [baseline_only(measure(p, old.get(p.key), now, working_cpu), work) for p in work.programs]
    answered = work.sources_ok()
    kept = [s for s in history.samples if _source_of(s.key) not in answered]  # a failed source's: for next time
    samples = tuple(sorted({u.sample.key: u.sample for u in uses}.values(), key=lambda s: s.key)) + tuple(kept)

    busy = [use_words(u) for u in uses if u.used and u.span is not None]
    busy += [f"{u.program.label} is using CPU" for u in uses if u.used and u.span is None]
    waiting: list[str] = []
    expired: list[str] = []
    for u in uses:
        if u.used or not u.program.foreground:
            continue
        quiet_since = max(u.sample.since, u.sample.used_at or u.sample.since)
        quiet = max(now - quiet_since, timedelta(0))
        if quiet < protect_idle:
            waiting.append(f"{u.program.label} is running (no CPU for {humanize(quiet)}; "
                           f"protected up to {humanize(protect_idle)} without CPU)")
        else:
            expired.append(f"{u.program.label} has used no CPU for {humanize(quiet)}")

    if obs.state in (State.PENDING, State.COMPUTING):
        return replace(obs, work=work, memory=WorkMemory(samples, now if busy else history.working_at))
    if busy or waiting:
        return replace(obs, state=State.WORKING, detached_since=None, work=work, detail="; ".join(busy + waiting),
                       memory=WorkMemory(samples, now))
    was = history.working_at
    if (not work.answered and history.last_state == State.WORKING.value and was is not None
            and now - was < protect_idle):
        why = f"companion: {work.companion}; batch accounting: {work.batch}"
        return replace(obs, state=State.WORKING, detached_since=None, work=work, memory=WorkMemory(samples, was),
                       detail=f"was working at the last look ({history.last_detail or 'a program running'}); "
                              f"no source answered this time ({why}): not taken as idle")
    detail = "; ".join([obs.detail, *expired]) if expired else obs.detail
    return replace(obs, work=work, detail=detail, memory=WorkMemory(samples, was))
