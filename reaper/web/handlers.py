"""Request handlers of the reaper's page, and the small pure helpers they use.

Login: JupyterHub's own HubOAuth (``BaseHandler`` is a ``HubOAuthenticated`` handler; reaper.web.auth
configures it). Authorization, in one place (``BaseHandler.authorize``): a user sees and acts on
their own servers only; hub admins and members of ``web.admin_group`` see and act on every server.
Every POST needs JupyterHub's xsrf token (tornado ``xsrf_cookies``; HubOAuth binds it to the login
and the hub session), unless it carries a token in its Authorization header. Every action is logged
and recorded with who did it. /metrics and /health need no login and show no user data.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo

from tornado import web

from ..core.keep import KeepRefused, keep_until
from ..core.model import History, HubServer, RunKey
from ..metrics import CONTENT_TYPE_LATEST
from ..units import format_duration, humanize, local_time, parse_duration, read_user_options, relative
from ..units import utc_or_none as as_dt  # the page's name for it
from .auth import HubOAuthCallbackHandler, HubOAuthenticated, UserNotAllowed
from .context import WebContext

if TYPE_CHECKING:
    from ..store import ActionRow, NoticeRow, RunRow, Store

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("reaper.web")

BUSY_STATES = ("computing", "working")  # a busy kernel, a program running: not idle, no idle time shown
WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
MESSAGES = {
    "kept": "Done: your server keeps running. The new scheduled stop is shown below.",
    "stopped": "Done: the server was stopped.",
    "stop-pending": "The hub is stopping the server; it will disappear from the list shortly.",
    "stop-failed": "The hub could not stop the server. The reaper's admins were told in its log.",
    "stop-refused": ("The hub refused to stop the server: it may want you to log in to the hub again first. "
                     "The server keeps running; the reaper's admins were told in its log."),
    "gone": "That server was no longer running.",
}
STOP_KINDS = ("stop",)
# The actions a stop leaves (reaper.stops.StopOutcome.record_kind): the latest one of a run tells
# whether its last stop was refused.
STOP_RECORDS = ("stop", "stop-pending", "stop-refused", "stop-failed")

# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Resources:
    cpus: float | None = None
    gpus: float | None = None
    mem_gb: float | None = None
    walltime: timedelta | None = None
    partition: str | None = None
    node: str | None = None


def resources_of(record: dict[str, Any]) -> Resources:
    """What a server's job holds, from what the reaper recorded: batch adapter data (``resources``)
    first, then the spawner's user_options, read by :func:`reaper.units.read_user_options`."""
    res = record.get("resources") if isinstance(record.get("resources"), dict) else {}
    opts = record.get("user_options") if isinstance(record.get("user_options"), dict) else {}
    merged = {**opts, **res}
    asked = read_user_options(merged)
    node = merged.get("node") or merged.get("exechost")
    return Resources(
        cpus=float(asked.cpus) if asked.cpus is not None else None,
        gpus=float(asked.gpus) if asked.gpus is not None else None,
        mem_gb=asked.mem_mb / 1024 if asked.mem_mb is not None else None,
        walltime=asked.walltime,
        partition=asked.partition,
        node=str(node) if node else None,
    )


def job_end_of(record: dict[str, Any]) -> datetime | None:
    """The job's walltime end: recorded by the batch adapter, else started + requested walltime."""
    end = as_dt(record.get("job_end"))
    if end is not None:
        return end
    started = as_dt(record.get("started"))
    wall = resources_of(record).walltime
    return started + wall if started is not None and wall is not None else None


def as_record(row: RunRow | ActionRow | None) -> dict[str, Any]:
    """What :func:`resources_of`, :func:`job_end_of` and :func:`reclaimed` read of a stored row
    (its run's start and spawn options; an action's time)."""
    if row is None:
        return {}
    out: dict[str, Any] = {"started": row.started, "user_options": row.user_options}
    at = getattr(row, "at", None)
    if at is not None:
        out["at"] = at
    return out


def reclaimed(stops: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """CPU-, GPU- and memory-hours a set of stops gave back: (walltime end - stop time) x resources.
    Stops whose walltime end or resources were not recorded are counted as unknown."""
    out = {"cpu_hours": 0.0, "gpu_hours": 0.0, "mem_gb_hours": 0.0, "counted": 0, "unknown": 0}
    for a in stops:
        at = as_dt(a.get("at") or a.get("created_at"))
        end = job_end_of(a)
        res = resources_of(a)
        if at is None or end is None or res.cpus is None and res.gpus is None and res.mem_gb is None:
            out["unknown"] += 1
            continue
        hours = max((end - at).total_seconds(), 0.0) / 3600
        out["cpu_hours"] += hours * (res.cpus or 0)
        out["gpu_hours"] += hours * (res.gpus or 0)
        out["mem_gb_hours"] += hours * (res.mem_gb or 0)
        out["counted"] += 1
    for k in ("cpu_hours", "gpu_hours", "mem_gb_hours"):
        out[k] = round(out[k], 1)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return as_dt(v).isoformat() if as_dt(v) else None  # type: ignore[union-attr]
    if isinstance(v, timedelta):
        return v.total_seconds()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "value") and isinstance(v.value, str):
        return v.value
    return v


# --------------------------------------------------------------------------- handlers


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """A page handler logged in with JupyterHub's HubOAuth (``ctx.hub_auth``). New pages subclass
    it and decorate their methods with ``@web.authenticated``; ``api = True`` answers 403 instead of
    sending a visitor without a login to the hub."""

    ctx: WebContext
    api = False

    def initialize(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.hub_auth = ctx.hub_auth

    # ---- headers

    def set_default_headers(self) -> None:
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'",
        )
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")  # not even a user server of the same origin frames it
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("Cache-Control", "no-store")

    # ---- identity

    async def prepare(self) -> None:
        await self.identify()

    async def identify(self) -> None:
        """Who is asking, asked of the hub asynchronously (HubOAuth's ``get_user``; tornado's
        ``get_current_user`` is synchronous and only reads the answer). A hub user without this
        page's access scope, or a service, gets a 403."""
        if hasattr(self, "_hub_auth_user_cache"):
            return
        self._hub_auth_user_cache: dict[str, Any] | None = None
        model = await self.hub_auth.get_user(self, sync=False)
        if model is None:
            return
        try:
            self._hub_auth_user_cache = self.check_hub_user(model)
        except UserNotAllowed:
            raise web.HTTPError(403, "your hub account has no access to this page") from None

    def check_hub_user(self, model: dict[str, Any]) -> dict[str, Any]:
        """HubOAuth's scope check, for users only: a service (even one named like a user) uses the
        hub's API, not this page."""
        if model.get("kind", "user") != "user":
            log.warning("denied: %s %r tried the page", model.get("kind"), model.get("name"))
            raise UserNotAllowed(model)
        checked: dict[str, Any] = super().check_hub_user(model)
        return checked

    def check_xsrf_cookie(self) -> None:
        """JupyterHub's xsrf check (HubOAuth's). Tornado asks it before prepare(), when no one is
        identified yet: a request carrying its own token (Authorization header) needs no xsrf
        token, so it is checked once identified. If its token turns out to be nobody's, HubOAuth
        tries the login cookie, and checks the xsrf token itself before it accepts it."""
        if not hasattr(self, "_hub_auth_user_cache") and self.hub_auth.get_token(self, in_cookie=False):
            return
        super().check_xsrf_cookie()

    def get_current_user(self) -> Any:
        return getattr(self, "_hub_auth_user_cache", None)  # asked of the hub in prepare()

    def get_login_url(self) -> str:
        if self.api:
            raise web.HTTPError(403, "log in through the hub, or send a token")
        return str(super().get_login_url())

    @property
    def me(self) -> str:
        return str(self.current_user["name"])

    @property
    def is_admin(self) -> bool:
        u = self.current_user or {}
        if u.get("kind", "user") != "user":
            return False
        if u.get("admin"):
            return True
        group = self.ctx.web.admin_group
        return bool(group) and group in (u.get("groups") or [])

    def authorize(self, user: str) -> None:
        """A user acts on their own servers only; admins on every server."""
        if user == self.me or self.is_admin:
            return
        log.warning("denied: %s asked for a server of another user (%s)", self.me, user)
        raise web.HTTPError(403, "you can only see and act on your own servers")

    # ---- data

    @property
    def store(self) -> Store:
        store: Store = self.ctx.service.store
        return store

    async def db(self, fn: Callable[P, R], *args: P.args, **kw: P.kwargs) -> R:
        """A store method (``self.store.runs.histories``...) called in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kw)

    def tz(self) -> ZoneInfo:
        return self.ctx.settings.tz

    async def servers(self, user: str | None) -> list[dict[str, Any]]:
        """Open server runs (all, or one user's) with their history, as plain dicts."""
        rows = await self.db(self.store.reports.runs_overview)
        if user is not None:
            rows = [r for r in rows if r.user == user]
        keys = [r.key for r in rows]
        hist: dict[RunKey, History] = await self.db(self.store.runs.histories, keys) if keys else {}
        now = self.ctx.now()
        refused = await self.refused_stops(set(keys), now) if keys else {}
        out = [self.server_view(r, hist, now, refused.get(r.key)) for r in rows]
        out.sort(key=lambda v: (v["user"], v["server"]))
        return out

    async def refused_stops(self, keys: set[RunKey], now: datetime) -> dict[RunKey, ActionRow]:
        """The runs (of `keys`) whose latest stop in the last 24 h the hub refused: that action."""
        actions = await self.db(self.store.reports.recent_actions, now - timedelta(hours=24), 5000)
        latest: dict[RunKey, ActionRow] = {}
        for a in actions:  # newest first
            if a.kind not in STOP_RECORDS or a.user is None or a.started is None:
                continue
            key = RunKey(a.user, a.server or "", a.started)
            if key in keys and key not in latest:
                latest[key] = a
        return {k: a for k, a in latest.items() if a.kind == "stop-refused"}

    def server_view(self, r: RunRow, hist: dict[RunKey, History], now: datetime,
                    refused: ActionRow | None = None) -> dict[str, Any]:
        tz = self.tz()
        started = r.started
        h = hist.get(r.key)
        res = resources_of(as_record(r))
        last = r.last_activity
        detached = r.detached_since
        idle_since = detached if r.state == "detached" and detached else last
        kept = h.kept_until if h and h.kept_until and h.kept_until > now else None
        stop_at = r.stop_at
        if kept is not None and stop_at is not None and stop_at < kept:
            stop_at = None  # decided before the keep; the next sweep schedules anew
        job_end = job_end_of(as_record(r))

        def t(when: datetime | None) -> dict[str, Any] | None:
            if when is None:
                return None
            return {"iso": when.isoformat(), "local": local_time(when, tz, now), "relative": relative(when, now)}

        return {
            "user": r.user,
            "server": r.server,
            "label": f"{r.user}/{r.server}" if r.server else r.user,
            "started": t(started),
            "state": r.state or "unknown",
            "idle_for": humanize(now - idle_since) if idle_since and r.state not in BUSY_STATES else None,
            "last_activity": t(last),
            "job_id": r.job_id,
            "partition": res.partition,
            "node": res.node,
            "gpus": res.gpus,
            "cpus": res.cpus,
            "mem_gb": res.mem_gb,
            "job_end": t(job_end),
            "user_options": r.user_options,
            "action": r.action,
            "reason": r.reason or "",
            "rule": r.rule,
            "stop_at": t(stop_at),
            "next_at": t(r.next_at),
            "kept_until": t(kept),
            # the hub refused the latest stop (e.g. refresh_pre_stop): shown on the card
            "stop_refused": {"at": t(refused.at), "detail": refused.detail} if refused is not None else None,
            "notices": [
                {"kind": n.kind.value, "at": t(n.created_at), "delivered": n.delivered_at is not None,
                 "failed": n.failed}
                for n in (h.notices if h else ())
            ],
        }

    # ---- output

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(_jsonable(data), indent=1))

    def wants_json(self) -> bool:
        return self.api or "application/json" in self.request.headers.get("Accept", "")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if self.wants_json():
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps({"status": status_code, "message": message}))
            return
        self.render("error.html", status=status_code, message=message, ctx=self.ctx)

    def get_template_namespace(self) -> dict[str, Any]:
        ns = super().get_template_namespace()
        ns.update(ctx=self.ctx, hub_name=self.ctx.settings.hub.name, prefix=self.ctx.prefix,
                  hub_home=self.ctx.hub_home, current=self.get_current_user())
        return ns


class NotFoundHandler(BaseHandler):
    async def prepare(self) -> None:
        self._hub_auth_user_cache = None
        raise web.HTTPError(404, "no such page")


class AddSlashHandler(BaseHandler):
    async def prepare(self) -> None:
        self._hub_auth_user_cache = None

    def get(self) -> None:
        self.redirect(self.ctx.prefix)  # a fixed target: never an open redirect


class PageHandler(BaseHandler):
    @web.authenticated
    async def get(self) -> None:
        now = self.ctx.now()
        admin = self.is_admin
        all_servers = await self.servers(None if admin else self.me)
        mine = [s for s in all_servers if s["user"] == self.me]
        others = [s for s in all_servers if s["user"] != self.me] if admin else []
        msg = MESSAGES.get(self.get_query_argument("msg", ""), "")
        err = self.get_query_argument("error", "")
        admin_view: dict[str, Any] | None = None
        if admin:
            window = self.get_query_argument("window", "7d")
            if window not in WINDOWS:
                window = "7d"
            admin_view = await admin_summary(self, now, window)
            if self.get_query_argument("dry_run", "") == "1":
                admin_view["dry_run"] = await next_sweep(self.ctx)
        self.render(
            "index.html",
            me=self.me,
            admin=admin,
            mine=mine,
            others=others,
            message=msg,
            error_text=KEEP_ERRORS.get(err) or (MESSAGES.get(err, "") if err.startswith("stop-") else ""),
            keep=self.ctx.keep,
            fmt=format_duration,
            admin_view=admin_view,
            windows=list(WINDOWS),
            now_local=local_time(now, self.tz(), now),
            tzname=self.ctx.settings.hub.timezone,
        )


KEEP_ERRORS = {
    "keep": "That is outside what the policy allows (see the limits under the button).",
    "bad-duration": "Choose one of the offered durations.",
}


class ActionHandler(BaseHandler):
    """Shared by the POST handlers: which server, and the answer."""

    def target(self) -> tuple[str, str]:
        user = self.get_body_argument("user", "")
        name = self.get_body_argument("server", "")
        if not user:
            raise web.HTTPError(400, "which server? (user missing)")
        self.authorize(user)
        return user, name

    def done(self, code: str, data: dict[str, Any], status: int = 200) -> None:
        if self.wants_json():
            self.write_json({"result": code, **data}, status=status)
        else:
            key = "error" if status >= 400 else "msg"
            self.redirect(f"{self.ctx.prefix}?{key}={code}", status=303)


class KeepHandler(ActionHandler):
    @web.authenticated
    async def post(self) -> None:
        user, name = self.target()
        try:
            requested = parse_duration(self.get_body_argument("duration", ""))
        except ValueError:
            return self.done("bad-duration", {"message": "choose a duration such as 2h"}, status=400)
        try:
            kept = await apply_keep(self.ctx, user, name, requested, actor=self.me)
        except KeepRefused as e:
            if self.wants_json():
                return self.write_json({"result": "refused", "message": str(e)}, status=409)
            raise web.HTTPError(409, str(e)) from None
        if kept is None:
            raise web.HTTPError(404, "that server is not running")
        self.done("kept", {"user": user, "server": name, "kept_until": kept.until, "note": kept.note,
                           "earliest_stop": kept.earliest_stop})


@dataclass(frozen=True)
class Kept:
    """A keep applied: the new end of the keep, the note of a limit that shortened it, the earliest
    stop after it, and what was recorded."""

    until: datetime
    note: str
    earliest_stop: datetime
    detail: str


async def apply_keep(ctx: WebContext, user: str, name: str, requested: timedelta, *, actor: str,
                     started: datetime | None = None) -> Kept | None:
    """"Keep running" for ``requested``, as the page's Keep button does it: within the keep policy
    (raises KeepRefused), moving the run's stop (``kept_until``) and recording the action by
    ``actor``. None when the server is not running (or, with ``started``, runs another run)."""
    label = f"{user}/{name}" if name else user
    policy = ctx.keep
    store = ctx.service.store
    sweeper = ctx.service.sweeper
    server: HubServer | None = await sweeper.hub.get_server(user, name)
    if server is None or server.run_key() is None or (started is not None and server.started != started):
        return None
    key = server.run_key()
    assert key is not None
    now = ctx.now()
    actions = await asyncio.to_thread(store.reports.recent_actions, now - timedelta(hours=24), 1000)
    keeps = sum(1 for a in actions if a.kind == "keep" and a.ok and a.user == user and (a.server or "") == name)
    job = sweeper.known_job(server)
    rule = sweeper.rule_for(server, job)  # the sweep's rule, its job's GPUs too
    # the walltime end as the sweep knows it (the batch job), else started + requested walltime
    record = {"started": server.started, "user_options": server.user_options,
              "job_end": job.end if job is not None else None}
    try:
        until, note = keep_until(now=now, requested=requested, policy=policy, keeps_today=keeps,
                                 started=server.started, max_age=rule.max_age, job_end=job_end_of(record))
    except KeepRefused as e:
        log.info("keep %s for %s refused for %s: %s", label, format_duration(requested), actor, e)
        raise
    await asyncio.to_thread(store.runs.set_kept_until, key, until, by=actor, now=now)
    local = until.astimezone(ctx.settings.tz).strftime("%Y-%m-%d %H:%M %Z")
    detail = f"kept running until {local} ({format_duration(requested)} asked by {actor})"
    if note:
        detail += f"; {note}"
    await asyncio.to_thread(store.reports.record_action, key, "keep", True, detail, now, actor=actor,
                            job_id=server.job_id)
    log.info("%s: %s", label, detail)
    earliest_stop = until + rule.min_notice
    if rule.max_age is not None and server.started is not None:
        earliest_stop = min(earliest_stop, server.started + rule.max_age)
    return Kept(until=until, note=note, earliest_stop=earliest_stop, detail=detail)


class StopHandler(ActionHandler):
    @web.authenticated
    async def post(self) -> None:
        from ..stops import StopOutcome

        user, name = self.target()
        label = f"{user}/{name}" if name else user
        log.info("%s: stop requested on the web page by %s", label, self.me)
        outcome = await self.ctx.service.sweeper.stops.stop_now(user, name, actor=self.me)
        if outcome is not StopOutcome.GONE:
            self.ctx.metrics.count_stop(outcome.value)
        # refused: the hub said no on purpose (409), not a failure to reach it or of it (502)
        self.done(outcome.page_code, {"user": user, "server": name, "outcome": outcome.value},
                  status=200 if outcome.ok else 409 if outcome is StopOutcome.REFUSED else 502)


class ServersAPIHandler(BaseHandler):
    api = True

    @web.authenticated
    async def get(self) -> None:
        scope = None if self.is_admin and self.get_query_argument("all", "1") != "0" else self.me
        self.write_json({"servers": await self.servers(scope)})


class ServerAPIHandler(BaseHandler):
    api = True

    @web.authenticated
    async def get(self, user: str, name: str) -> None:
        self.authorize(user)
        for s in await self.servers(user):
            if s["server"] == name:
                return self.write_json(s)
        raise web.HTTPError(404, "no such running server")


class AdminHandler(BaseHandler):
    api = True

    def require_admin(self) -> None:
        if not self.is_admin:
            log.warning("denied: %s asked for an admin view", self.me)
            raise web.HTTPError(403, "admins only")


class AdminSummaryAPIHandler(AdminHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        window = self.get_query_argument("window", "7d")
        if window not in WINDOWS:
            raise web.HTTPError(400, f"window must be one of {', '.join(WINDOWS)}")
        self.write_json(await admin_summary(self, self.ctx.now(), window))


class NextSweepAPIHandler(AdminHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin()
        self.write_json(await next_sweep(self.ctx))


async def admin_summary(h: BaseHandler, now: datetime, window: str) -> dict[str, Any]:
    since = now - WINDOWS[window]
    actions = await h.db(h.store.reports.recent_actions, since, 5000)
    notices = await h.db(h.store.reports.recent_notices, since, 5000)
    stops = [a for a in actions if a.kind in STOP_KINDS and a.ok]
    sent = [n for n in notices if n.delivered_at or n.status == "delivered"]
    tz = h.tz()

    def row(d: ActionRow | NoticeRow, at: datetime) -> dict[str, Any]:
        safe = {k: getattr(d, k) for k in ("user", "server", "kind", "ok", "detail", "actor", "job_id", "channels",
                                           "reason", "delivered_at", "failed", "status")
                if hasattr(d, k)}
        safe["at"] = {"iso": at.isoformat(), "local": local_time(at, tz, now), "relative": relative(at, now)}
        return safe

    by_kind: dict[str, int] = {}
    for n in sent:
        by_kind[n.kind] = by_kind.get(n.kind, 0) + 1
    return {
        "window": window,
        "since": since,
        "totals": {
            "servers_stopped": len(stops),
            "stopped_by_reaper": sum(1 for a in stops if not a.actor),
            "stopped_on_request": sum(1 for a in stops if a.actor),
            "notices_sent": len(sent),
            "notices_by_kind": by_kind,
            "notices_failed": sum(1 for n in notices if n.failed or n.status == "failed"),
            "reclaimed": reclaimed(as_record(a) for a in stops),
        },
        "recent_stops": [row(a, a.at) for a in stops[:50]],
        "recent_actions": [row(a, a.at) for a in actions[:50]],
        "recent_notices": [row(n, n.created_at) for n in notices[:50]],
    }


async def next_sweep(ctx: WebContext) -> dict[str, Any]:
    """What the next sweep would do: a dry run (changes nothing), reused for web.dry_run_cache."""
    async with ctx.dry_run_lock:
        now = ctx.now()
        fresh = ctx.dry_run_at is not None and now - ctx.dry_run_at < ctx.web.dry_run_cache
        if not fresh:
            ctx.dry_run_result = await ctx.service.sweeper.run_once(dry_run=True)
            ctx.dry_run_at = now
        res = ctx.dry_run_result
    tz = ctx.settings.tz
    rows = []
    for r in sorted(res.rows, key=lambda r: (r.obs.server.user, r.obs.server.name)):
        o, d = r.obs, r.decision
        rows.append({
            "user": o.server.user,
            "server": o.server.name,
            "state": o.state.value,
            "idle_for": humanize(res.started_at - o.idle_since) if o.idle_since and o.state.value not in BUSY_STATES
            else None,
            "job_id": o.job_id,
            "action": d.action.value,
            "outcome": r.outcome,
            "reason": d.reason,
            "rule": d.rule,
            "stop_at": local_time(d.stop_at, tz, now) if d.stop_at else None,
        })
    return {"at": res.started_at, "age": relative(res.started_at, now), "ok": res.ok, "error": res.error,
            "safety_tripped": res.safety_tripped, "rows": rows}


class MetricsHandler(BaseHandler):
    """Prometheus text format. No login (no user data in it), as Prometheus scrapes it."""

    async def prepare(self) -> None:
        self._hub_auth_user_cache = None

    async def get(self) -> None:
        m = self.ctx.metrics
        store = self.ctx.service.store
        if store is not None:
            try:
                if hasattr(store, "outbox"):
                    m.set_outbox_depth(await asyncio.to_thread(store.outbox.depth))
                if hasattr(store, "reports"):
                    m.set_last_successful_sweep(as_dt(await asyncio.to_thread(store.reports.last_successful_sweep)))
            except Exception as e:  # the scrape still answers; /health tells about the database
                log.warning("metrics: could not read the store: %s", e)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(m.exposition())


class HealthHandler(BaseHandler):
    """200 while sweeps succeed (the last one younger than 3 x sweep_every), 503 otherwise."""

    async def prepare(self) -> None:
        self._hub_auth_user_cache = None

    async def get(self) -> None:
        now = self.ctx.now()
        limit = self.ctx.settings.sweep_every * 3
        last: datetime | None = None
        problem = ""
        result = getattr(self.ctx.service, "last_result", None)
        if result is not None and result.ok and not result.dry_run and result.finished_at is not None:
            last = as_dt(result.finished_at)
        store = self.ctx.service.store
        if store is not None:
            try:
                recorded = as_dt(await asyncio.to_thread(store.reports.last_successful_sweep))
                if recorded is not None and (last is None or recorded > last):
                    last = recorded
            except Exception as e:
                problem = f"database: {type(e).__name__}: {e}"
        age = now - last if last is not None else None
        up = now - self.ctx.started_at
        if problem:
            ok, why = False, problem
        elif age is not None and age <= limit:
            ok, why = True, f"last successful sweep {humanize(age)} ago"
        elif age is None and up <= limit:
            ok, why = True, f"starting: no successful sweep yet ({humanize(up)} since start)"
        elif age is None:
            ok, why = False, f"no successful sweep in {humanize(up)} since start (limit {humanize(limit)})"
        else:
            assert age is not None
            ok, why = False, f"last successful sweep {humanize(age)} ago (limit {humanize(limit)})"
        if result is not None and not result.ok and result.error:
            why += f"; last sweep failed: {result.error}"
        self.set_status(200 if ok else 503)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"status": "ok" if ok else "failing", "reason": why,
                                "last_successful_sweep": last.isoformat() if last else None}))


class CallbackHandler(BaseHandler, HubOAuthCallbackHandler):
    """The hub's OAuth callback: JupyterHub's HubOAuthCallbackHandler (checks the state against this
    browser's cookie, trades the code, sets the login cookie, goes back to the page asked for)."""
