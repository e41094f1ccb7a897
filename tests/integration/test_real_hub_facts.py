"""Facts about a real JupyterHub 6.1 + jupyter_server 2.21 that the reaper depends on.

Real parts started: JupyterHub (hub/jupyterhub_config.py, local spawner), configurable-http-proxy,
single-user servers and ipykernel kernels. Each test fails if the fact it names is false.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime

import httpx
import pytest

from tests.harness.hub import PAGINATION_ACCEPT, REAPER_SCOPES, RealHub, parse_time

pytestmark = pytest.mark.integration


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture(scope="module")
def alice(real_hub: RealHub) -> Iterator[str]:
    """A user in group 'physics' with a running default server."""
    real_hub.create_user("facts-alice", groups=["physics"])
    real_hub.start_server("facts-alice")
    yield "facts-alice"
    real_hub.stop_server("facts-alice")


def test_active_users_listing_is_paginated_and_shows_spawner_state_to_the_reaper(
    real_hub: RealHub, alice: str
) -> None:
    r = real_hub.api(
        "GET",
        "users",
        token=real_hub.service_token,
        params={"state": "active"},
        headers={"Accept": PAGINATION_ACCEPT},
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body["_pagination"]) >= {"offset", "limit", "total", "next"}
    users = {u["name"]: u for u in body["items"]}
    assert alice in users
    user = users[alice]
    assert user["groups"] == ["physics"]  # read:users:groups
    server = user["servers"][""]
    assert server["ready"] is True
    assert parse_time(server["started"]) is not None
    assert parse_time(server["last_activity"]) is not None
    # admin:server_state: the spawner's state is visible (local spawner: its pid; Slurm: job_id)
    assert isinstance(server["state"], dict) and server["state"].get("pid")


def test_active_filter_leaves_out_users_without_a_running_server(real_hub: RealHub, alice: str) -> None:
    real_hub.create_user("facts-idle")
    r = real_hub.api(
        "GET",
        "users",
        token=real_hub.service_token,
        params={"state": "active"},
        headers={"Accept": PAGINATION_ACCEPT},
    )
    names = {u["name"] for u in r.json()["items"]}
    assert alice in names and "facts-idle" not in names


def test_proxy_route_table_gives_the_reaper_each_servers_own_address(real_hub: RealHub, alice: str) -> None:
    r = real_hub.api("GET", "proxy", token=real_hub.service_token)
    assert r.status_code == 200
    routes = r.json()
    route = routes[f"/user/{alice}/"]
    assert route["data"]["user"] == alice and route["data"]["server_name"] == ""
    target = httpx.URL(route["target"])
    assert target.host == "127.0.0.1"
    # the server's own port: neither the proxy's public port nor the hub's
    assert target.port not in (real_hub.public_port, real_hub.hub_port, None)
    # and it really is that server: it answers under the user's prefix
    status = httpx.get(f"{route['target']}/user/{alice}/api/status", headers=_auth(real_hub.service_token))
    assert status.status_code == 200


def test_server_answers_the_reaper_token_directly_at_its_own_address(real_hub: RealHub, alice: str) -> None:
    direct = real_hub.direct_url(alice)
    assert not direct.startswith(real_hub.base_url)
    status = httpx.get(f"{direct}api/status", headers=_auth(real_hub.service_token))
    assert status.status_code == 200
    assert set(status.json()) >= {"connections", "kernels", "last_activity", "started"}
    kernels = httpx.get(
        f"{direct}api/kernels", params={"no_track_activity": "1"}, headers=_auth(real_hub.service_token)
    )
    assert kernels.status_code == 200
    assert isinstance(kernels.json(), list)
    # the answer depends on the token: without one the same request is refused
    anonymous = httpx.get(f"{direct}api/kernels", params={"no_track_activity": "1"})
    assert anonymous.status_code in (401, 403)


def test_open_kernel_websocket_counts_as_one_connection_and_closing_it_as_zero(
    real_hub: RealHub, alice: str
) -> None:
    kid = real_hub.start_kernel(alice)
    ws = real_hub.open_kernel_ws(alice, kid)
    try:
        real_hub.wait_for(
            lambda: real_hub.kernel(alice, kid)["connections"] == 1, 10, what="connections == 1"
        )
        assert real_hub.kernel(alice, kid)["execution_state"] == "idle"
    finally:
        ws.close()
    real_hub.wait_for(lambda: real_hub.kernel(alice, kid)["connections"] == 0, 10, what="connections == 0")
    real_hub.user_api("DELETE", alice, f"kernels/{kid}")


def test_silent_computation_shows_as_busy_kernel(real_hub: RealHub, alice: str) -> None:
    kid = real_hub.start_kernel(alice)
    ws = real_hub.open_kernel_ws(alice, kid)
    try:
        real_hub.execute(ws, "import time; time.sleep(20)")
        real_hub.wait_for(
            lambda: real_hub.kernel(alice, kid)["execution_state"] == "busy", 10, what="execution_state busy"
        )
        # still busy a moment later: it is the computation, not a status blip
        time.sleep(1)
        assert real_hub.kernel(alice, kid)["execution_state"] == "busy"
    finally:
        ws.close()
        real_hub.user_api("DELETE", alice, f"kernels/{kid}")


def _status(hub: RealHub, user: str) -> dict:
    r = httpx.get(f"{hub.direct_url(user)}api/status", params={"no_track_activity": "1"},
                  headers=_auth(hub.service_token))
    assert r.status_code == 200
    return r.json()


def test_status_last_activity_stands_still_until_a_kernel_message_even_with_no_browser(
    real_hub: RealHub, alice: str
) -> None:
    """What probe.confirm_with_status relies on: a server detached at its last look whose
    /api/status last_activity has not moved since has had no kernel message (a kernel goes busy
    with one) and no request. Here the kernel is driven over ZMQ by a client on the node (no
    websocket, no HTTP request): its messages still move the status. A kernel's shutdown does not,
    but the kernel count shows it."""
    from jupyter_client import BlockingKernelClient

    kid = real_hub.start_kernel(alice)
    ws = real_hub.open_kernel_ws(alice, kid)  # started and idle
    ws.close()
    real_hub.wait_for(lambda: _status(real_hub, alice)["connections"] == 0, 10, what="connections == 0")
    time.sleep(1)
    still = _status(real_hub, alice)
    for _ in range(3):  # probes do not move it, nor does anything else while nothing happens
        time.sleep(1)
        again = _status(real_hub, alice)
        assert again["last_activity"] == still["last_activity"] and again["kernels"] == still["kernels"]

    [conn] = list(real_hub.workdir.rglob(f"kernel-{kid}.json"))  # the kernel's connection file
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.execute("import time; time.sleep(3)")
        real_hub.wait_for(lambda: real_hub.kernel(alice, kid)["execution_state"] == "busy", 10,
                          what="busy through ZMQ alone")
        busy = _status(real_hub, alice)
        assert busy["connections"] == 0  # no browser, no websocket
        assert parse_time(busy["last_activity"]) > parse_time(still["last_activity"])
    finally:
        kc.stop_channels()
    real_hub.wait_for(lambda: real_hub.kernel(alice, kid)["execution_state"] == "idle", 15, what="idle again")
    before_shutdown = _status(real_hub, alice)
    time.sleep(1)
    r = httpx.delete(f"{real_hub.direct_url(alice)}api/kernels/{kid}", params={"no_track_activity": "1"},
                     headers=_auth(real_hub.admin_token))
    assert r.status_code == 204
    after = _status(real_hub, alice)
    # A shutdown asked with no_track_activity does NOT move it (jupyter_server 2.21, whatever its
    # docstring says): only the kernel count shows it, which is why the count is compared too.
    assert after["kernels"] == before_shutdown["kernels"] - 1
    assert after["last_activity"] == before_shutdown["last_activity"]


def test_reaper_role_has_exactly_the_documented_scopes(real_hub: RealHub) -> None:
    me = real_hub.api("GET", "user", token=real_hub.service_token)
    assert me.status_code == 200
    model = me.json()
    assert model["kind"] == "service" and model["name"] == "reaper"
    # the hub reports scopes expanded: list:users and read:servers imply read:users:name
    assert set(model["scopes"]) == REAPER_SCOPES | {"read:users:name"}
    service = real_hub.api("GET", "services/reaper").json()
    assert service["roles"] == ["reaper"]


def test_reaper_token_cannot_start_servers_or_touch_users(real_hub: RealHub) -> None:
    real_hub.create_user("facts-bob")
    start = real_hub.api("POST", "users/facts-bob/server", token=real_hub.service_token)
    assert start.status_code == 403
    delete = real_hub.api("DELETE", "users/facts-bob", token=real_hub.service_token)
    assert delete.status_code == 403
    assert real_hub.server_model("facts-bob") is None


def _hub_activity_settled(hub: RealHub, user: str) -> datetime:
    """Wait until the hub's last_activity for the server stops moving for 3 activity intervals."""
    last = hub.hub_last_activity(user)
    stable_since = time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() - stable_since < 3 * hub.activity_interval:
        if time.monotonic() > deadline:
            pytest.fail(f"hub last_activity of {user} kept moving for 30 s")
        time.sleep(0.5)
        now = hub.hub_last_activity(user)
        if now != last:
            last, stable_since = now, time.monotonic()
    assert last is not None
    return last


def test_probing_the_servers_own_address_leaves_hub_activity_alone_but_the_proxy_moves_it(
    real_hub: RealHub,
) -> None:
    user = "facts-carol"
    real_hub.create_user(user)
    real_hub.start_server(user)
    try:
        before = _hub_activity_settled(real_hub, user)
        direct = real_hub.direct_url(user)
        for _ in range(4):
            for path in ("status", "kernels", "terminals", "sessions"):
                r = httpx.get(
                    f"{direct}api/{path}",
                    params={"no_track_activity": "1"},
                    headers=_auth(real_hub.service_token),
                )
                assert r.status_code == 200, path
            time.sleep(real_hub.activity_interval / 2)
        # two more hub activity polls after the last probe
        time.sleep(2 * real_hub.activity_interval + 1)
        assert real_hub.hub_last_activity(user) == before

        # control: the same probe through the proxy does count as activity
        r = real_hub.user_api(
            "GET", user, "kernels", token=real_hub.service_token, params={"no_track_activity": "1"}
        )
        assert r.status_code == 200
        real_hub.wait_for(
            lambda: (real_hub.hub_last_activity(user) or before) > before,
            timeout=6 * real_hub.activity_interval,
            what="hub last_activity moved after a proxied request",
        )
    finally:
        real_hub.stop_server(user)


def _login(hub: RealHub, user: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=hub.base_url) as browser:
        browser.get("/hub/login")
        xsrf = browser.cookies.get("_xsrf", path="/hub/")
        return browser.post(
            "/hub/login",
            data={"username": user, "password": password, "_xsrf": xsrf or ""},
            follow_redirects=False,
        )


def test_users_log_in_with_the_shared_password_and_not_without_it(real_hub: RealHub) -> None:
    ok = _login(real_hub, "facts-dave", real_hub.password)
    assert ok.status_code == 302
    assert "jupyterhub-hub-login" in ok.cookies  # the hub's login cookie: the user is logged in
    wrong = _login(real_hub, "facts-erin", real_hub.password + "x")
    assert wrong.status_code == 403


def test_reaper_is_a_service_the_hub_does_not_run_unless_managed(
    real_hub: RealHub, hub_factory: Callable[..., RealHub]
) -> None:
    unmanaged = real_hub.api("GET", "services/reaper").json()
    assert not unmanaged["command"] and not unmanaged.get("pid")
    managed_hub = hub_factory(managed=True, reaper_config=real_hub.workdir / "reaper.yaml")
    try:
        managed = managed_hub.api("GET", "services/reaper").json()
        assert managed["command"][1:] == [
            "-m",
            "reaper.cli",
            "run",
            "--config",
            str(real_hub.workdir / "reaper.yaml"),
        ]
        assert managed["roles"] == ["reaper"]
    finally:
        managed_hub.stop()
