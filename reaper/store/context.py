"""What a notice carries: :class:`NoticeContext`, built once when the notice is queued (from the
observation and decision that made it), stored with it as JSON, and read back by the renderer.

It lives with the store because the store owns its stored form: ``to_json`` writes the same keys
as the dict the reaper always stored, and ``from_json`` reads any row ever written (older rows,
sparse contexts such as an orphan job's, unknown keys), so a database upgraded in place still
renders its pending notices. The notify package reads it from a delivery; nothing is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from ..core.model import Action, Decision, Observation, State

# what of the spawner's state a notice keeps (where the job runs)
SPAWNER_KEYS = ("job_id", "job_status", "node", "exechost")
_TIMES = frozenset({"started", "last_activity", "detached_since", "idle_since", "job_end", "spell", "stop_at",
                    "next_at", "created_at", "stopped_at"})
# keys only some notices store (a "stopped" notice; a server with a display name; a known batch job)
_ONLY_WHEN_SET = frozenset({"stopped_at", "reclaimed", "display_name", "held"})


@dataclass(frozen=True)
class NoticeContext:
    """One notice's facts: the server run, what the reaper saw, what it decided (times aware UTC)."""

    user: str = ""
    server: str = ""
    started: datetime | None = None
    url: str = ""
    job_id: str | None = None
    spawner_state: dict[str, Any] = field(default_factory=dict)
    user_options: dict[str, Any] = field(default_factory=dict)
    state: str = State.DETACHED.value
    detail: str = ""
    last_activity: datetime | None = None
    detached_since: datetime | None = None
    idle_since: datetime | None = None
    job_end: datetime | None = None
    action: str = Action.OK.value
    reason: str = ""
    rule: str = ""
    spell: datetime | None = None
    stop_at: datetime | None = None
    next_at: datetime | None = None
    created_at: datetime | None = None
    stopped_at: datetime | None = None  # a "stopped" notice: when the reaper stopped it
    reclaimed: str | None = None  # a "stopped" notice: what the stop gave back, in words
    display_name: str | None = None  # the hub's display_name of the server, when it has one
    held: dict[str, Any] = field(default_factory=dict)  # the batch job's cpus, mem_mb, gpus, when known

    def to_json(self) -> dict[str, Any]:
        """The stored form: plain JSON, times ISO 8601 UTC; ``stopped_at`` and ``reclaimed`` only when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v in (None, {}) and f.name in _ONLY_WHEN_SET:
                continue
            out[f.name] = _iso(v) if f.name in _TIMES else _plain(v)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NoticeContext:
        """Any stored context back: missing keys take their defaults, unknown keys are ignored,
        an unknown state reads as detached and an unknown action as ok (as they always rendered)."""
        data = data or {}
        spawner = dict(data.get("spawner_state") or {})
        job_id = data.get("job_id") or spawner.get("job_id")
        return cls(
            user=str(data.get("user") or ""),
            server=str(data.get("server") or ""),
            started=_time(data.get("started")),
            url=str(data.get("url") or ""),
            job_id=str(job_id) if job_id not in (None, "") else None,
            spawner_state=spawner,
            user_options=dict(data.get("user_options") or {}),
            state=_member(State, data.get("state"), State.DETACHED),
            detail=str(data.get("detail") or ""),
            last_activity=_time(data.get("last_activity")),
            detached_since=_time(data.get("detached_since")),
            idle_since=_time(data.get("idle_since")),
            job_end=_time(data.get("job_end")),
            action=_member(Action, data.get("action"), Action.OK),
            reason=str(data.get("reason") or ""),
            rule=str(data.get("rule") or ""),
            spell=_time(data.get("spell")),
            stop_at=_time(data.get("stop_at")),
            next_at=_time(data.get("next_at")),
            created_at=_time(data.get("created_at")),
            stopped_at=_time(data.get("stopped_at")),
            reclaimed=str(data["reclaimed"]) if data.get("reclaimed") else None,
            display_name=str(data["display_name"]) if data.get("display_name") else None,
            held=dict(data["held"]) if isinstance(data.get("held"), dict) else {},
        )


def held_by(job: Any) -> dict[str, Any]:
    """What a batch job (reaper.batch.Job, or anything with ``cpus``, ``mem_mb``, ``gpus``) holds,
    as a notice stores it; {} when unknown."""
    if job is None:
        return {}
    out = {k: getattr(job, k, None) for k in ("cpus", "mem_mb", "gpus")}
    return {k: v for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool) and v > 0}


def notice_context(obs: Observation, decision: Decision, now: datetime, job: Any = None) -> NoticeContext:
    """The context of a notice queued with this decision (``job``: the server's batch job, when known)."""
    s = obs.server
    return NoticeContext(
        user=s.user,
        server=s.name,
        started=_utc(s.started),
        url=s.url or "",
        job_id=s.job_id,
        spawner_state={k: v for k, v in (s.state or {}).items() if k in SPAWNER_KEYS},
        user_options=dict(s.user_options or {}),
        state=obs.state.value,
        detail=obs.detail,
        last_activity=_utc(obs.last_activity),
        detached_since=_utc(obs.detached_since),
        idle_since=_utc(obs.idle_since),
        job_end=_utc(obs.job_end),
        action=decision.action.value,
        reason=decision.reason,
        rule=decision.rule,
        spell=_utc(decision.spell),
        stop_at=_utc(decision.stop_at),
        next_at=_utc(decision.next_at),
        created_at=_utc(now),
        display_name=s.display_name,
        held=held_by(job),
    )


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    if t.tzinfo is None or t.tzinfo.utcoffset(t) is None:
        raise ValueError(f"naive datetime {t!r}: the store takes timezone-aware datetimes only")
    return t.astimezone(UTC)


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.isoformat() if t.tzinfo is None else t.astimezone(UTC).isoformat()  # naive: as given


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        t = value
    else:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _member(enum: type[State] | type[Action], value: Any, default: State | Action) -> str:
    try:
        return enum(value).value
    except ValueError:
        return default.value


def _plain(value: Any) -> Any:
    """A value as the store always wrote it to JSON: datetimes ISO 8601, tuples and sets as lists,
    keys as strings, any other object as its str()."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)
