"""The companion jupyter_server extension: it runs in the USER's single-user environment.

    pip install 'jupyterhub-reaper[singleuser]'       # enabled by jupyter_server_config.d/jupyterhub_reaper.json
    jupyter server extension enable reaper.singleuser # or by hand

It serves ``GET <base_url>api/reaper/activity`` (reaper/singleuser/activity.py), what this server's job is
running, for the reaper's probe; that request never counts as activity.

Import rule (tests/unit/test_boundaries.py): this package imports only the standard library, tornado,
jupyter_server, psutil and itself: the user's environment has neither the reaper's dependencies nor its
configuration.

Every module named in HANDLER_MODULES has ``handlers() -> list[(path, handler class)]``, paths relative to
the server's base_url (e.g. "api/reaper/activity"). Adding one is one line here; a module that fails to
import or to answer is logged and skipped, so the others are still served.
"""

from __future__ import annotations

import importlib
import os
import uuid
from typing import Any

HANDLER_MODULES: tuple[str, ...] = (
    "reaper.singleuser.activity",
    "reaper.singleuser.notice",  # the pending notice for JupyterLab, keep and stop (issue 15)
)

# Set in the server's own environment when the extension loads (before any kernel or terminal starts):
# every process the server starts inherits it, also once reparented (nohup, new sessions), so the
# activity scan recognises this server's processes among the user's others.
MARKER = "JUPYTERHUB_REAPER_SERVER"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "reaper.singleuser"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    # always our own value: a server started from another server's terminal inherited the other's
    os.environ[MARKER] = f"{os.getpid()}-{uuid.uuid4().hex}"
    web_app = serverapp.web_app
    base_url = web_app.settings.get("base_url", "/")
    routes = []
    for name in HANDLER_MODULES:
        try:
            module = importlib.import_module(name)
            routes += [(url_path_join(base_url, path), handler) for path, handler in module.handlers()]
        except Exception:
            serverapp.log.exception("jupyterhub-reaper companion: %s not loaded", name)
    web_app.add_handlers(".*$", routes)
    serverapp.log.info("jupyterhub-reaper companion: serving %s", ", ".join(p for p, _ in routes) or "nothing")


# the name jupyter_server looked for before 2.0 (and `jupyter server extension list` still accepts)
load_jupyter_server_extension = _load_jupyter_server_extension
