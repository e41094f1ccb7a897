"""Pure policy: Observation + History + rule + now -> Decision.

The cycle for one idle spell (a spell starts at the server's last real activity, ``Observation.idle_since``):

    idle_since ──warn_after──▶ warning ──remind_every──▶ reminder … ──▶ final notice ──min_notice──▶ stop
                                                                  (at stop_after − min_notice)

* A stop only ever follows a final notice that was *delivered* (or failed permanently on every
  channel) at least ``min_notice`` earlier. If the final notice went out late, the stop moves later.
* Any real activity starts a new spell: earlier notices no longer count and nothing more is sent
  for the old one.
* ``computing: protect`` (the default) never lets a busy kernel count as idle.
* ``working: protect`` (the default) never lets a server running a program count as idle; when it
  stops working, its idle spell starts no earlier than the last look that saw it working.
* ``unreachable`` servers are judged on the hub's own last activity, may be warned about, but are
  never given a final notice or stopped on a failed probe alone (``max_age`` still applies).
* ``max_age`` is counted from the server's start, whatever its state; it ends with a final notice
  and a stop like an idle spell.

No I/O and no clock reads: ``now`` is an argument.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo

from ..units import local_time, requested_gpus, requested_partition
from .model import (
    Action,
    Decision,
    History,
    HubServer,
    NoticeKind,
    Observation,
    SentNotice,
    State,
    humanize,
)
from .rules import ResolvedRule, Thresholds

# --------------------------------------------------------------------------- rule matching


def _gpus(server: HubServer, job_gpus: int | None) -> int:
    """GPUs held: the batch job's count, else what the spawn options asked for (any spawner's shape)."""
    if job_gpus is not None:
        return job_gpus
    return requested_gpus(server.user_options) or 0


def _option_matches(value: object, accepted: object) -> bool:
    if isinstance(accepted, list | tuple):
        return any(_option_matches(value, a) for a in accepted)
    if isinstance(accepted, str) and isinstance(value, str):
        return fnmatch.fnmatchcase(value, accepted)
    return value == accepted or str(value) == str(accepted)


def rule_matches(
    rule: ResolvedRule,
    server: HubServer,
    *,
    job_gpus: int | None = None,
    job_partition: str | None = None,
) -> bool:
    m = rule.match
    if m.users is not None and not any(fnmatch.fnmatchcase(server.user, u) for u in m.users):
        return False
    if m.groups is not None and not set(m.groups) & set(server.groups):
        return False
    if m.servers is not None and not any(
        server.name == s if s == "" else fnmatch.fnmatchcase(server.name, s) for s in m.servers
    ):
        return False
    opts = server.user_options if isinstance(server.user_options, dict) else {}
    if m.user_options is not None:
        for key, accepted in m.user_options.items():
            if key not in opts or not _option_matches(opts[key], accepted):
                return False
    if m.min_gpus is not None and _gpus(server, job_gpus) < m.min_gpus:
        return False
    if m.partitions is not None:
        part = job_partition or requested_partition(opts)
        if not isinstance(part, str) or not any(fnmatch.fnmatchcase(part, p) for p in m.partitions):
            return False
    return True


def select_rule(
    rules: Sequence[ResolvedRule],
    default: ResolvedRule,
    server: HubServer,
    *,
    job_gpus: int | None = None,
    job_partition: str | None = None,
) -> ResolvedRule:
    """First matching rule wins; the defaults apply when none matches."""
    for r in rules:
        if rule_matches(r, server, job_gpus=job_gpus, job_partition=job_partition):
            return r
    return default


def probe_horizon(rules: Iterable[ResolvedRule], default: ResolvedRule) -> timedelta | None:
    """The shortest idle time after which any rule could act. A server whose hub activity is younger
    than this cannot be due for anything yet. None: no rule can ever act on idleness."""
    values: list[timedelta] = []
    for r in (*rules, default):
        if r.exempt:
            continue
        for t in (r.detached, r.attached):
            for v in (t.warn_after, t.stop_after):
                if v is not None:
                    values.append(v - r.min_notice if v is t.stop_after else v)
    return max(min(values), timedelta(0)) if values else None


def could_stop(history: History) -> bool:
    """Whether ``decide`` could answer STOP for this run, whatever a probe shows: a stop always
    follows a final notice that was delivered (or failed on every channel). The sweep counts these
    runs before probing: when even all of them stopping stays within the safety limits, the limits
    cannot trip, and each stop may go out right after the look that decided it."""
    return any(n.kind is NoticeKind.FINAL and _final_settled(n) is not None for n in history.notices)


# --------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class _Deadline:
    stop_at: datetime
    spell: datetime | None  # None: run-wide (max_age)
    why: str


def _spell_notices(history: History, spell: datetime | None) -> list[SentNotice]:
    return [n for n in history.notices if n.spell == spell]


def _final_settled(n: SentNotice) -> datetime | None:
    if n.delivered_at is not None:
        return n.delivered_at
    if n.failed:
        return n.failed_at or n.created_at
    return None


def _idle_words(obs: Observation, idle_for: timedelta) -> str:
    h = humanize(idle_for)
    if obs.state is State.DETACHED:
        return f"window closed, no activity for {h}"
    if obs.state is State.ATTACHED:
        if idle_for < timedelta(minutes=5):
            return "in use (a browser tab is open)"
        return f"a browser tab is open but nothing happened for {h}"
    if obs.state is State.COMPUTING:
        return f"kernel busy, counted as idle by policy; no activity for {h}"
    if obs.state is State.WORKING:
        return f"{obs.detail}, counted as idle by policy; no activity for {h}"
    if obs.state is State.UNREACHABLE:
        return f"server not reachable; the hub last saw activity {h} ago"
    return f"idle for {h}"


def idle_since(obs: Observation, history: History, rule: ResolvedRule) -> datetime | None:
    """The start of the idle spell. Under ``working: protect`` a server that stopped working is
    idle no earlier than the last look that saw it working (never harm: the spell only moves later)."""
    spell = obs.idle_since
    was = history.working_at
    if (rule.working == "protect" and was is not None and spell is not None
            and obs.state not in (State.WORKING, State.COMPUTING, State.PENDING) and was > spell):
        return min(was, obs.at)
    return spell


def decide(
    obs: Observation,
    history: History,
    rule: ResolvedRule,
    now: datetime,
    tz: tzinfo,
) -> Decision:
    """What to do about one server now, and why, in words an admin and a researcher can read."""
    dec = _decide(obs, history, rule, now, tz)
    if dec.notice is not None:
        dec = replace(dec, channels=rule.channels)
    return dec


def _decide(
    obs: Observation,
    history: History,
    rule: ResolvedRule,
    now: datetime,
    tz: tzinfo,
) -> Decision:
    tag = f"rule {rule.name}" if rule.name != "defaults" else "defaults"

    if obs.state is State.PENDING:
        return Decision(Action.OK, f"{obs.detail}; nothing to decide", rule=rule.name)
    if rule.exempt:
        return Decision(Action.EXEMPT, f"exempt ({tag})", rule=rule.name)

    # ---- the idle path: which thresholds apply to this state
    thresholds: Thresholds | None
    spell = idle_since(obs, history, rule)
    if obs.state is State.COMPUTING and rule.computing == "protect":
        thresholds = None
    elif obs.state is State.WORKING and rule.working == "protect":
        thresholds = None
    elif obs.state in (State.COMPUTING, State.WORKING):
        thresholds = rule.attached if obs.browser_connected else rule.detached
    elif obs.state is State.ATTACHED:
        thresholds = rule.attached
    else:  # DETACHED, UNREACHABLE
        thresholds = rule.detached
    kept = history.kept_until is not None and now < history.kept_until
    if kept:
        thresholds = None
    if spell is None or spell > now:
        thresholds = None  # unknown or future activity: treat as active

    idle_for = now - spell if spell is not None else timedelta(0)
    deadlines: list[_Deadline] = []
    if thresholds is not None and thresholds.stop_after is not None and spell is not None:
        deadlines.append(
            _Deadline(spell + thresholds.stop_after, spell, _idle_words(obs, idle_for))
        )
    started = obs.server.started
    if rule.max_age is not None and started is not None:
        deadlines.append(
            _Deadline(
                started + rule.max_age,
                None,
                f"running for {humanize(now - started)} (longest allowed: {humanize(rule.max_age)})",
            )
        )
    target = min(deadlines, key=lambda d: d.stop_at) if deadlines else None
    # A failed probe alone never leads to a final notice or a stop; max_age does.
    can_finish = target is not None and not (obs.state is State.UNREACHABLE and target.spell is not None)

    # ---- final notice and stop
    if target is not None and can_finish:
        finals = [n for n in _spell_notices(history, target.spell) if n.kind is NoticeKind.FINAL]
        final_due = target.stop_at - rule.min_notice
        if finals:
            final = finals[0]
            settled = _final_settled(final)
            if settled is None:
                return Decision(
                    Action.OK,
                    f"{target.why}; final notice queued at {local_time(final.created_at, tz, now)}, "
                    "not delivered yet: the stop waits for it",
                    rule=rule.name,
                    spell=target.spell,
                    stop_at=max(target.stop_at, now + rule.min_notice),
                    next_at=None,
                )
            stop_at = max(target.stop_at, settled + rule.min_notice)
            how = "failed on every channel" if final.failed and final.delivered_at is None else "delivered"
            doubt = obs.work.doubt if obs.work is not None and target.spell is not None else None
            if now >= stop_at and doubt is not None and now < stop_at + rule.protect_idle:
                # never a stop on doubt: a source of the work look failed; at most protect_idle
                return Decision(
                    Action.OK,
                    f"{target.why}; final notice {how} at {local_time(settled, tz, now)}; stop held: "
                    f"could not tell whether a program runs ({doubt}); stop by "
                    f"{local_time(stop_at + rule.protect_idle, tz, now)} at the latest ({tag})",
                    rule=rule.name,
                    spell=target.spell,
                    stop_at=stop_at,
                    next_at=now,
                )
            if now >= stop_at:
                return Decision(
                    Action.STOP,
                    f"{target.why}; final notice {how} at {local_time(settled, tz, now)} ({tag})",
                    rule=rule.name,
                    spell=target.spell,
                    stop_at=stop_at,
                    next_at=now,
                )
            return Decision(
                Action.OK,
                f"{target.why}; final notice {how} at {local_time(settled, tz, now)}; "
                f"stop at {local_time(stop_at, tz, now)} ({tag})",
                rule=rule.name,
                spell=target.spell,
                stop_at=stop_at,
                next_at=stop_at,
            )
        if now >= final_due:
            stop_at = max(target.stop_at, now + rule.min_notice)
            return Decision(
                Action.FINAL,
                f"{target.why}; final notice now, stop at {local_time(stop_at, tz, now)} if nothing changes ({tag})",
                rule=rule.name,
                notice=NoticeKind.FINAL,
                spell=target.spell,
                stop_at=stop_at,
                next_at=stop_at,
            )

    # ---- warnings and reminders for the idle spell
    stop_at = target.stop_at if target is not None and can_finish else None
    stop_words = f", stop at {local_time(stop_at, tz, now)}" if stop_at else ""
    if thresholds is not None and thresholds.warn_after is not None and spell is not None:
        warn_at = spell + thresholds.warn_after
        final_due = (stop_at - rule.min_notice) if stop_at is not None else None
        notices = [
            n for n in _spell_notices(history, spell) if n.kind in (NoticeKind.WARNING, NoticeKind.REMINDER)
        ]
        if now >= warn_at:
            words = _idle_words(obs, idle_for)
            if not notices:
                return Decision(
                    Action.WARN,
                    f"{words}; warning now{stop_words} ({tag})",
                    rule=rule.name,
                    notice=NoticeKind.WARNING,
                    spell=spell,
                    stop_at=stop_at,
                    next_at=final_due,
                )
            last = max(n.created_at for n in notices)
            if now >= last + rule.remind_every and (final_due is None or now < final_due):
                return Decision(
                    Action.REMIND,
                    f"{words}; reminder {len(notices)}{stop_words} ({tag})",
                    rule=rule.name,
                    notice=NoticeKind.REMINDER,
                    spell=spell,
                    stop_at=stop_at,
                    next_at=final_due,
                )
            nxt = last + rule.remind_every
            if final_due is not None and final_due <= nxt:
                upcoming = f"final notice at {local_time(final_due, tz, now)}"
                nxt = final_due
            else:
                upcoming = f"next reminder at {local_time(nxt, tz, now)}"
            return Decision(
                Action.OK,
                f"{words}; warned at {local_time(notices[0].created_at, tz, now)}, {upcoming}{stop_words} ({tag})",
                rule=rule.name,
                spell=spell,
                stop_at=stop_at,
                next_at=nxt,
            )
        return Decision(
            Action.OK,
            f"{_idle_words(obs, idle_for)}; warning at {local_time(warn_at, tz, now)}{stop_words} ({tag})",
            rule=rule.name,
            spell=spell,
            stop_at=stop_at,
            next_at=warn_at,
        )

    # ---- nothing idle to act on
    if kept:
        assert history.kept_until is not None
        why = f"kept running by the user until {local_time(history.kept_until, tz, now)}"
    elif obs.state is State.COMPUTING:
        why = f"{obs.detail}; a busy kernel is protected ({tag})"
    elif obs.state is State.WORKING:
        why = f"working: {obs.detail}; a running program is protected ({tag})"
    elif obs.state is State.UNREACHABLE:
        why = f"{obs.detail}; never stopped on a failed probe alone ({tag})"
    elif thresholds is None:
        why = f"{obs.state.value}: {obs.detail}"
    else:
        why = f"{obs.state.value}: {obs.detail}; no limit for {obs.state.value} servers ({tag})"
    if stop_at is not None:
        why += f"; stop at {local_time(stop_at, tz, now)}"
    return Decision(Action.OK, why, rule=rule.name, stop_at=stop_at, next_at=stop_at)
