"""Each server's own address (reaper.hub.routes): from the server itself, else the proxy table.
The table's shape is what ``GET /hub/api/proxy`` answers on JupyterHub 6.1.1; pure, no HTTP."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reaper.core.model import HubServer
from reaper.hub import HubError
from reaper.hub.routes import own_address, routed_address, routes_from_page

PAGE = {
    "/": {"routespec": "/", "target": "http://127.0.0.1:8081", "data": {"hub": True}},
    "/user/alice/": {"routespec": "/user/alice/", "target": "http://127.0.0.1:54321",
                     "data": {"user": "alice", "server_name": "", "last_activity": "2026-11-25T20:00:00.000Z"}},
    "/user/bob/gpu/": {"routespec": "/user/bob/gpu/", "target": "http://127.0.0.1:54322",
                       "data": {"user": "bob", "server_name": "gpu"}},
    "/user/carol/": {"routespec": "/user/carol/", "target": "http://10.0.0.3:8888", "data": {}},
    "carol.hub.example.org/user/carol/": {"target": "http://10.0.0.4:8888"},
    "/broken/": {"routespec": "/broken/", "target": None},
    "/odd/": "not a route",
}


def server(user: str, name: str = "", **kw) -> HubServer:
    url = f"/user/{user}/{name}/" if name else f"/user/{user}/"
    return HubServer(user=user, name=name, started=datetime(2026, 11, 25, tzinfo=UTC), last_activity=None,
                     **{"url": url, **kw})


def test_a_page_of_the_proxy_table_splits_into_routes_by_server_and_routes_by_spec_held_once():
    by_spec, by_server = routes_from_page(PAGE)
    assert by_server == {("alice", ""): "http://127.0.0.1:54321", ("bob", "gpu"): "http://127.0.0.1:54322"}
    assert by_spec == {"/": "http://127.0.0.1:8081", "/user/carol/": "http://10.0.0.3:8888",
                       "carol.hub.example.org/user/carol/": "http://10.0.0.4:8888"}


def test_a_page_that_is_not_a_table_is_an_error():
    with pytest.raises(HubError, match="routes are not an object"):
        routes_from_page([PAGE])


def test_a_server_that_brings_its_address_needs_no_table():
    assert own_address(server("alice", target="http://node1:5000")) == "http://node1:5000"
    assert own_address(server("alice", state={"server_url": "https://node2:5001"})) == "https://node2:5001"
    assert own_address(server("alice", state={"server_url": "/user/alice/"})) is None  # not an address
    assert own_address(server("alice")) is None


def test_the_table_finds_a_server_by_user_and_name_then_by_its_url():
    by_spec, by_server = routes_from_page(PAGE)
    assert routed_address(server("alice"), by_spec, by_server) == "http://127.0.0.1:54321"
    assert routed_address(server("bob", "gpu"), by_spec, by_server) == "http://127.0.0.1:54322"
    assert routed_address(server("bob"), by_spec, by_server) is None  # bob's default server has no route
    assert routed_address(server("carol"), by_spec, by_server) == "http://10.0.0.3:8888"
    full = server("carol", url="https://hub.example.org/user/carol/")  # a full URL: its path is the spec
    assert routed_address(full, by_spec, by_server) == "http://10.0.0.3:8888"
    sub = server("carol", url="https://carol.hub.example.org/user/carol/")
    assert routed_address(sub, {"carol.hub.example.org/user/carol/": "http://10.0.0.4:8888"}, {}) == "http://10.0.0.4:8888"
    assert routed_address(server("dave"), by_spec, by_server) is None
