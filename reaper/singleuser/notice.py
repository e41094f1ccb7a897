"""The reaper's pending notice, for JupyterLab: the in-Lab side of the "lab" notification channel.

Served by the companion in the user's single-user server (paths under the server's base_url):

    PUT    api/reaper/notice   the reaper (its service token, access:servers) sets the pending notice:
                               {"kind", "stop_at", "walltime_end", "reason", "hub", "server", "id"}
    DELETE api/reaper/notice   the reaper clears it when the spell ends; answers what it cleared, with
                               kept_at, so the reaper can record "kept from JupyterLab"
    GET    api/reaper/notice   JupyterLab polls it: {"notice": {...} | null, "kept_at": ISO | null,
                               "kept_notice": id | null, "can_stop": bool | null}
    POST   api/reaper/keep     JupyterLab's "Keep running": the user is here. This one request COUNTS AS
                               ACTIVITY (the reaper sees fresh activity at its next look: a new spell);
                               the pending notice is dismissed and kept_at remembered until the reaper's
                               DELETE reads it
    POST   api/reaper/stop     JupyterLab's "Stop now": stops this server THROUGH THE HUB with the
                               server's own JUPYTERHUB_API_TOKEN, when the hub granted that token
                               delete:servers for this server (Spawner.server_token_scopes, as the
                               shipped hub/jupyterhub_config.py does); else 403 with a message to show

Except the keep, no request here counts as activity, with or without ``?no_track_activity=1``:
``_track_activity = False`` keeps jupyter_server's ``api_last_activity`` (what /api/status and
JupyterHub's activity reports read) where it was. The notice lives in memory only: a restarted server
is a new server run, whose notices start afresh.

Authentication and authorization are jupyter_server's (under JupyterHub the hub's identity provider
admits only tokens with access to this very server: another user gets 403). Under JupyterHub only a
service (the reaper) may PUT or DELETE a notice; the user's own browser may read, keep and stop.

Enable on its own (until it joins the companion's extension points):
    jupyter server --ServerApp.jpserver_extensions="{'reaper.singleuser.notice': True}"
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

KINDS = ("warning", "reminder", "final", "walltime")
SETTING = "jupyterhub_reaper_notice"
REASON_LIMIT = 500
log = logging.getLogger("jupyterhub_reaper.notice")
TEXT_LIMIT = 200


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an ISO-8601 time" + (" or null" if optional else ""))
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what}: not an ISO-8601 time: {value[:40]!r}") from None
    if t.tzinfo is None:
        raise ValueError(f"{what}: a time zone is required (UTC: ...Z)")
    return _iso(t)


def _text(value: Any, what: str, limit: int = TEXT_LIMIT) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text")
    return value[:limit]


def parse_notice(body: Any) -> dict[str, Any]:
    """The notice as stored, from a PUT's JSON body; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the notice must be a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    nid = body.get("id")
    if not isinstance(nid, str | int) or isinstance(nid, bool) or str(nid) == "":
        raise ValueError("id must be a non-empty string or number")
    return {
        "id": str(nid),
        "kind": kind,
        "stop_at": _parse_time(body.get("stop_at"), "stop_at", optional=kind == "walltime"),
        "walltime_end": _parse_time(body.get("walltime_end"), "walltime_end", optional=True),
        "reason": _text(body.get("reason"), "reason", REASON_LIMIT),
        "hub": _text(body.get("hub"), "hub"),
        "server": _text(body.get("server"), "server"),
    }


class NoticeState:
    """What this server knows: the pending notice, and the last keep pressed in JupyterLab."""

    def __init__(self) -> None:
        self.notice: dict[str, Any] | None = None
        self.put_at: str | None = None
        self.kept_at: str | None = None
        self.kept_notice: str | None = None

    def view(self) -> dict[str, Any]:
        return {"notice": self.notice, "put_at": self.put_at, "kept_at": self.kept_at,
                "kept_notice": self.kept_notice}

    def put(self, notice: dict[str, Any], now: datetime) -> None:
        if self.notice is None or self.notice["id"] != notice["id"]:
            self.put_at = _iso(now)
        self.notice = notice

    def keep(self, now: datetime) -> None:
        self.kept_at = _iso(now)
        self.kept_notice = self.notice["id"] if self.notice else self.kept_notice
        self.notice = None  # dismissed: the reaper's next look sees the activity and clears its side

    def clear(self) -> dict[str, Any]:
        out = {"cleared": self.notice, "kept_at": self.kept_at, "kept_notice": self.kept_notice}
        self.notice = self.put_at = self.kept_at = self.kept_notice = None
        return out


def _state(handler: web.RequestHandler) -> NoticeState:
    state = handler.settings.get(SETTING)
    if state is None:
        state = handler.settings[SETTING] = NoticeState()
    return state


class _Base(APIHandler):
    # never counts as activity, with or without ?no_track_activity=1 (see the module's doc)
    _track_activity = False

    def _hub_kind(self) -> str | None:
        """'user' or 'service' under JupyterHub; None under a plain jupyter server."""
        hub_user = getattr(self.current_user, "hub_user", None)
        return hub_user.get("kind") if isinstance(hub_user, dict) else None

    def _send(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))


class NoticeHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        self._send(200, {**_state(self).view(), "can_stop": stop_possible()})

    def _reaper_only(self) -> None:
        if self._hub_kind() not in (None, "service"):
            raise web.HTTPError(403, "only the reaper service sets or clears notices")

    @web.authenticated
    async def put(self) -> None:
        self._reaper_only()
        try:
            notice = parse_notice(json.loads(self.request.body or b"null"))
        except (ValueError, UnicodeDecodeError) as e:
            raise web.HTTPError(400, f"bad notice: {e}") from None
        state = _state(self)
        state.put(notice, _now())
        self.log.info("jupyterhub-reaper: %s notice %s pending (stop at %s)", notice["kind"], notice["id"],
                      notice["stop_at"])
        self._send(200, state.view())

    @web.authenticated
    async def delete(self) -> None:
        self._reaper_only()
        self._send(200, _state(self).clear())


class KeepHandler(APIHandler):
    """The one tracked request: pressing "Keep running" is the user being here."""

    @web.authenticated
    async def post(self) -> None:
        state = _state(self)
        state.keep(_now())
        # activity, even if the request said ?no_track_activity (finish() records it otherwise too)
        self.settings["api_last_activity"] = _now()
        self.log.info("jupyterhub-reaper: kept running from JupyterLab (notice %s)", state.kept_notice)
        self.finish(json.dumps(state.view()))


# -- Stop now, through the hub ----------------------------------------------------------------------

def _hub_env() -> tuple[str, str, str, str] | None:
    api, token, user = (os.environ.get(k, "") for k in ("JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN",
                                                         "JUPYTERHUB_USER"))
    if not (api and token and user):
        return None
    return api.rstrip("/"), token, user, os.environ.get("JUPYTERHUB_SERVER_NAME", "")


def may_delete(scopes: Any, user: str, server: str) -> bool:
    """Whether a token's scopes (as GET /hub/api/user lists them) let it stop this server."""
    if not isinstance(scopes, list):
        return False
    wanted = {"delete:servers", "servers", f"delete:servers!user={user}", f"servers!user={user}",
              f"delete:servers!server={user}/{server}", f"servers!server={user}/{server}"}
    return any(s in wanted for s in scopes)


_can_stop: dict[str, bool] = {}  # the answer for this server's token (it does not change while it runs)


def stop_possible() -> bool | None:
    """True/False once asked of the hub (GET api/reaper/stop), None before or outside a hub."""
    env = _hub_env()
    return _can_stop.get(env[1]) if env else None


async def _hub(method: str, url: str, token: str, seconds: float = 20) -> tuple[int, Any]:
    req = HTTPRequest(url, method=method, headers={"Authorization": f"token {token}",
                                                    "Accept": "application/json"},
                      request_timeout=seconds, allow_nonstandard_methods=True)
    try:
        resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    except (HTTPClientError, OSError) as e:
        return 0, str(e)
    try:
        body = json.loads(resp.body or b"null")
    except ValueError:
        body = None
    return resp.code, body


async def check_stop() -> tuple[bool, str]:
    """(allowed, why not): asks the hub which scopes this server's own token holds."""
    env = _hub_env()
    if env is None:
        return False, "this server does not run under JupyterHub"
    api, token, user, server = env
    if token in _can_stop:
        ok = _can_stop[token]
    else:
        status, model = await _hub("GET", api + "/user", token)
        if status != 200 or not isinstance(model, dict):
            return False, f"the hub did not answer which scopes this server holds (HTTP {status})"
        ok = _can_stop[token] = may_delete(model.get("scopes"), user, server)
    if not ok:
        # (JupyterLab shows at most 140 characters: the why in the log, the what to do in Lab)
        log.warning("jupyterhub-reaper: this server's token lacks delete:servers for it (Spawner.server_token_"
                    "scopes): Stop now in JupyterLab refers the user to the hub's control panel")
        return False, "this hub does not allow it: use File > Hub Control Panel > Stop My Server"
    return True, ""


class StopHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        ok, why = await check_stop()
        self._send(200, {"can_stop": ok, "message": why or None})

    @web.authenticated
    async def post(self) -> None:
        ok, why = await check_stop()
        env = _hub_env()
        if not ok or env is None:
            self._send(403, {"message": why})
            return
        api, token, user, server = env
        path = f"/users/{quote(user, safe='')}/" + (f"servers/{quote(server, safe='')}" if server else "server")
        self._send(202, {"message": "stopping this server through the hub"})
        # after the answer went out: the hub's stop ends this very process
        self.log.info("jupyterhub-reaper: Stop now pressed in JupyterLab: asking the hub to stop this server")
        asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self._stop(api + path, token)))

    async def _stop(self, url: str, token: str) -> None:
        status, body = await _hub("DELETE", url, token, seconds=120)
        if status not in (202, 204):
            self.log.error("jupyterhub-reaper: the hub refused Stop now: HTTP %s %s", status, body)


PATHS = ("api/reaper/notice", "api/reaper/keep", "api/reaper/stop")


def handlers() -> list[tuple[str, type[web.RequestHandler]]]:
    """(path relative to base_url, handler): the companion's HANDLER_MODULES protocol."""
    return list(zip(PATHS, (NoticeHandler, KeepHandler, StopHandler), strict=True))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "reaper.singleuser.notice"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    base_url = web_app.settings.get("base_url", "/")
    web_app.settings.setdefault(SETTING, NoticeState())
    web_app.add_handlers(".*$", [(url_path_join(base_url, p), h) for p, h in handlers()])
    serverapp.log.info("jupyterhub-reaper: the pending notice for JupyterLab at %sapi/reaper/notice", base_url)


load_jupyter_server_extension = _load_jupyter_server_extension
