"""reaper.hub.Hub, what a sweep needs of the hub: HubClient provides every method of it, with the
same parameters and answer."""

from __future__ import annotations

import inspect

from reaper.hub import Hub, HubClient

SWEEP_NEEDS = {"list_active_servers", "get_server", "stop", "probe", "probe_status", "activity", "refresh_targets", "target_for"}


def protocol_methods(proto: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(proto).items()
            if inspect.iscoroutinefunction(fn) and not name.startswith("_")}


def test_the_hub_protocol_names_what_the_sweep_asks_and_the_client_has_each_alike():
    methods = protocol_methods(Hub)
    assert set(methods) == SWEEP_NEEDS
    for name, signature in methods.items():
        mine = getattr(HubClient, name)
        assert inspect.iscoroutinefunction(mine), name
        # the same parameters in order, with the same annotations and defaults; the protocol's are
        # positional (but ``status``), which the client's, named, also accept
        theirs = [(p.annotation, p.default, p.kind == p.KEYWORD_ONLY) for p in signature.parameters.values()]
        ours = [(p.annotation, p.default, p.kind == p.KEYWORD_ONLY) for p in inspect.signature(mine).parameters.values()]
        assert ours == theirs, name
        assert inspect.signature(mine).return_annotation == signature.return_annotation, name

