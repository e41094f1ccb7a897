"""reaper.hub.HubClient against respx-mocked hub and single-user servers.

Shapes come from real JupyterHub 6.1.1 / jupyter_server 2.21 captures
(/work/shared/fixtures/api-jupyterhub-6.1.1). The real hub remains the final proof (integration tests).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from reaper.core.model import HubServer
from reaper.hub import (
    PAGINATION_MEDIA_TYPE,
    HubClient,
    HubError,
    HubListingError,
    HubOptions,
    ProbeOptions,
    StopResult,
)

FIX = Path(
    os.environ.get(
        "REAPER_API_FIXTURES",
        Path(__file__).resolve().parents[1] / "fixtures" / "api-jupyterhub-6.1.1",
    )
)
API = "http://hub.internal:8081/hub/api"
PUBLIC = "https://hub.example.org"
TOKEN = "s3cr3t-service-token-0123456789abcdef"


def fixture(name: str) -> Any:
    return json.loads((FIX / name).read_text())


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as mock:
        yield mock


@pytest.fixture
async def hub() -> AsyncIterator[HubClient]:
    async with HubClient(API, TOKEN, HubOptions(http="httpx", backoff=0, retries=3, page_size=50),
                         ProbeOptions(public_url=PUBLIC)) as client:
        yield client


def user_model(name: str, servers: dict[str, dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """A user model shaped like the real fixture, with the given servers."""
    base = copy.deepcopy(fixture("users_state_active.json")[0])
    template = base["servers"][""]
    base.update(name=name, server=f"/user/{name}/", **kw)
    base["servers"] = {}
    for sname, over in servers.items():
        srv = copy.deepcopy(template)
        url = f"/user/{name}/{sname}/" if sname else f"/user/{name}/"
        srv.update(name=sname, full_name=f"{name}/{sname}", url=url)
        srv.update(over)
        base["servers"][sname] = srv
    return base


def page(items: list[Any], offset: int, limit: int, total: int) -> dict[str, Any]:
    nxt = None
    if offset + limit < total:
        nxt = {
            "offset": offset + limit,
            "limit": limit,
            "url": f"http://127.0.0.1:8081/hub/api/users?state=active&offset={offset + limit}&limit={limit}",
        }
    return {"items": items, "_pagination": {"offset": offset, "limit": limit, "total": total, "next": nxt}}


def running(user: str = "alice", name: str = "", **kw: Any) -> HubServer:
    url = f"/user/{user}/{name}/" if name else f"/user/{user}/"
    base: dict[str, Any] = dict(
        user=user,
        name=name,
        started=datetime(2026, 11, 25, 20, 0, tzinfo=UTC),
        last_activity=None,
        url=url,
    )
    base.update(kw)
    return HubServer(**base)


def probe_routes(
    router: respx.MockRouter, base: str, *, status: Any = None, kernels: Any = None, terminals: Any = None
) -> dict[str, respx.Route]:
    kernels = fixture("su_GET_api_kernels_after.json") if kernels is None else kernels
    if status is None:  # the real status answer, made consistent with the kernels listed
        status = dict(fixture("su_GET_api_status.json"))
        status["kernels"] = len(kernels) if isinstance(kernels, list) else 1
    terminals = [] if terminals is None else terminals
    return {
        "status": router.get(base + "api/status").mock(return_value=_resp(status)),
        "kernels": router.get(base + "api/kernels").mock(return_value=_resp(kernels)),
        "terminals": router.get(base + "api/terminals").mock(return_value=_resp(terminals)),
    }


def _resp(body: Any) -> httpx.Response:
    return body if isinstance(body, httpx.Response) else httpx.Response(200, json=body)


# --- listing ------------------------------------------------------------------------------


async def test_real_paginated_listing_becomes_hub_servers_with_aware_utc_times(router, hub):
    route = router.get(f"{API}/users").mock(
        return_value=httpx.Response(200, json=fixture("users_state_active_paginated.json"))
    )
    servers = await hub.list_active_servers()

    assert servers == [
        HubServer(
            user="probeuser",
            name="",
            started=datetime(2026, 11, 25, 20, 11, 18, 483453, tzinfo=UTC),
            last_activity=datetime(2026, 11, 25, 20, 11, 20, 807385, tzinfo=UTC),
            ready=True,
            pending=None,
            url="/user/probeuser/",
            user_options={},
            state={"job_id": "3", "job_status": "RUNNING vm"},
            groups=(),
            admin=False,
            target=None,
        )
    ]
    assert servers[0].job_id == "3"
    assert servers[0].started.utcoffset().total_seconds() == 0
    request = route.calls.last.request
    assert request.headers["Accept"] == PAGINATION_MEDIA_TYPE
    assert dict(request.url.params) == {"state": "active", "offset": "0", "limit": "50"}


async def test_plain_list_answer_of_older_hubs_is_accepted(router, hub):
    plain = fixture("users_state_active.json")

    def answer(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params["offset"])
        return httpx.Response(200, json=plain[offset:])

    route = router.get(f"{API}/users").mock(side_effect=answer)
    servers = await hub.list_active_servers()
    assert [(s.user, s.name, s.job_id) for s in servers] == [("probeuser", "", "3")]
    # walked on to the next offset and stopped at the empty page
    assert [c.request.url.params["offset"] for c in route.calls] == ["0", "1"]


async def test_plain_list_from_a_hub_that_ignores_offset_terminates(router, hub):
    route = router.get(f"{API}/users").mock(
        return_value=httpx.Response(200, json=fixture("users_state_active.json"))
    )
    servers = await hub.list_active_servers()
    assert [s.user for s in servers] == ["probeuser"]
    assert route.call_count == 2  # the repeat shows nothing new, so the walk stops


async def test_listing_follows_next_over_three_pages_and_keeps_named_and_pending_servers(router, hub):
    users = [
        user_model("u1", {"": {}}),
        user_model("u2", {"": {}, "gpu": {"pending": "spawn", "ready": False, "last_activity": None}}),
        user_model("u3", {"": {"pending": "stop"}}, groups=["lab-a", "gpu-users"], admin=True),
        user_model("u4", {"gpu": {"user_options": {"partition": "gpu"}}}),
        user_model("u5", {"": {"state": None}}),
    ]
    pages = {0: page(users[0:2], 0, 2, 5), 2: page(users[2:4], 2, 2, 5), 4: page(users[4:], 4, 2, 5)}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[int(request.url.params["offset"])])

    route = router.get(f"{API}/users").mock(side_effect=answer)
    streamed = [p async for p in hub.iter_active_servers()]

    assert [[s.label for s in p] for p in streamed] == [["u1", "u2", "u2/gpu"], ["u3", "u4/gpu"], ["u5"]]
    assert [(c.request.url.params["offset"], c.request.url.params["limit"]) for c in route.calls] == [
        ("0", "50"),
        ("2", "2"),
        ("4", "2"),
    ]
    flat = {s.label: s for p in streamed for s in p}
    assert flat["u2/gpu"].pending == "spawn" and flat["u2/gpu"].ready is False
    assert flat["u2/gpu"].last_activity is None
    assert flat["u2/gpu"].url == "/user/u2/gpu/"
    assert flat["u3"].pending == "stop"
    assert flat["u3"].groups == ("lab-a", "gpu-users") and flat["u3"].admin is True
    assert flat["u4/gpu"].user_options == {"partition": "gpu"}
    assert flat["u5"].state == {}


async def test_page_two_that_keeps_failing_with_500_raises_listing_error_after_retries(router, hub):
    first = page([user_model("u1", {"": {}}), user_model("u2", {"": {}})], 0, 2, 4)
    calls = {"0": 0, "2": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        offset = request.url.params["offset"]
        calls[offset] += 1
        if offset == "0":
            return httpx.Response(200, json=first)
        return httpx.Response(500, text="Internal Server Error")

    router.get(f"{API}/users").mock(side_effect=answer)
    got: list[list[HubServer]] = []
    with pytest.raises(HubListingError, match="HTTP 500") as err:
        async for p in hub.iter_active_servers():
            got.append(p)
    assert calls == {"0": 1, "2": 4}  # 1 try + 3 retries on page 2
    assert err.value.status == 500
    assert len(got) == 1  # page 1 was streamed; the caller learns the listing failed

    with pytest.raises(HubListingError):
        await hub.list_active_servers()


async def test_listing_503_then_200_is_retried_and_succeeds(router, hub):
    route = router.get(f"{API}/users").mock(
        side_effect=[
            httpx.Response(503, text="busy"),
            httpx.ConnectError("refused"),
            httpx.Response(200, json=fixture("users_state_active_paginated.json")),
        ]
    )
    servers = await hub.list_active_servers()
    assert [s.user for s in servers] == ["probeuser"]
    assert route.call_count == 3


async def test_listing_403_is_not_retried_and_raises_listing_error(router, hub):
    route = router.get(f"{API}/users").mock(return_value=httpx.Response(403, json={"message": "no"}))
    with pytest.raises(HubListingError, match="HTTP 403"):
        await hub.list_active_servers()
    assert route.call_count == 1


async def test_listing_that_does_not_add_up_to_the_total_raises(router, hub):
    # the hub says 3 users but the last page says there is no next one after 2
    short = page([user_model("u1", {"": {}}), user_model("u2", {"": {}})], 0, 50, 3)
    short["_pagination"]["next"] = None
    router.get(f"{API}/users").mock(return_value=httpx.Response(200, json=short))
    with pytest.raises(HubListingError, match="received 2 users but the hub counts 3"):
        await hub.list_active_servers()


async def test_listing_whose_total_changes_between_pages_raises(router, hub):
    pages = {
        0: page([user_model("u1", {"": {}})], 0, 1, 2),
        1: page([user_model("u2", {"": {}})], 1, 1, 3),
    }
    pages[1]["_pagination"]["next"] = None
    router.get(f"{API}/users").mock(
        side_effect=lambda r: httpx.Response(200, json=pages[int(r.url.params["offset"])])
    )
    with pytest.raises(HubListingError, match="total changed"):
        await hub.list_active_servers()


async def test_listing_without_servers_field_raises_listing_error(router, hub):
    data = fixture("users_state_active_paginated.json")
    del data["items"][0]["servers"]
    router.get(f"{API}/users").mock(return_value=httpx.Response(200, json=data))
    with pytest.raises(HubListingError, match="read:servers"):
        await hub.list_active_servers()


@pytest.mark.parametrize(
    "body",
    [
        "<html>proxy error</html>",
        json.dumps({"items": "nope", "_pagination": {"offset": 0, "limit": 50, "total": 1, "next": None}}),
    ],
)
async def test_listing_garbage_raises_listing_error(router, hub, body):
    router.get(f"{API}/users").mock(return_value=httpx.Response(200, text=body))
    with pytest.raises(HubListingError):
        await hub.list_active_servers()


async def test_listing_with_a_malformed_timestamp_raises_instead_of_guessing(router, hub):
    data = fixture("users_state_active_paginated.json")
    data["items"][0]["servers"][""]["last_activity"] = "yesterday-ish"
    router.get(f"{API}/users").mock(return_value=httpx.Response(200, json=data))
    with pytest.raises(HubListingError, match="malformed"):
        await hub.list_active_servers()


# --- stop -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (httpx.Response(204), "stopped"),
        (httpx.Response(202, text=""), "pending"),
        (httpx.Response(404, json={"status": 404, "message": "Not Found"}), "gone"),
        (httpx.Response(400, json={"status": 400, "message": "alice is not running"}), "gone"),
        (httpx.Response(400, json={"status": 400, "message": "Cannot stop a server while renamed"}), "error"),
        # what JupyterHub 5.4 answers the user's own token under Authenticator.refresh_pre_stop (and
        # 6.x with auth_refresh_strict): tests/fixtures/stop_under_refresh_pre_stop.json
        (httpx.Response(403, json={"status": 403, "message": "Missing or invalid credentials."}), "refused"),
        (httpx.Response(403, json={"status": 403, "message": "Forbidden"}), "refused"),
    ],
)
async def test_stop_maps_hub_answers_to_outcomes(router, hub, response, outcome):
    route = router.delete(f"{API}/users/alice/server").mock(return_value=response)
    result = await hub.stop("alice")
    assert isinstance(result, StopResult)
    assert result.outcome == outcome
    assert result.status == response.status_code
    assert route.call_count == 1  # 2xx/4xx are never retried
    assert result.ok is (outcome in ("stopped", "pending", "gone"))
    if outcome == "refused":
        assert "refresh_pre_stop" in result.detail and "delete:servers" in result.detail


async def test_stop_of_a_named_server_uses_the_servers_path(router, hub):
    named = router.delete(f"{API}/users/alice/servers/gpu").mock(return_value=httpx.Response(204))
    default = router.delete(f"{API}/users/alice/server").mock(return_value=httpx.Response(204))
    assert (await hub.stop("alice", "gpu")).outcome == "stopped"
    assert named.call_count == 1 and default.call_count == 0


async def test_stop_retries_5xx_then_reports_error(router, hub):
    route = router.delete(f"{API}/users/alice/server").mock(return_value=httpx.Response(502))
    result = await hub.stop("alice")
    assert result.outcome == "error" and result.status == 502
    assert route.call_count == 4
    assert "refresh_pre_stop" not in result.detail  # a 502 is the proxy's, not the hub's

    route.mock(return_value=httpx.Response(500, json={"status": 500, "message": "Internal Server Error"}))
    route.reset()
    result = await hub.stop("alice")
    assert result.outcome == "error" and result.status == 500
    assert "refresh_pre_stop" in result.detail  # what the hub answers when the refresh fails

    route.mock(return_value=None, side_effect=[httpx.Response(503), httpx.Response(202)])
    route.reset()
    assert (await hub.stop("alice")).outcome == "pending"
    assert route.call_count == 2


@pytest.mark.parametrize(
    ("user", "server", "raw_path"),
    [
        ("a b", "", b"/hub/api/users/a%20b/server"),
        ("\u00e9lodie", "", b"/hub/api/users/%C3%A9lodie/server"),
        ("x/y", "", b"/hub/api/users/x%2Fy/server"),
        ("alice", "my gpu/2", b"/hub/api/users/alice/servers/my%20gpu%2F2"),
        ("bob@lab.org", "~tmp", b"/hub/api/users/bob@lab.org/servers/~tmp"),
    ],
)
async def test_odd_user_and_server_names_are_url_quoted_in_hub_paths(router, hub, user, server, raw_path):
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(204)

    router.route(method="DELETE").mock(side_effect=answer)
    assert (await hub.stop(user, server)).outcome == "stopped"
    assert seen == [raw_path]


# --- get_server -----------------------------------------------------------------------------


async def test_get_server_returns_the_fresh_named_server_or_none(router, hub):
    model = user_model("x/y", {"": {}, "gpu": {"last_activity": "2026-11-25T21:00:00Z", "pending": "stop"}})
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(200, json=model)

    router.get(url__regex=r".*/users/x%2Fy$").mock(side_effect=answer)
    srv = await hub.get_server("x/y", "gpu")
    assert srv is not None and srv.name == "gpu" and srv.pending == "stop"
    assert srv.last_activity == datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
    assert await hub.get_server("x/y", "other") is None
    assert seen[0] == b"/hub/api/users/x%2Fy"


async def test_get_server_is_none_for_a_stopped_or_unknown_user_and_raises_on_5xx(router, hub):
    router.get(f"{API}/users/probeuser").mock(
        return_value=httpx.Response(200, json=fixture("user_after_cull.json"))
    )
    router.get(f"{API}/users/nobody").mock(return_value=httpx.Response(404))
    flaky = router.get(f"{API}/users/flaky").mock(return_value=httpx.Response(500))
    assert await hub.get_server("probeuser") is None
    assert await hub.get_server("nobody") is None
    with pytest.raises(HubError):
        await hub.get_server("flaky")
    assert flaky.call_count == 4


# --- probes ---------------------------------------------------------------------------------


async def test_direct_probe_goes_to_the_target_with_no_track_activity_and_parses_real_answers(router, hub):
    target = "http://10.0.0.5:53211"
    routes = probe_routes(router, f"{target}/user/alice/")
    public = router.route(host="hub.example.org").mock(return_value=httpx.Response(200, json={}))

    probe = await hub.probe(running(target=target))

    assert probe.ok, probe.error
    assert probe.via == "direct"
    assert probe.status_connections == 0
    assert probe.status_last_activity == datetime(2026, 11, 25, 20, 11, 20, 807385, tzinfo=UTC)
    (kernel,) = probe.kernels
    assert kernel.id == "fd83a956-3502-4c21-89dd-56c80b1108e6"
    assert kernel.name == "python3" and kernel.execution_state == "starting" and kernel.connections == 0
    assert kernel.last_activity == datetime(2026, 11, 25, 20, 11, 27, 237668, tzinfo=UTC)
    assert probe.terminals == 0
    assert public.call_count == 0
    for name in ("status", "kernels", "terminals"):
        request = routes[name].calls.last.request
        assert request.url.params["no_track_activity"] == "1", name
        assert request.headers["Authorization"] == f"token {TOKEN}"


async def test_probe_reads_a_busy_silent_kernel(router, hub):
    busy = fixture("busy_kernel_state.json")
    target = "http://10.0.0.7:40000"
    probe_routes(router, f"{target}/user/alice/gpu/", status=busy["status"], kernels=busy["kernels"])
    probe = await hub.probe(running(name="gpu", target=target))
    assert probe.ok
    assert [k.execution_state for k in probe.kernels] == ["busy"]
    assert probe.status_last_activity == datetime(2026, 11, 25, 20, 15, 5, 140842, tzinfo=UTC)


async def test_probe_counts_terminals_and_tolerates_a_server_without_the_terminals_api(router, hub):
    target = "http://10.0.0.5:1"
    routes = probe_routes(
        router,
        f"{target}/user/alice/",
        terminals=[
            {"name": "1", "last_activity": "2026-11-25T20:00:00Z"},
            {"name": "2", "last_activity": "2026-11-25T20:05:00Z"},
        ],
    )
    probe = await hub.probe(running(target=target))
    assert probe.terminals == 2
    assert probe.terminals_last_activity == datetime(2026, 11, 25, 20, 5, tzinfo=UTC)

    routes["terminals"].mock(return_value=httpx.Response(404))
    probe = await hub.probe(running(target=target))
    assert probe.ok and probe.terminals == 0


async def test_probe_address_comes_from_spawner_state_server_url(router, hub):
    routes = probe_routes(router, "http://node7:39999/user/alice/")
    proxy = router.get(f"{API}/proxy").mock(return_value=httpx.Response(500))
    probe = await hub.probe(running(state={"job_id": "9", "server_url": "http://node7:39999"}))
    assert probe.ok, probe.error
    assert routes["status"].call_count == 1
    assert proxy.call_count == 0  # no need for the proxy table


async def test_probe_address_comes_from_the_proxy_table_fetched_once_per_sweep(router, hub):
    # the shape /hub/api/proxy really answers (paginated dict of routes)
    routes_page = {
        "items": {
            "/": {"routespec": "/", "target": "http://127.0.0.1:8081", "data": {"hub": True}},
            "/user/alice/": {
                "routespec": "/user/alice/",
                "target": "http://127.0.0.1:54321",
                "data": {"user": "alice", "server_name": "", "last_activity": "2026-11-25T20:00:00.000Z"},
            },
            "/user/bob/gpu/": {
                "routespec": "/user/bob/gpu/",
                "target": "http://127.0.0.1:54322",
                "data": {"user": "bob", "server_name": "gpu"},
            },
        },
        "_pagination": {"offset": 0, "limit": 50, "total": 3, "next": None},
    }
    proxy = router.get(f"{API}/proxy").mock(return_value=httpx.Response(200, json=routes_page))
    alice = probe_routes(router, "http://127.0.0.1:54321/user/alice/")
    bob = probe_routes(router, "http://127.0.0.1:54322/user/bob/gpu/")

    assert await hub.refresh_targets() == 2  # alice's and bob's routes (the hub's own has no user)
    assert await hub.target_for(running("alice")) == "http://127.0.0.1:54321"
    assert proxy.calls.last.request.headers["Accept"] == PAGINATION_MEDIA_TYPE
    p1, p2 = await asyncio.gather(hub.probe(running("alice")), hub.probe(running("bob", "gpu")))
    assert p1.ok and p2.ok, (p1.error, p2.error)
    assert alice["kernels"].call_count == 1 and bob["kernels"].call_count == 1
    assert proxy.call_count == 1


async def test_direct_probe_without_any_address_fails_and_never_falls_back_to_the_proxy(router, hub):
    router.get(f"{API}/proxy").mock(
        return_value=httpx.Response(
            200, json={"items": {}, "_pagination": {"offset": 0, "limit": 50, "total": 0, "next": None}}
        )
    )
    public = router.route(host="hub.example.org").mock(return_value=httpx.Response(200, json={}))
    probe = await hub.probe(running())
    assert not probe.ok
    assert probe.error is not None and probe.error.startswith("no server address")
    assert public.call_count == 0


async def test_proxy_table_forbidden_makes_probes_fail_with_the_reason(router, hub):
    router.get(f"{API}/proxy").mock(return_value=httpx.Response(403, json={"message": "Forbidden"}))
    probe = await hub.probe(running())
    assert not probe.ok and "HTTP 403" in (probe.error or "")


async def test_probe_via_proxy_is_opt_in_and_uses_the_public_url(router):
    routes = probe_routes(router, f"{PUBLIC}/user/alice/")
    async with HubClient(API, TOKEN, HubOptions(http="httpx", backoff=0), ProbeOptions(via="proxy", public_url=PUBLIC)) as client:
        probe = await client.probe(running(target="http://10.0.0.5:1"))
    assert probe.ok and probe.via == "proxy"
    assert routes["status"].calls.last.request.url.params["no_track_activity"] == "1"
    with pytest.raises(ValueError):
        ProbeOptions(via="proxy")


@pytest.mark.parametrize("bad", [{"page_size": 0}, {"concurrency": 0}, {"retries": -1}, {"http": "requests"}])
def test_hub_settings_that_cannot_work_are_refused(bad):
    with pytest.raises(ValueError):
        HubOptions(**bad)


def test_probe_settings_that_cannot_work_and_a_client_without_a_token_are_refused():
    for bad in ({"concurrency": 0}, {"via": "sideways"}, {"via": "proxy"}):  # proxy: without public_url
        with pytest.raises(ValueError):
            ProbeOptions(**bad)
    with pytest.raises(ValueError, match="token is required"):
        HubClient(API, "")
    assert "probe-only" not in repr(ProbeOptions(token="probe-only"))


@pytest.mark.parametrize(
    ("status", "kernels", "reason", "kernel_calls"),
    [
        (None, httpx.Response(502, text="Bad Gateway"), "kernels: HTTP 502", 2),
        (httpx.ReadTimeout, None, "status: timeout after 5s", 0),
        (httpx.Response(200, text="<html>oops"), None, "status: invalid JSON", 0),
        (httpx.Response(403, text="Forbidden"), None, "status: HTTP 403", 0),
        (httpx.ConnectError, httpx.ConnectError, "status: ConnectError", 0),
        ({"connections": "many"}, None, "status: connections is not an integer", 1),
        (None, [{"name": "python3"}], "kernels: malformed entry", 1),
    ],
)
async def test_failing_probe_returns_failed_and_does_not_raise(
    router, hub, status, kernels, reason, kernel_calls
):
    base = "http://10.0.0.5:1/user/alice/"
    routes = probe_routes(router, base)
    if status is not None:
        if isinstance(status, type):
            routes["status"].mock(side_effect=status)
        else:
            routes["status"].mock(return_value=_resp(status))
    if kernels is not None:
        if isinstance(kernels, type):
            routes["kernels"].mock(side_effect=kernels)
        else:
            routes["kernels"].mock(return_value=_resp(kernels))

    probe = await hub.probe(running(target="http://10.0.0.5:1"))

    assert not probe.ok
    assert probe.error is not None and reason in probe.error
    assert routes["kernels"].call_count == kernel_calls  # a probe is retried at most once


async def test_probe_5xx_then_200_succeeds_on_its_single_retry(router, hub):
    routes = probe_routes(router, "http://10.0.0.5:1/user/alice/")
    routes["status"].mock(side_effect=[httpx.Response(503), _resp(fixture("su_GET_api_status.json"))])
    probe = await hub.probe(running(target="http://10.0.0.5:1"))
    assert probe.ok
    assert routes["status"].call_count == 2


async def test_probe_with_a_server_url_containing_escapes_is_not_double_quoted(router, hub):
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(200, json=[] if request.url.path.endswith(("kernels", "terminals")) else {})

    router.route(host="10.0.0.5").mock(side_effect=answer)
    probe = await hub.probe(running("x/y", url="/user/x%2Fy/", target="http://10.0.0.5:1"))
    assert probe.ok, probe.error
    assert b"/user/x%2Fy/api/status?no_track_activity=1" in seen


# --- concurrency ----------------------------------------------------------------------------


async def test_hub_calls_and_probes_are_bounded_by_their_own_semaphores(router):
    in_flight = {"hub": 0, "hub_max": 0}
    servers_in_flight: set[str] = set()
    servers_max = 0

    async def hub_answer(request: httpx.Request) -> httpx.Response:
        in_flight["hub"] += 1
        in_flight["hub_max"] = max(in_flight["hub_max"], in_flight["hub"])
        await asyncio.sleep(0.01)
        in_flight["hub"] -= 1
        return httpx.Response(404)

    async def probe_answer(request: httpx.Request) -> httpx.Response:
        nonlocal servers_max
        host = f"{request.url.host}:{request.url.port}"
        servers_in_flight.add(host)
        servers_max = max(servers_max, len(servers_in_flight))
        await asyncio.sleep(0.01)
        servers_in_flight.discard(host)
        return httpx.Response(200, json=[] if request.url.path.endswith(("kernels", "terminals")) else {})

    router.route(host="hub.internal").mock(side_effect=hub_answer)
    router.route(host="10.0.0.9").mock(side_effect=probe_answer)
    async with HubClient(API, TOKEN, HubOptions(http="httpx", concurrency=2, backoff=0), ProbeOptions(concurrency=3)) as client:
        results = await asyncio.gather(*(client.get_server(f"u{i}") for i in range(8)))
        probes = await asyncio.gather(
            *(client.probe(running(f"u{i}", target=f"http://10.0.0.9:{5000 + i}")) for i in range(9))
        )
    assert results == [None] * 8
    assert all(p.ok for p in probes)
    assert in_flight["hub_max"] == 2
    assert servers_max == 3


# --- secrets --------------------------------------------------------------------------------


async def test_authorization_header_is_sent_and_the_token_never_leaks_into_errors_or_logs(router, caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"bad token {TOKEN} rejected"  # a hostile/buggy upstream echoing the token back
    users = router.get(f"{API}/users").mock(return_value=httpx.Response(500, text=echo))
    stop = router.delete(f"{API}/users/alice/server").mock(return_value=httpx.Response(409, text=echo))
    router.get(f"{API}/users/alice").mock(side_effect=httpx.ConnectError(f"cannot connect ({TOKEN})"))
    router.get("http://10.0.0.5:1/user/alice/api/status").mock(side_effect=httpx.ConnectError(echo))
    router.get("http://10.0.0.5:1/user/alice/api/kernels").mock(return_value=httpx.Response(500, text=echo))
    router.get("http://10.0.0.5:1/user/alice/api/terminals").mock(return_value=httpx.Response(200, json=[]))

    async with HubClient(API, TOKEN, HubOptions(http="httpx", backoff=0, retries=1)) as client:
        assert TOKEN not in repr(client)
        with pytest.raises(HubListingError) as listing:
            await client.list_active_servers()
        result = await client.stop("alice")
        with pytest.raises(HubError) as get:
            await client.get_server("alice")
        probe = await client.probe(running(target="http://10.0.0.5:1"))

    assert users.calls.last.request.headers["Authorization"] == f"token {TOKEN}"
    assert stop.calls.last.request.headers["Authorization"] == f"token {TOKEN}"
    assert result.outcome == "error" and "***" in result.detail
    texts = [str(listing.value), str(get.value), result.detail, probe.error or ""]
    texts += [r.getMessage() for r in caplog.records]
    assert len(caplog.records) >= 3
    for text in texts:
        assert TOKEN not in text


async def test_probe_token_is_sent_to_single_user_servers_instead_of_the_admin_token(router):
    routes = probe_routes(router, "http://10.0.0.5:1/user/alice/")
    hubcall = router.delete(f"{API}/users/alice/server").mock(return_value=httpx.Response(204))
    async with HubClient(API, TOKEN, HubOptions(http="httpx", backoff=0), ProbeOptions(token="probe-only")) as client:
        await client.probe(running(target="http://10.0.0.5:1"))
        await client.stop("alice")
    assert routes["status"].calls.last.request.headers["Authorization"] == "token probe-only"
    assert hubcall.calls.last.request.headers["Authorization"] == f"token {TOKEN}"


async def test_a_server_without_kernels_is_probed_with_one_request(router, hub):
    base = "http://10.0.0.5:1/user/alice/"
    routes = probe_routes(router, base, status=fixture("su_GET_api_status.json"))  # kernels: 0
    probe = await hub.probe(running(target="http://10.0.0.5:1"))
    assert probe.ok and probe.kernels == ()
    assert routes["status"].call_count == 1 and routes["kernels"].call_count == 0
    assert probe.status_started == datetime(2026, 11, 25, 20, 11, 20, 807385, tzinfo=UTC)  # when it began


async def test_a_bad_started_in_status_is_ignored_not_a_failed_probe(router, hub):
    base = "http://10.0.0.5:1/user/alice/"
    probe_routes(router, base, status={**fixture("su_GET_api_status.json"), "started": "yesterday"})
    probe = await hub.probe(running(target="http://10.0.0.5:1"))
    assert probe.ok and probe.status_started is None


async def test_status_only_recheck_is_one_request_and_reports_the_kernel_count(router, hub):
    base = "http://10.0.0.5:1/user/alice/"
    routes = probe_routes(router, base)
    probe = await hub.probe_status(running(target="http://10.0.0.5:1"))
    assert probe.ok and probe.status_kernels == 1 and probe.kernels == ()
    assert probe.status_last_activity == datetime(2026, 11, 25, 20, 11, 20, 807385, tzinfo=UTC)
    assert routes["status"].call_count == 1 and routes["kernels"].call_count == 0
    assert routes["status"].calls.last.request.url.params["no_track_activity"] == "1"
