"""The single-user servers' answers -> Probe (reaper.hub.probe), pure: no HTTP.

The answers are real captures of jupyter_server 2.21.1 behind JupyterHub 6.1.1
(tests/fixtures/api-jupyterhub-6.1.1, the same as /work/shared/fixtures).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.core.activity import classify
from reaper.core.model import HubServer, Kernel, State
from reaper.hub.probe import (
    ProbeFailure,
    needs_kernels,
    probe_from_answers,
    probe_from_status,
    read_answer,
    status_answer,
)

FIX = Path(os.environ.get("REAPER_API_FIXTURES", Path(__file__).resolve().parents[1] / "fixtures" / "api-jupyterhub-6.1.1"))


def fixture(name: str) -> Any:
    return json.loads((FIX / name).read_text())


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def test_a_real_idle_server_without_kernels_reads_from_its_status_alone():
    status = fixture("su_GET_api_status.json")  # kernels: 0
    assert not needs_kernels(status)  # one request where one suffices
    probe = probe_from_answers(status, [], [])
    assert probe.ok and probe.error is None
    assert probe.status_kernels == 0 and probe.kernels == () and probe.status_connections == 0
    assert probe.status_last_activity == at("2026-11-25T20:11:20.807385Z")
    assert probe.status_started == at("2026-11-25T20:11:20.807385Z")
    assert probe.terminals == 0 and probe.terminals_last_activity is None and probe.via == "direct"


def test_a_real_busy_silent_kernel_is_read_busy_and_the_server_computing():
    busy = fixture("busy_kernel_state.json")
    assert needs_kernels(busy["status"])
    probe = probe_from_answers(busy["status"], busy["kernels"], [], via="proxy")
    assert probe.ok and probe.via == "proxy"
    assert probe.kernels == (
        Kernel(id="d00b42ef-0af3-457f-9f8b-e2be353194b5", name="python3", execution_state="busy",
               connections=0, last_activity=at("2026-11-25T20:15:04.065788Z")),
    )
    assert probe.status_kernels == 1 and probe.status_last_activity == at("2026-11-25T20:15:05.140842Z")
    server = HubServer(user="alice", name="", started=at("2026-11-25T20:14:50Z"), last_activity=None,
                       url="/user/alice/")
    assert classify(server, probe, at("2026-11-25T20:30:00Z")).state is State.COMPUTING


def test_a_real_kernel_listing_without_a_count_in_the_status_counts_the_kernels_listed():
    kernels = fixture("su_GET_api_kernels_after.json")
    status = {k: v for k, v in fixture("su_GET_api_status.json").items() if k != "kernels"}
    assert needs_kernels(status)  # the status does not say: ask
    probe = probe_from_answers(status, kernels, [])
    assert probe.ok and probe.status_kernels == 1
    assert [(k.id, k.execution_state) for k in probe.kernels] == [("fd83a956-3502-4c21-89dd-56c80b1108e6", "starting")]


def test_terminals_are_counted_with_their_latest_activity_and_a_missing_terminals_api_counts_none():
    status = fixture("su_GET_api_status.json")
    terms = [{"name": "1", "last_activity": "2026-11-25T20:00:00Z"}, {"name": "2", "last_activity": None},
             {"name": "3", "last_activity": "2026-11-25T20:05:00+00:00"}]
    probe = probe_from_answers(status, [], terms)
    assert probe.terminals == 3 and probe.terminals_last_activity == at("2026-11-25T20:05:00Z")
    absent = probe_from_answers(status, [], None)  # /api/terminals answered 404
    assert absent.ok and absent.terminals == 0 and absent.terminals_last_activity is None


@pytest.mark.parametrize(
    ("status", "kernels", "terminals", "reason"),
    [
        ("<html>", [], [], "status: unexpected answer (not an object)"),
        ({"connections": "many"}, [], [], "status: connections is not an integer"),
        ({"connections": True}, [], [], "status: connections is not an integer"),
        ({"last_activity": "yesterday"}, [], [], "status: invalid last_activity"),
        ({"last_activity": 17}, [], [], "status: invalid last_activity"),
        ({}, {"id": "k"}, [], "kernels: unexpected answer (not a list)"),
        ({}, [{"name": "python3"}], [], "kernels: malformed entry (kernel without id or execution_state)"),
        ({}, [{"id": "k", "execution_state": "idle", "connections": "2"}], [], "kernels: malformed entry"),
        ({}, [{"id": "k", "execution_state": "idle", "last_activity": "soon"}], [], "kernels: malformed entry"),
        ({}, [], {"1": {}}, "terminals: unexpected answer (not a list)"),
        ({}, [], [{"name": "1", "last_activity": "soon"}], "terminals: invalid last_activity"),
    ],
)
def test_an_answer_that_is_not_what_jupyter_server_sends_is_a_failed_probe_with_the_reason(
    status, kernels, terminals, reason
):
    probe = probe_from_answers(status, kernels, terminals, via="proxy")
    assert not probe.ok and probe.via == "proxy"
    assert probe.error is not None and probe.error.startswith(reason)
    assert probe.kernels == () and probe.status_last_activity is None  # nothing guessed


def test_a_bad_started_is_ignored_not_a_failed_probe():
    status = {**fixture("su_GET_api_status.json"), "started": "yesterday"}
    assert probe_from_answers(status, [], []).status_started is None
    assert probe_from_status(status).ok and probe_from_status(status).status_started is None


def test_the_status_alone_reports_the_kernel_count_without_kernels():
    busy = fixture("busy_kernel_state.json")
    probe = probe_from_status(busy["status"])
    assert probe.ok and probe.status_kernels == 1 and probe.kernels == ()
    assert probe.status_last_activity == at("2026-11-25T20:15:05.140842Z")
    assert probe.status_started == at("2026-11-25T20:14:50.103514Z")
    # lenient where the full probe has what it needs: a count it cannot read is no count
    odd = probe_from_status({"connections": "x", "kernels": True})
    assert odd.ok and odd.status_connections == 0 and odd.status_kernels is None
    assert probe_from_status([]).error == "status: unexpected answer (not an object)"
    assert probe_from_status({"last_activity": "noon"}).error == "status: invalid last_activity"


@pytest.mark.parametrize("name", ["su_GET_api_status.json", "busy_kernel_state.json"])
def test_a_full_look_after_a_status_look_reads_as_if_it_had_asked_the_status_itself(name):
    data = fixture(name)
    status, kernels = (data["status"], data["kernels"]) if "status" in data else (data, [])
    remembered = status_answer(probe_from_status(status, via="proxy"))
    assert probe_from_answers(remembered, kernels, [], via="proxy") == probe_from_answers(status, kernels, [], via="proxy")


def test_needs_kernels_only_when_the_status_does_not_count_zero():
    assert needs_kernels({"kernels": 2}) and needs_kernels({}) and needs_kernels({"kernels": None})
    assert needs_kernels({"kernels": False})  # a bool is not a count: ask
    assert not needs_kernels({"kernels": 0})
    assert not needs_kernels("oops") and not needs_kernels(None)  # unreadable: the probe fails on it


def test_one_http_answer_is_read_kept_retried_or_refused():
    assert read_answer("status", 200, b'{"kernels": 0}') == (True, {"kernels": 0})
    assert read_answer("terminals", 404, b"", missing_ok=True) == (True, None)
    assert read_answer("kernels", 503, b"busy") == (False, "kernels: HTTP 503")  # worth the one retry
    for code, body, reason in [(404, b"", "kernels: HTTP 404"), (403, b"no", "kernels: HTTP 403"),
                               (200, b"<html>", "kernels: invalid JSON"), (200, b"\xff\xfe", "kernels: invalid JSON")]:
        with pytest.raises(ProbeFailure, match=f"^{reason}$"):
            read_answer("kernels", code, body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    | st.sampled_from(["2026-11-25T20:11:20Z", "2026-11-25T20:11:20.807385+01:00", "idle", "busy"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "name", "kernels", "connections", "last_activity", "started", "execution_state"]),
        inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(status=JSON, kernels=JSON, terminals=JSON)
def test_any_json_at_all_makes_a_probe_never_an_exception(status, kernels, terminals):
    full = probe_from_answers(status, kernels, terminals)
    assert full.ok == (full.error is None)
    alone = probe_from_status(status)
    assert alone.ok == (alone.error is None) and alone.kernels == ()
