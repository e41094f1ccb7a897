"""A stop under Authenticator.refresh_pre_stop, on real JupyterHub 5.4.x and 6.x.

Real parts started: one JupyterHub per version (local spawner) from the shipped config with an
authenticator whose refresh_user cannot refresh (stale auth), and refresh_pre_stop on. The reaper's
HubClient asks for the stops, as the sweep and the page do.
"""

from __future__ import annotations

import pytest

from reaper.hub import HubClient
from reaper.stops import StopOutcome
from tests.harness.hub import HUB_CONFIG, HUB_VERSIONS

pytestmark = pytest.mark.integration

STALE_AUTH = """
import os
load_subconfig(os.environ["BASE_CFG"])
c = get_config()  # noqa: F821
from jupyterhub.authenticators.shared import SharedPasswordAuthenticator
class StaleAuth(SharedPasswordAuthenticator):
    async def refresh_user(self, user, handler=None):
        # stale, and it cannot be refreshed without a new login: at a stop (the server's own API
        # calls while it starts are left fresh, or 5.4 would refuse those too and slow the start)
        if handler is not None and handler.request.method == "DELETE":
            return False
        return True
c.JupyterHub.authenticator_class = StaleAuth
c.Authenticator.refresh_pre_stop = True
"""


@pytest.mark.parametrize("version", HUB_VERSIONS, ids=lambda v: f"hub{v}")
async def test_stale_auth_never_blocks_the_reapers_stop_and_a_refusal_is_told_apart(version, hub_factory, tmp_path):
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(STALE_AUTH)
    hub = hub_factory(config_file=cfg, version=version, extra_env={"BASE_CFG": str(HUB_CONFIG)})
    try:
        user = "stale-auth"
        hub.create_user(user)
        reaper = HubClient(hub.api_url, hub.service_token)
        own = hub.api("POST", f"users/{user}/tokens", json={"note": "own"}).json()["token"]
        as_user = HubClient(hub.api_url, own)
        try:
            hub.start_server(user)
            if version == "5.4":
                # the user's own token is refused (403): the reaper tells it apart from a failure;
                # 6.x lets a token request through unless auth_refresh_strict (recorded in
                # tests/fixtures/stop_under_refresh_pre_stop.json)
                result = await as_user.stop(user)
                assert StopOutcome(result.outcome) is StopOutcome.REFUSED, result
                assert result.status == 403 and "refresh_pre_stop" in result.detail
                assert hub.server_model(user) is not None  # refused: still running
            # the reaper (a service) stops it: the hub tried the refresh, warns of the stale auth
            # and stops anyway (5.4: "Stopping anyway"; 6.x: "cannot refresh on cross-user requests")
            offset = hub.log_size()
            result = await reaper.stop(user)
            assert StopOutcome(result.outcome) is StopOutcome.STOPPED, result
            assert f"User {user} has stale auth info" in hub.log_since(offset)
            assert hub.server_model(user) is None
        finally:
            await reaper.aclose()
            await as_user.aclose()
    finally:
        hub.stop()
