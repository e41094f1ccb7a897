"""The hub adapter's parsing (reaper.hub.models) on what JupyterHub 5.4 and 6.x and the sites'
spawners really answer: recorded by tests/fixtures/record_sites.py from real hubs on real Slurm
(tests/integration/test_site_spawners.py proves the same live)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reaper.core.model import HubServer
from reaper.hub import servers_from_user
from reaper.hub.models import spawner_state
from reaper.units import read_user_options

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def servers(path: str) -> dict[str, HubServer]:
    data = load(path)
    out = {}
    for user in data["items"]:
        for s in servers_from_user(user):
            out[s.name] = s
    return out


def test_jupyterhub_6_gives_named_servers_a_display_name_and_5_4_none():
    six = servers("api-jupyterhub-6.1.1/users_state_active_paginated_named.json")
    assert six["gpu-work"].display_name == "GPU work"
    assert six["gpu-work"].user_options == {"partition": "gpu"}  # at the model's top level, as in 5.4
    assert six[""].display_name is None  # 6.x answers "" for the default server: not set
    five = servers("api-jupyterhub-5.4.6/users_state_active_paginated_named.json")
    raw = load("api-jupyterhub-5.4.6/users_state_active_paginated_named.json")["items"][0]["servers"]
    assert "display_name" not in raw["gpu-work"]  # what 5.4 answers: no display name at all
    assert five["gpu-work"].display_name is None  # so people are shown the name
    assert {s.name for s in five.values()} == {"", "gpu-work"}


def _site(spawner: str) -> HubServer:
    (path,) = sorted((FIXTURES / "sites").glob(f"{spawner}_jupyterhub-*_users_state_active.json"))
    (server,) = servers(str(path.relative_to(FIXTURES))).values()
    return server


@pytest.mark.parametrize(
    ("spawner", "partition", "gpus", "walltime", "cpus", "mem_mb"),
    [
        ("batchspawner", "gpu", 1, timedelta(hours=4), None, 1024.0),
        ("profiles", "gpu", 1, timedelta(hours=4), 1, 4096.0),
        # slurmformspawner's model shows runtime in minutes (its form asks hours: 1.5 h -> 90)
        ("slurmform", "gpu", 1, timedelta(minutes=90), 2, 1024.0),
    ],
)
def test_each_site_spawners_job_id_and_requested_resources_are_read(spawner, partition, gpus, walltime, cpus, mem_mb):
    server = _site(spawner)
    assert server.job_id is not None and server.job_id.isdigit()
    asked = read_user_options(server.user_options)
    assert (asked.partition, asked.gpus, asked.walltime, asked.cpus, asked.mem_mb) == (
        partition, gpus, walltime, cpus, mem_mb)
    assert server.target is None  # none of them puts the server's address in its state


def test_profiles_spawner_state_is_unwrapped_and_its_profile_read_as_options():
    (path,) = sorted((FIXTURES / "sites").glob("profiles_*.json"))
    raw = json.loads(path.read_text())
    model = raw["items"][0]["servers"][""]
    assert "job_id" not in model["state"] and model["state"]["child_state"]["job_id"]
    server = _site("profiles")
    assert server.job_id == model["state"]["child_state"]["job_id"]
    assert server.state == model["state"]["child_state"]  # the spawner that runs the job
    assert server.user_options["profile"] == "gpu"
    assert server.user_options["req_gres"] == "gpu:1"


def test_nested_state_without_the_adapter_still_gives_the_job_id():
    # state made elsewhere (a store, a test's table) may keep wrapspawner's nesting
    s = HubServer(user="a", name="", started=None, last_activity=None,
                  state={"profile": "gpu", "child_state": {"child_state": {"job_id": 42}}})
    assert s.job_id == "42"
    assert HubServer(user="a", name="", started=None, last_activity=None,
                     state={"child_state": "oops"}).job_id is None


def test_a_user_choice_wins_over_the_profile_and_an_outer_profile_over_an_inner_one():
    state = {"child_conf": {"req_partition": "outer", "start_timeout": 9},
             "child_state": {"child_conf": {"req_partition": "inner", "req_runtime": "1:00:00"},
                             "child_state": {"job_id": "7"}}}
    inner, conf = spawner_state(state)
    assert inner == {"job_id": "7"}
    assert conf == {"req_partition": "outer", "req_runtime": "1:00:00"}  # spawner settings left out
    user = {"name": "a", "servers": {"": {"name": "", "started": "2026-12-01T10:00:00Z", "state": state,
                                          "user_options": {"profile": "x", "req_partition": "mine"}}}}
    (server,) = servers_from_user(user)
    assert server.user_options == {"profile": "x", "req_partition": "mine", "req_runtime": "1:00:00"}
    assert server.job_id == "7"


@pytest.mark.parametrize("bad", [{"child_state": "x"}, {"child_state": {}, "child_conf": "x"}])
def test_malformed_nesting_is_an_error_not_a_server_without_a_job(bad):
    with pytest.raises(TypeError):
        servers_from_user({"name": "a", "servers": {"": {"name": "", "state": bad}}})


def test_refresh_pre_stop_answers_as_recorded_on_both_versions():
    # what the hub client's stop maps (tests/adapters/test_hub_client.py): the reaper's own token is
    # never refused for stale auth; a failing refresh is a 500; a user's own token gets the 403
    rows = load("stop_under_refresh_pre_stop.json")
    seen = {(r["jupyterhub"].rsplit(".", 1)[0], r["refresh_user"], r["auth_refresh_strict"], r["token"]): r["status"]
            for r in rows}
    assert seen == {
        ("5.4", "stale", False, "service"): 204, ("5.4", "stale", False, "user"): 403,
        ("5.4", "raise", False, "service"): 500, ("5.4", "raise", False, "user"): 403,
        ("6.1", "stale", False, "service"): 204, ("6.1", "stale", False, "user"): 204,
        ("6.1", "stale", True, "service"): 204, ("6.1", "stale", True, "user"): 403,
        ("6.1", "raise", False, "service"): 500, ("6.1", "raise", False, "user"): 403,
    }
