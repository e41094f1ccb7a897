"""Fixtures starting real parts for integration tests.

- `real_hub` (session): one real JupyterHub 6 from hub/jupyterhub_config.py, local spawner,
  managed reaper service OFF (tests run sweeps in-process with `real_hub.service_token`),
  activity intervals of 2 s. Started once per session (~2 s).
- `core_hub` (session, parametrized): the same hub once per JupyterHub version the core path is
  proven on (HUB_VERSIONS: the newest 5.4.x and 6.x); the 6.x one is `real_hub` itself.
- `hub_factory` (session): start more hubs, e.g. `hub_factory(managed=True, reaper_config=path)`
  for an end-to-end test with the reaper running as the hub's managed service; every hub it made
  is stopped at the end of the session.
When a test using a hub fails, the hub's log (since that test began) is added to the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import require_real_part
from tests.harness.hub import DEFAULT_VERSION, HUB_VERSIONS, RealHub, missing_parts

_LOG_OFFSET = "_real_hub_log_offsets"


def _hubs_of(item: pytest.Item) -> list[RealHub]:
    funcargs = getattr(item, "funcargs", {}) or {}
    hubs: list[RealHub] = [v for v in funcargs.values() if isinstance(v, RealHub)]
    factory = funcargs.get("hub_factory")
    if factory is not None:
        hubs.extend(h for h in getattr(factory, "hubs", []) if h not in hubs)
    return hubs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    hubs = _hubs_of(item)
    if call.when == "setup":
        setattr(item, _LOG_OFFSET, {id(h): h.log_size() for h in hubs})
        return
    if not report.failed:
        return
    offsets: dict[int, int] = getattr(item, _LOG_OFFSET, {})
    for hub in hubs:
        text = hub.log_since(offsets.get(id(hub), 0))
        lines = text.splitlines()
        if len(lines) > 400:
            lines = [f"... ({len(lines) - 400} earlier lines in {hub.log_path})", *lines[-400:]]
        report.sections.append((f"real JupyterHub log ({hub.log_path})", "\n".join(lines)))


class HubFactory:
    """Starts RealHub instances under the session's tmp dir; stops them all at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.hubs: list[RealHub] = []

    def __call__(self, **kwargs: Any) -> RealHub:
        version = kwargs.get("version", DEFAULT_VERSION)
        missing = missing_parts(version)
        require_real_part(not missing, f"a real JupyterHub {version} ({', '.join(missing)} missing)")
        hub = RealHub(self.base / f"hub{len(self.hubs)}", **kwargs)
        self.hubs.append(hub)
        hub.start()
        return hub

    def close(self) -> None:
        for hub in reversed(self.hubs):
            hub.stop()


@pytest.fixture(scope="session")
def hub_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RealHub]]:
    """hub_factory(managed=False, spawner="local", activity_interval=2, reaper_config=None,
    service_url=None, extra_env=None, version="6") -> a started RealHub."""
    factory = HubFactory(tmp_path_factory.mktemp("hubs"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def real_hub(hub_factory: HubFactory) -> RealHub:
    """The session's real JupyterHub: local spawner, managed reaper OFF, 2 s activity intervals."""
    return hub_factory(managed=False)


@pytest.fixture(scope="session", params=HUB_VERSIONS, ids=lambda v: f"hub{v}")
def core_hub(request: pytest.FixtureRequest, hub_factory: HubFactory) -> RealHub:
    """The session's real JupyterHub of each version in HUB_VERSIONS (local spawner, managed reaper
    OFF, 2 s activity intervals): a core-path test using it runs once per version."""
    if request.param == DEFAULT_VERSION:
        hub: RealHub = request.getfixturevalue("real_hub")
        return hub
    return hub_factory(managed=False, version=request.param)
