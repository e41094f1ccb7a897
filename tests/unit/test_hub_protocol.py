"""reaper.hub.Hub, what a sweep needs of the hub: HubClient provides every method of it, with the
same signature."""

from __future__ import annotations

import inspect

from reaper.hub import Hub, HubClient

SWEEP_NEEDS = {"list_active_servers", "get_server", "stop", "probe", "probe_status", "refresh_targets", "target_for"}


def protocol_methods(proto: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(proto).items()
            if inspect.iscoroutinefunction(fn) and not name.startswith("_")}


def test_the_hub_protocol_names_what_the_sweep_asks_and_the_client_has_each_alike():
    methods = protocol_methods(Hub)
    assert set(methods) == SWEEP_NEEDS
    for name, signature in methods.items():
        mine = getattr(HubClient, name)
        assert inspect.iscoroutinefunction(mine), name
        assert inspect.signature(mine) == signature, name

