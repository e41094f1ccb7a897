"""The hub's and the single-user servers' JSON models -> the core's dataclasses. Pure: no I/O.

Malformed data raises (ValueError / TypeError / KeyError): a timestamp that cannot be read is never
taken for "no activity".

What differs between the hubs and spawners sites run (tests/fixtures/api-jupyterhub-*/):
- JupyterHub 6.x adds ``display_name`` to a server model ("" for the default server; 5.4 has
  none): None unless set, and people are shown the name then;
  both put ``user_options`` at the server model's top level (6.x also takes them nested in a
  spawn request's body, which changes nothing here).
- wrapspawner's ProfilesSpawner nests the real spawner's state: ``{"profile", "child_conf":
  {req_partition, ...}, "child_state": {"job_id", "job_status"}}``, and its user_options are only
  ``{"profile": KEY}``. The server's ``state`` here is the innermost child's (job id, server
  address), and the profile's resource settings (``req_*`` in ``child_conf``) are read as
  user_options under what the user chose, so rules and notices see partition, GPUs and runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from reaper.core.model import HubServer, Kernel
from reaper.units import parse_iso

log = logging.getLogger(__name__)


def quote_segment(value: str) -> str:
    """Quote one path segment the way JupyterHub does (``url_escape_path``): '/' becomes %2F."""
    return quote(value, safe="@~")


def url_path(url: str) -> str:
    """The path part of a server url (a full URL when the hub uses subdomains)."""
    if "://" in url:
        return urlsplit(url).path or "/"
    return url


def parse_time(value: Any) -> datetime | None:
    """A hub timestamp (ISO 8601 with 'Z' or an offset) -> aware UTC datetime; None stays None.

    Raises ValueError for anything else (reaper.units.parse_iso), so that malformed data is never
    taken for "no activity"."""
    return None if value is None else parse_iso(value)


# Spawner settings of a wrapped spawner's profile (child_conf) that say what its job asks for: the
# names batchspawner gives them, read by reaper.units.read_user_options.
_CHILD_RESOURCE_KEYS = frozenset(
    {"req_partition", "req_queue", "req_runtime", "req_memory", "req_nprocs", "req_ngpus", "req_gres"}
)
_MAX_NESTING = 8  # a wrapper of a wrapper ...: more is malformed


def spawner_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the innermost spawner's state, the wrapped profiles' resource settings) of a server's state.

    A plain spawner's state is its own; wrapspawner's keeps the child's under ``child_state`` and
    the profile's settings under ``child_conf`` (outer settings win over inner ones, as the outer
    profile chose the inner spawner). Raises TypeError on a malformed nesting."""
    conf: dict[str, Any] = {}
    inner: Mapping[str, Any] = state
    for _ in range(_MAX_NESTING):
        child = inner.get("child_state")
        if child is None:
            return dict(inner), conf
        if not isinstance(child, dict):
            raise TypeError("child_state is not an object")
        child_conf = inner.get("child_conf") or {}
        if not isinstance(child_conf, dict):
            raise TypeError("child_conf is not an object")
        for k, v in child_conf.items():
            if k in _CHILD_RESOURCE_KEYS:
                conf.setdefault(k, v)
        inner = child
    raise TypeError(f"spawner state nested more than {_MAX_NESTING} levels")


def server_from_model(user_model: Mapping[str, Any], name: str, model: Mapping[str, Any]) -> HubServer:
    """One hub server model (an entry of a user model's ``servers``) -> HubServer.

    Raises ValueError / TypeError / KeyError on malformed data.
    """
    user = user_model["name"]
    if not isinstance(user, str):
        raise TypeError(f"user name is not a string: {user!r}")
    raw_state = model.get("state") or {}
    if not isinstance(raw_state, dict):
        raise TypeError(f"server state of {user}/{name} is not an object")
    state, profile_conf = spawner_state(raw_state)
    user_options = model.get("user_options") or {}
    if not isinstance(user_options, dict):
        raise TypeError(f"user_options of {user}/{name} is not an object")
    if profile_conf:
        user_options = {**profile_conf, **user_options}
    display_name = model.get("display_name")
    groups = user_model.get("groups") or []
    if not isinstance(groups, list):
        raise TypeError(f"groups of {user} is not a list")
    pending = model.get("pending")
    server_url = state.get("server_url")
    target = (
        server_url if isinstance(server_url, str) and server_url.startswith(("http://", "https://")) else None
    )
    server_name = str(model.get("name", name) or "")
    return HubServer(
        user=user,
        name=server_name,
        started=parse_time(model.get("started")),
        last_activity=parse_time(model.get("last_activity")),
        ready=bool(model.get("ready", False)),
        pending=str(pending) if pending is not None else None,
        url=str(model.get("url") or ""),
        user_options=dict(user_options),
        state=dict(state),
        groups=tuple(str(g) for g in groups),
        admin=bool(user_model.get("admin", False)),
        target=target,
        display_name=display_name if isinstance(display_name, str) and display_name.strip() else None,
    )


def servers_from_user(user_model: Mapping[str, Any]) -> list[HubServer]:
    """Every running server (default and named) of one user model.

    A server the hub marks ``stopped: true`` (only listed with include_stopped_servers) is not
    running and is left out; a pending one is kept (the core decides what to do with it).
    """
    if not isinstance(user_model, Mapping) or not isinstance(user_model.get("name"), str):
        raise TypeError("user entry without a name")
    servers = user_model.get("servers")
    if not isinstance(servers, dict):
        raise TypeError(
            f"user {user_model['name']!r} has no 'servers' object (does the token have read:servers?)"
        )
    out: list[HubServer] = []
    for name, model in servers.items():
        if not isinstance(model, dict):
            raise TypeError(f"server {user_model['name']}/{name} is not an object")
        if model.get("stopped") is True:
            log.debug("hub lists %s/%s as stopped; not a running server", user_model["name"], name)
            continue
        out.append(server_from_model(user_model, name, model))
    return out


def kernel_from_model(model: Any) -> Kernel:
    """One entry of a single-user server's ``/api/kernels`` -> Kernel."""
    if not isinstance(model, dict):
        raise TypeError("kernel is not an object")
    kid, name, state = model.get("id"), model.get("name"), model.get("execution_state")
    if not isinstance(kid, str) or not isinstance(state, str):
        raise TypeError("kernel without id or execution_state")
    conns = model.get("connections", 0)
    if not isinstance(conns, int) or isinstance(conns, bool):
        raise TypeError("kernel connections is not an integer")
    return Kernel(
        id=kid,
        name=str(name or ""),
        execution_state=state,
        connections=conns,
        last_activity=parse_time(model.get("last_activity")),
    )
