"""Classification of hub data + probe results (pure), on the measured browser behaviour of STACK.md."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reaper.core.activity import classify, confirm_detached, needs_probe
from reaper.core.model import History, HubServer, Kernel, Probe, State

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "api-jupyterhub-6.1.1"
NOW = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)


def ts(minutes_ago: float) -> datetime:
    return NOW - timedelta(minutes=minutes_ago)


def server(**kw) -> HubServer:
    base = dict(user="alice", name="", started=ts(600), last_activity=ts(30), url="/user/alice/",
                state={"job_id": "42", "job_status": "RUNNING node1"})
    base.update(kw)
    return HubServer(**base)


def kernel(state="idle", connections=0, minutes_ago=30.0) -> Kernel:
    return Kernel(id="k", name="python3", execution_state=state, connections=connections,
                  last_activity=ts(minutes_ago))


def test_busy_kernel_is_computing_even_with_frozen_timestamps_and_no_browser():
    probe = Probe(ok=True, status_last_activity=ts(120), kernels=(kernel("busy", 0, 120),))
    obs = classify(server(), probe, NOW)
    assert obs.state is State.COMPUTING
    assert obs.busy_kernels == 1


def test_open_kernel_websocket_is_attached():
    probe = Probe(ok=True, status_last_activity=ts(0.1), kernels=(kernel("idle", 1, 5),))
    assert classify(server(), probe, NOW).state is State.ATTACHED


def test_hidden_tab_stays_attached_with_stale_status_and_reports_idle_since():
    probe = Probe(ok=True, status_last_activity=ts(300), kernels=(kernel("idle", 1, 400),))
    obs = classify(server(), probe, NOW)
    assert obs.state is State.ATTACHED
    assert obs.idle_since == ts(300)
    assert "background" in obs.detail


def test_closed_window_is_detached_since_the_later_of_kernel_and_status_activity():
    probe = Probe(ok=True, status_last_activity=ts(40), kernels=(kernel("idle", 0, 45),))
    obs = classify(server(), probe, NOW)
    assert obs.state is State.DETACHED
    assert obs.detached_since == ts(40)
    assert obs.idle_since == ts(40)


def test_launcher_or_terminal_tab_has_no_kernel_connection_but_fresh_status_so_attached():
    probe = Probe(ok=True, status_last_activity=ts(0.2), kernels=(), terminals=1)
    assert classify(server(), probe, NOW).state is State.ATTACHED


def test_no_kernel_and_stale_status_is_detached():
    probe = Probe(ok=True, status_last_activity=ts(200), kernels=())
    assert classify(server(), probe, NOW).state is State.DETACHED


def test_failed_probe_is_unreachable_and_uses_hub_activity():
    obs = classify(server(last_activity=ts(90)), Probe.failed("status: HTTP 502"), NOW)
    assert obs.state is State.UNREACHABLE
    assert obs.last_activity == ts(90)
    assert "502" in obs.detail


def test_pending_server_is_not_classified_idle():
    obs = classify(server(pending="spawn", ready=False), None, NOW)
    assert obs.state is State.PENDING


def test_future_status_activity_counts_as_fresh_not_detached():
    probe = Probe(ok=True, status_last_activity=NOW + timedelta(hours=2), kernels=(kernel("idle", 0, 500),))
    obs = classify(server(), probe, NOW)
    assert obs.state is State.ATTACHED
    assert obs.last_activity <= NOW


def test_missing_status_activity_counts_as_fresh():
    probe = Probe(ok=True, status_last_activity=None, kernels=())
    assert classify(server(), probe, NOW).state is State.ATTACHED


def test_unreachable_with_missing_or_future_hub_activity_is_active_now():
    assert classify(server(last_activity=None), Probe.failed("x"), NOW).last_activity == NOW
    far = NOW + timedelta(days=1)
    assert classify(server(last_activity=far), Probe.failed("x"), NOW).last_activity == NOW


def test_not_probed_server_is_attached_with_hub_activity():
    obs = classify(server(last_activity=ts(2)), None, NOW)
    assert obs.state is State.ATTACHED and not obs.probed


def test_job_id_comes_from_spawner_state():
    assert classify(server(), None, NOW).job_id == "42"
    assert classify(server(state={}), None, NOW).job_id is None


def test_needs_probe_skips_fresh_hub_activity_and_future_but_not_missing():
    assert not needs_probe(server(last_activity=ts(5)), NOW, timedelta(minutes=30))
    assert needs_probe(server(last_activity=ts(45)), NOW, timedelta(minutes=30))
    assert needs_probe(server(last_activity=None), NOW, timedelta(minutes=30))
    assert not needs_probe(server(last_activity=NOW + timedelta(hours=3)), NOW, timedelta(minutes=30))


def test_real_fixture_busy_kernel_is_computing():
    data = json.loads((FIX / "busy_kernel_state.json").read_text())
    from reaper.hub.models import kernel_from_model, parse_time  # the hub client's own parsers

    probe = Probe(ok=True, status_last_activity=parse_time(data["status"]["last_activity"]),
                  kernels=tuple(kernel_from_model(k) for k in data["kernels"]))
    now = datetime(2026, 11, 25, 20, 30, tzinfo=UTC)
    assert classify(server(), probe, now).state is State.COMPUTING


def test_a_failed_probe_mid_spell_continues_the_detached_spell():
    from reaper.core.activity import continue_spell
    from reaper.core.model import History

    since = ts(200)
    hist = History(last_state="detached", last_seen=ts(5), detached_since=since)
    obs = classify(server(last_activity=ts(190)), Probe.failed("status: HTTP 502"), NOW)
    assert continue_spell(obs, hist).idle_since == since  # same spell: no second warning
    moved = classify(server(last_activity=ts(1)), Probe.failed("status: HTTP 502"), NOW)
    assert continue_spell(moved, hist).idle_since == ts(1)  # the hub saw activity since: new spell
    attached_before = History(last_state="attached", last_seen=ts(5), detached_since=None)
    assert continue_spell(obs, attached_before) is obs


# --- confirm_detached: one /api/status answer instead of a full probe -------------------------


def was_detached(since_minutes_ago: float = 40, detail: str | None = "no browser connected, kernel idle") -> History:
    return History(last_state="detached", detached_since=ts(since_minutes_ago), last_seen=ts(5),
                   last_detail=detail)


def status(minutes_ago: float | None = 40, connections: int = 0, kernels: int | None = 1, ok: bool = True) -> Probe:
    if not ok:
        return Probe.failed("status: timeout after 5s")
    return Probe(ok=True, status_last_activity=ts(minutes_ago) if minutes_ago is not None else None,
                 status_connections=connections, status_kernels=kernels)


def test_status_unchanged_since_a_detached_look_confirms_the_same_spell():
    obs = confirm_detached(server(), status(40), was_detached(40), NOW)
    assert obs is not None and obs.state is State.DETACHED and obs.probed
    assert obs.detached_since == ts(40) and obs.idle_since == ts(40) and obs.last_activity == ts(40)
    assert obs.kernels == 1 and obs.busy_kernels == 0 and not obs.browser_connected
    assert obs.detail == "no browser connected, kernel idle"  # the full look's words stand
    # an older status time (the spell began with a kernel's message) confirms too
    assert confirm_detached(server(), status(50), was_detached(40), NOW) is not None


def test_a_kernel_count_or_terminals_unlike_the_last_look_need_the_full_probe():
    # a kernel shut down (jupyter_server does not move last_activity for it) or one more: the
    # recorded words no longer match what a full probe would say
    assert confirm_detached(server(), status(40, kernels=0), was_detached(40), NOW) is None
    assert confirm_detached(server(), status(40, kernels=2), was_detached(40), NOW) is None
    two = was_detached(40, detail="no browser connected, 2 kernels, all idle")
    assert confirm_detached(server(), status(40, kernels=2), two, NOW).detail == two.last_detail
    # terminals seen at the last look (probe.terminals): their count is not in /api/status
    terms = was_detached(40, detail="no browser connected, kernel idle, 1 terminal open")
    assert confirm_detached(server(), status(40), terms, NOW) is None
    assert confirm_detached(server(), status(40), was_detached(40, detail=None), NOW) is None
    # the words are classify's own
    full = classify(server(), Probe(ok=True, status_last_activity=ts(40), kernels=(kernel(), kernel())), NOW)
    assert full.detail == two.last_detail


def test_anything_since_the_spell_began_needs_the_full_probe():
    h = was_detached(40)
    # activity after the spell began: a kernel message (going busy sends one), a start, a shutdown,
    # a terminal, a request
    assert confirm_detached(server(), status(39), h, NOW) is None
    # a browser is connected again
    assert confirm_detached(server(), status(40, connections=1), h, NOW) is None
    # the status says too little to tell
    assert confirm_detached(server(), status(None), h, NOW) is None
    assert confirm_detached(server(), status(40, kernels=None), h, NOW) is None


def test_only_a_run_detached_at_its_last_look_is_confirmed():
    for state in ("attached", "computing", "unreachable", None):
        h = History(last_state=state, detached_since=ts(40), last_seen=ts(5))
        assert confirm_detached(server(), status(40), h, NOW) is None, state
    assert confirm_detached(server(), status(40), History(last_state="detached"), NOW) is None  # no spell start


def test_a_failed_or_fresh_status_confirms_nothing():
    assert confirm_detached(server(), status(ok=False), was_detached(40), NOW) is None
    # a status time within attached_within is an open tab, whatever the history says
    h = History(last_state="detached", detached_since=ts(1), last_seen=ts(0.5),
                last_detail="no browser connected, kernel idle")
    assert confirm_detached(server(), status(1), h, NOW) is None
    assert confirm_detached(server(), status(1), h, NOW, fresh_within=timedelta(seconds=30)) is not None
