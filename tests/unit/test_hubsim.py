"""The hub simulator is the benchmark's ground truth: prove it answers like JupyterHub 6.1.1.

Each test starts benchmarks.hubsim.HubSim on 127.0.0.1 in-process and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.hubsim import PAGINATION_MEDIA_TYPE, HubSim, Population, build_users

FIXTURES = Path("/work/shared/fixtures/api-jupyterhub-6.1.1")
TOKEN = "sim-token"
AUTH = {"Authorization": f"token {TOKEN}"}
PAGED = {**AUTH, "Accept": PAGINATION_MEDIA_TYPE}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def started(pop: Population, **kw: Any) -> HubSim:
    sim = HubSim(pop, token=TOKEN, **{"hub_latency": 0.0, **kw})
    await sim.start()
    return sim


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def test_users_paginate_like_the_hub_following_next_until_total(client: httpx.AsyncClient) -> None:
    sim = await started(Population(users=7, idle_detached=1))
    try:
        names: list[str] = []
        url: str | None = sim.api_url + "/users?state=active&limit=3"
        offsets = []
        while url:
            r = await client.get(url, headers=PAGED)
            assert r.status_code == 200
            body = r.json()
            assert set(body) == {"items", "_pagination"}
            pag = body["_pagination"]
            assert pag["total"] == 7 and pag["limit"] == 3
            offsets.append(pag["offset"])
            names += [u["name"] for u in body["items"]]
            nxt = pag["next"]
            if nxt is not None:
                assert nxt["offset"] == pag["offset"] + 3 and nxt["limit"] == 3
                assert "state=active" in nxt["url"] and f"offset={nxt['offset']}" in nxt["url"]
            url = nxt["url"] if nxt else None
        assert offsets == [0, 3, 6]
        assert names == sorted(names) and len(set(names)) == 7
    finally:
        await sim.close()


async def test_page_size_defaults_to_50_caps_at_200_and_a_plain_list_gets_the_maximum(
    client: httpx.AsyncClient,
) -> None:
    sim = await started(Population(users=250, idle_detached=1))
    try:
        r = await client.get(sim.api_url + "/users", params={"state": "active"}, headers=PAGED)
        assert r.json()["_pagination"]["limit"] == 50 and len(r.json()["items"]) == 50
        r = await client.get(sim.api_url + "/users", params={"state": "active", "limit": 1000}, headers=PAGED)
        assert r.json()["_pagination"]["limit"] == 200 and len(r.json()["items"]) == 200
        r = await client.get(sim.api_url + "/users", params={"state": "active"}, headers=AUTH)
        assert isinstance(r.json(), list) and len(r.json()) == 200  # no header: truncated at the max
    finally:
        await sim.close()


async def test_user_and_server_models_have_the_fields_of_the_captured_hub_answer(
    client: httpx.AsyncClient,
) -> None:
    real = json.loads((FIXTURES / "users_state_active_paginated.json").read_text())
    real_user = real["items"][0]
    real_server = real_user["servers"][""]
    sim = await started(Population(users=1, idle_detached=1))
    try:
        body = (await client.get(sim.api_url + "/users?state=active", headers=PAGED)).json()
        assert set(body["_pagination"]) == set(real["_pagination"])
        user = body["items"][0]
        assert set(user) == set(real_user)
        server = user["servers"][""]
        assert set(server) == set(real_server)
        assert set(server["state"]) == {"job_id", "job_status"}
        assert server["url"] == f"/user/{user['name']}/" and server["ready"] is True
        one = (await client.get(sim.api_url + f"/users/{user['name']}", headers=AUTH)).json()
        assert one["servers"][""]["started"] == server["started"]
    finally:
        await sim.close()


async def test_hub_api_needs_the_token_except_the_version_root(client: httpx.AsyncClient) -> None:
    sim = await started(Population(users=2, idle_detached=1))
    try:
        assert (await client.get(sim.api_url + "/")).json() == {"version": "6.1.1"}
        assert (await client.get(sim.api_url + "/users")).status_code == 403
        bad = {"Authorization": "token nope"}
        assert (await client.get(sim.api_url + "/users", headers=bad)).status_code == 403
        assert (await client.delete(sim.api_url + "/users/user00000/server", headers=bad)).status_code == 403
        assert sim.running() == 2
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get(sim.api_url + "/users", headers=bearer)).status_code == 200
    finally:
        await sim.close()


async def test_proxy_table_lists_every_running_server_with_its_own_target_and_pages_in_key_order(
    client: httpx.AsyncClient,
) -> None:
    sim = await started(Population(users=6, named_share=0.5, idle_detached=1))
    try:
        assert sim.running() == 9
        whole = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()
        assert len(whole) == 10 and whole["/"]["data"] == {"hub": True}
        user_routes = {k: v for k, v in whole.items() if k != "/"}
        assert len({v["target"] for v in user_routes.values()}) == 9  # one port per server
        for spec, route in user_routes.items():
            assert route["routespec"] == spec
            d = route["data"]
            assert spec == (
                f"/user/{d['user']}/{d['server_name']}/" if d["server_name"] else f"/user/{d['user']}/"
            )
        keys: list[str] = []
        offset = 0
        while True:
            r = await client.get(sim.api_url + "/proxy", params={"offset": offset, "limit": 4}, headers=PAGED)
            page = r.json()
            assert page["_pagination"]["total"] == 10
            keys += list(page["items"])
            if not page["_pagination"]["next"]:
                break
            offset = page["_pagination"]["next"]["offset"]
        assert keys == sorted(whole)
        assert sim.requests["hub GET /hub/api/proxy"] == 4
    finally:
        await sim.close()


async def test_direct_probe_answers_only_on_the_servers_own_port(client: httpx.AsyncClient) -> None:
    sim = await started(Population(users=2, idle_detached=1))
    try:
        routes = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()
        t0, t1 = routes["/user/user00000/"]["target"], routes["/user/user00001/"]["target"]
        ok = await client.get(t0 + "/user/user00000/api/status", headers=AUTH)
        assert ok.status_code == 200 and set(ok.json()) == {
            "connections",
            "kernels",
            "last_activity",
            "started",
        }
        assert (await client.get(t1 + "/user/user00000/api/status", headers=AUTH)).status_code == 404
        assert (await client.get(t0 + "/user/user00000/api/status")).status_code == 403
    finally:
        await sim.close()


async def test_probes_count_as_activity_unless_no_track_activity_and_always_through_the_proxy(
    client: httpx.AsyncClient,
) -> None:
    sim = await started(Population(users=1, idle_detached=1, idle_hours=(5, 6)))
    try:
        target = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()["/user/user00000/"]["target"]
        base = target + "/user/user00000/api/"

        async def su_last() -> datetime:
            r = await client.get(base + "status", headers=AUTH)
            return ts(r.json()["last_activity"])

        async def hub_last() -> datetime:
            r = await client.get(sim.api_url + "/users/user00000", headers=AUTH)
            return ts(r.json()["servers"][""]["last_activity"])

        before_su, before_hub = await su_last(), await hub_last()
        assert datetime.now(UTC) - before_su > timedelta(hours=4)
        for api in ("kernels", "sessions", "terminals"):
            assert (
                await client.get(base + api, params={"no_track_activity": "1"}, headers=AUTH)
            ).status_code == 200
        assert await su_last() == before_su and await hub_last() == before_hub  # status never counts
        assert sim.activity_touches == 0

        await client.get(base + "kernels", headers=AUTH)  # no flag: activity
        assert datetime.now(UTC) - await su_last() < timedelta(seconds=5)
        assert datetime.now(UTC) - await hub_last() < timedelta(seconds=5)
        assert sim.activity_touches == 1

        via_proxy = sim.url + "/user/user00000/api/status"
        assert (
            await client.get(via_proxy, params={"no_track_activity": "1"}, headers=AUTH)
        ).status_code == 200
        assert sim.activity_touches == 2
        assert sim.requests["proxy GET /user/{name}/api/status"] == 1
        assert sim.requests["direct GET /user/{name}/api/status"] == 3
    finally:
        await sim.close()


async def test_a_stop_faster_than_the_slow_stop_timeout_answers_204_and_the_server_is_gone(
    client: httpx.AsyncClient,
) -> None:
    sim = await started(Population(users=3, idle_detached=1), stop_time=0.2)
    try:
        t = time.perf_counter()
        r = await client.delete(sim.api_url + "/users/user00001/server", headers=AUTH)
        took = time.perf_counter() - t
        assert r.status_code == 204 and 0.2 <= took < 1.0
        listing = (await client.get(sim.api_url + "/users?state=active", headers=PAGED)).json()
        assert [u["name"] for u in listing["items"]] == ["user00000", "user00002"]
        assert listing["_pagination"]["total"] == 2
        user = (await client.get(sim.api_url + "/users/user00001", headers=AUTH)).json()
        assert user["servers"] == {} and user["server"] is None
        # stopping a default server that is not running: the hub answers 204 and does nothing
        assert (await client.delete(sim.api_url + "/users/user00001/server", headers=AUTH)).status_code == 204
        assert (await client.delete(sim.api_url + "/users/nobody/server", headers=AUTH)).status_code == 404
        assert (
            await client.delete(sim.api_url + "/users/user00000/servers/nope", headers=AUTH)
        ).status_code == 404
        st = sim.stats()
        assert st["stops_requested"] == 1 and st["stops_completed"] == 1
        (rec,) = st["stops"]
        assert rec["status"] == 204 and rec["category"] == "idle_detached"
        assert rec["completed"] - rec["requested"] >= 0.2
    finally:
        await sim.close()


async def test_a_slow_stop_answers_202_stays_pending_then_disappears(client: httpx.AsyncClient) -> None:
    sim = await started(
        Population(users=2, named_share=1.0, idle_detached=1), stop_time=0.6, slow_stop_timeout=0.1
    )
    try:
        r = await client.delete(sim.api_url + "/users/user00000/servers/gpu", headers=AUTH)
        assert r.status_code == 202
        server = (await client.get(sim.api_url + "/users/user00000", headers=AUTH)).json()["servers"]["gpu"]
        assert server["pending"] == "stop" and server["ready"] is False
        routes = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()
        assert "/user/user00000/gpu/" not in routes  # the route goes first
        ready = (await client.get(sim.api_url + "/users?state=ready", headers=AUTH)).json()
        assert {u["name"] for u in ready} == {"user00000", "user00001"}  # user00000 still has ""
        again = await client.delete(sim.api_url + "/users/user00000/servers/gpu", headers=AUTH)
        assert again.status_code == 202 and sim.stats()["stops_requested"] == 1
        await asyncio.sleep(0.7)
        user = (await client.get(sim.api_url + "/users/user00000", headers=AUTH)).json()
        assert set(user["servers"]) == {""}
        # a known named server that is stopped: 204, nothing to do
        assert (
            await client.delete(sim.api_url + "/users/user00000/servers/gpu", headers=AUTH)
        ).status_code == 204
        assert sim.stats()["stops_completed"] == 1
    finally:
        await sim.close()


async def test_the_hub_serves_one_request_at_a_time_but_user_servers_and_stops_run_concurrently(
    client: httpx.AsyncClient,
) -> None:
    sim = await started(
        Population(users=10, idle_detached=1), hub_latency=0.05, user_latency=0.1, stop_time=0.5
    )
    try:
        t = time.perf_counter()
        await asyncio.gather(*(client.get(sim.api_url + "/", headers=AUTH) for _ in range(6)))
        assert time.perf_counter() - t >= 0.3  # 6 x 50 ms, serialized

        routes = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()
        urls = [r["target"] + k + "api/status" for k, r in routes.items() if k != "/"]
        t = time.perf_counter()
        await asyncio.gather(*(client.get(u, headers=AUTH) for u in urls))
        assert time.perf_counter() - t < 0.5  # 10 x 100 ms, concurrent

        t = time.perf_counter()
        stops = [client.delete(sim.api_url + f"/users/user0000{i}/server", headers=AUTH) for i in range(4)]
        answers = await asyncio.gather(*stops)
        took = time.perf_counter() - t
        assert [a.status_code for a in answers] == [204] * 4
        assert took < 1.0  # 4 stops of 0.5 s overlap: the hub lock is held only for the latency
        assert sim.hub_busy < 0.8
    finally:
        await sim.close()


async def test_population_has_exact_category_shares_consistent_with_what_servers_report(
    client: httpx.AsyncClient,
) -> None:
    pop = Population(
        users=40, named_share=0.25, active=0.5, idle_attached=0.2, idle_detached=0.2, computing=0.1
    )
    sim = await started(pop)
    try:
        assert sim.running() == 50
        assert sim.categories() == {"active": 25, "idle_attached": 10, "idle_detached": 10, "computing": 5}
        now = datetime.now(UTC)
        routes = (await client.get(sim.api_url + "/proxy", headers=AUTH)).json()
        for u in sim.users.values():
            for s in u.servers.values():
                base = routes[s.url]["target"] + s.url + "api/"
                status = (await client.get(base + "status", headers=AUTH)).json()
                kernels = (await client.get(base + "kernels?no_track_activity=1", headers=AUTH)).json()
                hub = (await client.get(sim.api_url + f"/users/{s.user}", headers=AUTH)).json()
                hub_age = now - ts(hub["servers"][s.name]["last_activity"])
                su_age = now - ts(status["last_activity"])
                states = [k["execution_state"] for k in kernels]
                if s.category == "active":
                    assert status["connections"] == 1 and su_age < timedelta(seconds=15)
                    assert hub_age < timedelta(minutes=2) and states == ["idle"]
                elif s.category == "idle_attached":  # hidden tab: pings keep the hub fresh
                    assert status["connections"] == 1 and su_age > timedelta(hours=1)
                    assert hub_age < timedelta(minutes=6) and states == ["idle"]
                elif s.category == "idle_detached":
                    assert status["connections"] == 0 and su_age > timedelta(hours=1)
                    assert hub_age > timedelta(hours=1) and states == ["idle"]
                else:
                    assert states == ["busy"] and hub_age > timedelta(hours=1) and su_age > timedelta(hours=1)
        assert sim.activity_touches == 0
    finally:
        await sim.close()


def test_population_is_deterministic_for_a_seed() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    pop = Population(users=30, named_share=0.3, active=0.5, idle_detached=0.5, seed=7)

    def shape(users: dict[str, Any]) -> list[tuple[str, str, str, datetime]]:
        return [
            (s.user, s.name, s.category, s.hub_last_activity)
            for u in users.values()
            for s in u.servers.values()
        ]

    a, b = build_users(pop, [1000, 1001], now), build_users(pop, [1000, 1001], now)
    assert shape(a) == shape(b)
    other = build_users(
        Population(users=30, named_share=0.3, active=0.5, idle_detached=0.5, seed=8), [1000], now
    )
    assert shape(other) != shape(a)


async def test_counters_by_route_and_reset_with_repopulation(client: httpx.AsyncClient) -> None:
    sim = await started(Population(users=3, idle_detached=1))
    try:
        await client.get(sim.api_url + "/users?state=active", headers=AUTH)
        await client.get(sim.api_url + "/users/user00002", headers=AUTH)
        await client.delete(sim.api_url + "/users/user00002/server", headers=AUTH)
        stats = (await client.get(sim.url + "/sim/stats")).json()
        assert stats["requests"] == {
            "hub GET /hub/api/users": 1,
            "hub GET /hub/api/users/{name}": 1,
            "hub DELETE /hub/api/users/{name}/server": 1,
        }
        assert stats["running"] == 2 and stats["stops_completed"] == 1
        r = await client.post(sim.url + "/sim/reset")
        assert r.json()["requests"] == {} and r.json()["stops"] == [] and r.json()["running"] == 2
        r = await client.post(sim.url + "/sim/reset", params={"repopulate": "1"})
        assert r.json()["running"] == 3
    finally:
        await sim.close()
