"""The companion in single-user servers of a real JupyterHub (hub/jupyterhub_config.py, local spawner, run from
this venv with this checkout on PYTHONPATH): the reaper's service token (access:servers) is accepted at the
server's own address, a token without access to that server is refused (403, by the hub's identity provider),
probing moves neither the server's last_activity nor the hub's after its activity reports, and
RealHub(companion=False) runs servers without it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime

import httpx
import pytest

from tests.harness.hub import RealHub

pytestmark = pytest.mark.integration


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture(scope="module")
def alice(real_hub: RealHub) -> Iterator[str]:
    real_hub.create_user("cmp-alice")
    real_hub.start_server("cmp-alice")
    yield "cmp-alice"
    real_hub.stop_server("cmp-alice")


def _settled(hub: RealHub, user: str) -> datetime:
    """The hub's last_activity of the server once it has not moved for 3 activity intervals."""
    last, since, deadline = hub.hub_last_activity(user), time.monotonic(), time.monotonic() + 60
    while time.monotonic() - since < 3 * hub.activity_interval:
        assert time.monotonic() < deadline, f"hub last_activity of {user} kept moving for 60 s"
        time.sleep(0.5)
        now = hub.hub_last_activity(user)
        if now != last:
            last, since = now, time.monotonic()
    assert last is not None
    return last


def test_the_reapers_token_is_accepted_and_the_report_names_the_servers_kernels(real_hub: RealHub, alice: str) -> None:
    kid = real_hub.start_kernel(alice)
    url = real_hub.direct_url(alice) + "api/reaper/activity"
    real_hub.wait_for(lambda: isinstance(
        [k for k in httpx.get(url, headers=_auth(real_hub.service_token)).json()["kernels"] if k["id"] == kid][0]["pid"],
        int), what="the kernel's process")
    r = httpx.get(url, headers=_auth(real_hub.service_token))
    assert r.status_code == 200
    report = r.json()
    assert report["version"] == 1 and report["server"]["pid"] == real_hub.server_model(alice)["state"]["pid"]
    (kernel,) = [k for k in report["kernels"] if k["id"] == kid]
    assert kernel["name"] == "python3" and kernel["pid"] not in [p["pid"] for p in report["processes"]]
    r = real_hub.user_api("DELETE", alice, f"kernels/{kid}")
    assert r.status_code == 204


def test_a_token_without_access_to_the_server_is_refused(real_hub: RealHub, alice: str) -> None:
    real_hub.create_user("cmp-bob")
    r = real_hub.api("POST", "users/cmp-bob/tokens", json={"note": "companion test"})
    assert r.status_code == 201, r.text
    bobs = r.json()["token"]
    assert real_hub.api("GET", "user", token=bobs).json()["name"] == "cmp-bob"  # a valid token, of someone else
    url = real_hub.direct_url(alice) + "api/reaper/activity"
    assert httpx.get(url, headers=_auth(bobs)).status_code == 403
    assert httpx.get(url, headers=_auth("0" * 32)).status_code == 403
    assert httpx.get(url).status_code == 403
    assert httpx.get(url, headers=_auth(real_hub.service_token)).status_code == 200


def test_probing_moves_neither_the_servers_last_activity_nor_the_hubs(real_hub: RealHub, alice: str) -> None:
    direct = real_hub.direct_url(alice)
    auth = _auth(real_hub.service_token)

    def server_activity() -> str:
        return httpx.get(f"{direct}api/status", params={"no_track_activity": "1"}, headers=auth).json()["last_activity"]

    before = _settled(real_hub, alice)
    status_before = server_activity()
    for _ in range(4):
        for params in ({}, {"no_track_activity": "1"}):
            assert httpx.get(f"{direct}api/reaper/activity", params=params, headers=auth).status_code == 200
        time.sleep(real_hub.activity_interval / 2)
    time.sleep(2 * real_hub.activity_interval + 1)  # two more activity reports of the server to the hub
    assert server_activity() == status_before
    assert real_hub.hub_last_activity(alice) == before

    # control: an ordinary API request at the same address moves both (the server reports it to the hub)
    assert httpx.get(f"{direct}api/contents", headers=auth).status_code == 200
    assert server_activity() > status_before
    real_hub.wait_for(lambda: (real_hub.hub_last_activity(alice) or before) > before,
                      timeout=6 * real_hub.activity_interval, what="the hub's last_activity to move")


def test_a_hub_started_with_companion_false_runs_servers_without_it(hub_factory: Callable[..., RealHub]) -> None:
    hub = hub_factory(companion=False)
    hub.create_user("cmp-carol")
    hub.start_server("cmp-carol")
    try:
        direct = hub.direct_url("cmp-carol")
        assert httpx.get(f"{direct}api/status", headers=_auth(hub.service_token)).status_code == 200
        assert httpx.get(f"{direct}api/reaper/activity", headers=_auth(hub.service_token)).status_code == 404
    finally:
        hub.stop_server("cmp-carol")
        hub.stop()
