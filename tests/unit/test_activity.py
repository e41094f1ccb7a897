"""Classification of hub data + probe results (pure), on the measured browser behaviour of STACK.md."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.core.activity import classify, classify_work, confirm_detached, needs_probe
from reaper.core.model import (
    CpuSample,
    History,
    HubServer,
    Kernel,
    Observation,
    Probe,
    Program,
    State,
    Where,
    Work,
)
from reaper.hub.probe import ProbeFailure, parse_activity

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


# --------------------------------------------------------------------------- work: a program running

M = timedelta(minutes=1)
H = timedelta(hours=1)


def detached(since: datetime = ts(120)) -> Observation:
    return Observation(server=server(), state=State.DETACHED, at=NOW, last_activity=since, detached_since=since,
                       detail="no browser connected, kernel idle", probed=True)


def terminal_program(name="python", cpu=60.0, started=ts(60), pid=100, fg=True) -> Program:
    return Program(name=name, where=Where.TERMINAL, source="1", cpu_seconds=cpu, started=started, pid=pid,
                   foreground=fg)


def companion(*programs: Program) -> Work:
    return Work(programs=programs, companion="ok", batch="absent")


def remember(obs: Observation, history: History = History()) -> History:
    """The history the next look reads after recording ``obs`` (as the store keeps it)."""
    assert obs.memory is not None
    return replace(history, last_state=obs.state.value, last_detail=obs.detail, samples=obs.memory.samples,
                   working_at=obs.memory.working_at)


def test_a_silent_cpu_loop_in_a_closed_terminal_is_working_and_named():
    # first look: measured since the process started (60 s of CPU in an hour: 1.7 % of a core... below 2 %)
    low = classify_work(detached(), companion(terminal_program(cpu=60.0, fg=False)), History(), NOW)
    assert low.state is State.DETACHED
    # 3 minutes of CPU in an hour: 5 %: working
    obs = classify_work(detached(), companion(terminal_program(cpu=180.0, fg=False)), History(), NOW)
    assert obs.state is State.WORKING and obs.detached_since is None
    assert obs.detail == "python in terminal 1 used 3m of CPU since it started 1h ago"
    assert obs.memory is not None and obs.memory.working_at == NOW
    # the next look measures since this one: 14 min of CPU in the last hour
    later = classify_work(replace(detached(), at=NOW + H),
                          companion(terminal_program(cpu=180.0 + 14 * 60, fg=False)), remember(obs), NOW + H)
    assert later.state is State.WORKING
    assert later.detail == "python in terminal 1 used 14m of CPU in the last 1h"


def test_a_program_that_stopped_using_cpu_is_no_longer_working_unless_in_a_terminals_foreground():
    first = classify_work(detached(), companion(terminal_program(cpu=600.0, fg=False)), History(), NOW)
    assert first.state is State.WORKING
    same = classify_work(detached(), companion(terminal_program(cpu=600.5, fg=False)), remember(first), NOW + H)
    assert same.state is State.DETACHED  # 0.5 s in an hour: a background program doing nothing
    assert same.memory is not None and same.memory.working_at == NOW  # the last look it was working


def test_an_idle_shell_in_a_closed_terminal_is_not_working():
    obs = classify_work(detached(), companion(), History(), NOW)  # no process, no foreground command
    assert obs.state is State.DETACHED and obs.detail == "no browser connected, kernel idle"


def test_a_kernel_reporting_idle_whose_cpu_grows_is_working():
    k = Program(name="python3", where=Where.KERNEL, source="abcd", cpu_seconds=100.0, started=ts(600), pid=7,
                is_kernel=True, execution_state="idle")
    base = History(samples=(CpuSample(k.key, 40.0, NOW - 10 * M, ts(600)),))
    obs = classify_work(detached(), companion(k), base, NOW)
    assert obs.state is State.WORKING and obs.detail == "kernel python3 (idle) used 1m of CPU in the last 10m"
    quiet = classify_work(detached(), companion(replace(k, cpu_seconds=40.5)), base, NOW)
    assert quiet.state is State.DETACHED


def test_sleep_in_a_terminal_is_protected_for_protect_idle_then_idle_with_the_notice_naming_it():
    sleep = terminal_program(name="sleep", cpu=0.0, started=ts(90))
    obs = classify_work(detached(), companion(sleep), History(), NOW, protect_idle=2 * H)
    assert obs.state is State.WORKING
    assert obs.detail.startswith("sleep in terminal 1 is running (no CPU for 1h30m")
    later = NOW + 31 * M  # 2h01m after it started, without CPU
    after = classify_work(replace(detached(), at=later), companion(sleep), remember(obs), later, protect_idle=2 * H)
    assert after.state is State.DETACHED
    assert "sleep in terminal 1 has used no CPU for 2h" in after.detail
    assert after.memory is not None and after.memory.working_at == NOW  # its spell starts no earlier


def test_a_foreground_command_the_companion_found_no_process_for_is_protected_from_when_it_was_first_seen():
    fg = Program(name="vim", where=Where.TERMINAL, source="2", foreground=True)  # cpu unknown
    obs = classify_work(detached(), companion(fg), History(), NOW, protect_idle=2 * H)
    assert obs.state is State.WORKING and "vim in terminal 2" in obs.detail
    later = NOW + 2 * H + M
    assert classify_work(replace(detached(), at=later), companion(fg), remember(obs), later,
                         protect_idle=2 * H).state is State.DETACHED


def test_the_jobs_cpu_from_the_batch_accounting_counts_the_idle_server_below_the_threshold():
    job = Program(name="job", where=Where.JOB, source="42", cpu_seconds=30.0, started=ts(600))
    hist = History(samples=(CpuSample(job.key, 12.0, NOW - 10 * M, ts(600)),))
    # 18 s in 10 minutes: 3 % of a core: a program runs
    batch = Work(programs=(job,), companion="absent", batch="ok")
    obs = classify_work(detached(), batch, hist, NOW)
    assert obs.state is State.WORKING and obs.detail == "job 42 used 18s of CPU in the last 10m"
    # the idle server itself: 3 s in 10 minutes (0.5 %): not working
    idle_job = Work(programs=(replace(job, cpu_seconds=15.0),), companion="absent", batch="ok")
    assert classify_work(detached(), idle_job, hist, NOW).state is State.DETACHED


def test_a_restarted_program_whose_counter_went_back_is_measured_since_its_start():
    job = Program(name="job", where=Where.JOB, source="42", cpu_seconds=100.0, started=ts(30))
    hist = History(samples=(CpuSample(job.key, 5000.0, NOW - 10 * M, ts(600)),))
    obs = classify_work(detached(), Work(programs=(job,), batch="ok"), hist, NOW)
    assert obs.state is State.WORKING and "since it started 30m ago" in obs.detail


def test_a_span_too_short_for_the_figures_resolution_leaves_the_last_looks_verdict_standing():
    """sstat counts whole seconds: at 2 % no growth over 20 s cannot be told from 0.4 s used, so
    the last look's verdict stands; the companion's figures (clock ticks) tell it in 20 s."""
    s20 = NOW - 20 * timedelta(seconds=1)
    job = Program(name="job", where=Where.JOB, source="42", cpu_seconds=30.0, started=ts(600))
    busy = History(samples=(CpuSample(job.key, 30.0, s20, ts(600), used_at=s20),))
    assert classify_work(detached(), Work(programs=(job,), companion="absent", batch="ok"), busy,
                         NOW).state is State.WORKING
    quiet = History(samples=(CpuSample(job.key, 30.0, s20, ts(600)),))
    assert classify_work(detached(), Work(programs=(job,), companion="absent", batch="ok"), quiet,
                         NOW).state is State.DETACHED
    p = terminal_program(cpu=10.0, fg=False)  # the companion's: no growth in 20 s is told at once
    was_busy = History(samples=(CpuSample(p.key, 10.0, s20, ts(60), used_at=s20),))
    assert classify_work(detached(), companion(p), was_busy, NOW).state is State.DETACHED
    grew = History(samples=(CpuSample(p.key, 9.0, s20, ts(60)),))  # 1 s in 20 s: 5 % of a core
    assert classify_work(detached(), companion(p), grew, NOW).state is State.WORKING


def test_the_jobs_first_figure_is_a_baseline_where_the_companion_answered():
    """The job's CPU since its start includes the server's start-up: with the companion's own
    figures at hand, it protects nothing at its first look; without them it does."""
    job = Program(name="job", where=Where.JOB, source="42", cpu_seconds=5.0, started=NOW - 30 * timedelta(seconds=1))
    with_companion = classify_work(detached(), Work(programs=(job,), companion="ok", batch="ok"), History(), NOW)
    assert with_companion.state is State.DETACHED
    assert with_companion.memory is not None and with_companion.memory.samples[0].cpu_seconds == 5.0  # the baseline
    alone = classify_work(detached(), Work(programs=(job,), companion="absent", batch="ok"), History(), NOW)
    assert alone.state is State.WORKING
    # at the next look the job's growth counts, companion or not
    later = NOW + 2 * M
    grown = replace(job, cpu_seconds=20.0)
    hist = History(samples=with_companion.memory.samples)
    assert classify_work(replace(detached(), at=later), Work(programs=(grown,), companion="ok", batch="ok"),
                         hist, later).state is State.WORKING


def test_a_program_seconds_old_using_cpu_is_working_at_its_first_look():
    """A loop started a few seconds before the look (sweeps every few seconds in tests, or a
    program started just before a sweep) is told from its own figure: no minute-long wait."""
    p = replace(terminal_program(cpu=2.0, fg=False), started=NOW - 5 * timedelta(seconds=1))
    assert classify_work(detached(), companion(p), History(), NOW).state is State.WORKING
    idle = replace(p, cpu_seconds=0.0)
    assert classify_work(detached(), companion(idle), History(), NOW).state is State.DETACHED


def test_no_source_answering_keeps_a_server_working_at_its_last_look_for_at_most_protect_idle():
    failed = Work(companion="activity: timeout after 5s", batch="failed (sstat: exit 1)")
    was = History(last_state="working", last_detail="python in terminal 1 used 3m of CPU", working_at=NOW - 5 * M)
    obs = classify_work(detached(), failed, was, NOW, protect_idle=2 * H)
    assert obs.state is State.WORKING and "no source answered this time" in obs.detail
    assert obs.memory is not None and obs.memory.working_at == NOW - 5 * M  # not a new working look
    stale = replace(was, working_at=NOW - 2 * H)
    assert classify_work(detached(), failed, stale, NOW, protect_idle=2 * H).state is State.DETACHED
    # never working before: a failed source changes nothing
    assert classify_work(detached(), failed, History(), NOW).state is State.DETACHED
    assert failed.doubt == "companion: activity: timeout after 5s; batch accounting: failed (sstat: exit 1)"
    assert Work(companion="absent", batch="no figure for job 42").doubt is None


def test_a_failed_source_keeps_its_samples_for_the_next_look():
    p = terminal_program(cpu=10.0, fg=False)
    job = Program(name="job", where=Where.JOB, source="42", cpu_seconds=20.0, started=ts(600))
    kept = CpuSample(p.key, 9.0, NOW - 10 * M, ts(60))
    hist = History(samples=(kept, CpuSample(job.key, 10.0, NOW - 10 * M, ts(600))))
    obs = classify_work(detached(), Work(programs=(job,), companion="activity: HTTP 500", batch="ok"), hist, NOW)
    assert obs.memory is not None
    assert kept in obs.memory.samples and {s.key for s in obs.memory.samples} == {p.key, job.key}


def test_a_busy_kernel_stays_computing_and_its_samples_are_kept():
    comp = replace(detached(), state=State.COMPUTING, detached_since=None)
    obs = classify_work(comp, companion(terminal_program(cpu=600.0)), History(), NOW)
    assert obs.state is State.COMPUTING and obs.memory is not None and len(obs.memory.samples) == 1


programs = st.builds(
    Program,
    name=st.sampled_from(["python", "sleep", "job"]),
    where=st.sampled_from(list(Where)),
    source=st.sampled_from(["1", "k", "42", None]),
    cpu_seconds=st.none() | st.floats(min_value=0, max_value=1e6),
    started=st.none() | st.integers(min_value=-10_000, max_value=600).map(lambda m: NOW - timedelta(minutes=m)),
    pid=st.none() | st.integers(1, 5),
    foreground=st.booleans(),
)
outcomes = st.sampled_from(["ok", "absent", "activity: timeout after 5s", "not asked"])


@given(st.lists(programs, max_size=4), outcomes, outcomes,
       st.sampled_from([State.DETACHED, State.ATTACHED, State.UNREACHABLE, State.COMPUTING]),
       st.sampled_from([None, "working", "detached"]), st.integers(0, 600))
def test_the_work_look_never_makes_a_server_look_more_idle(progs, comp, batch, state, last, worked_ago):
    base = replace(detached(), state=state)
    hist = History(last_state=last, working_at=NOW - timedelta(minutes=worked_ago) if last else None)
    obs = classify_work(base, Work(programs=tuple(progs), companion=comp, batch=batch), hist, NOW)
    assert obs.state in (state, State.WORKING)
    assert obs.last_activity == base.last_activity  # the spell never moves earlier
    if obs.state is not State.WORKING:
        assert obs.detached_since == base.detached_since
    assert obs.memory is not None and all(s.at <= NOW for s in obs.memory.samples)


# --------------------------------------------------------------------------- the companion's report (hub adapter)

REPORT = {
    "version": 1, "now": "2026-11-25T20:00:00Z", "server": {"pid": 10, "cpu_seconds": 4.5},
    "kernels": [{"id": "k1", "name": "python3", "pid": 11, "execution_state": "idle", "cpu_seconds": 3.0,
                 "started": "2026-11-25T19:00:00Z"}],
    "terminals": [{"name": "1", "pid": 12, "foreground": "python"}, {"name": "2", "pid": 13, "foreground": None},
                  {"name": "3", "pid": 14, "foreground": "sleep"}],
    "processes": [
        {"pid": 20, "name": "python", "started_by": "terminal", "source": "1", "cpu_seconds": 90.0,
         "started": "2026-11-25T19:30:00Z"},
        {"pid": 21, "name": "python", "started_by": "kernel", "source": "k1", "cpu_seconds": 5.0,
         "started": "2026-11-25T19:40:00Z"},
        {"pid": 22, "name": "rsync", "started_by": "other", "source": None, "cpu_seconds": 1.0,
         "started": "2026-11-25T19:50:00Z"},
    ],
}


def test_the_companions_report_becomes_the_jobs_programs():
    kernel_, term, child, other, sleep = parse_activity(REPORT)
    assert kernel_.is_kernel and kernel_.label == "kernel python3 (idle)" and kernel_.cpu_seconds == 3.0
    assert term.label == "python in terminal 1" and term.foreground and term.cpu_seconds == 90.0
    assert term.started == datetime(2026, 11, 25, 19, 30, tzinfo=UTC)
    assert child.where is Where.KERNEL and not child.foreground and child.label == "python started by a kernel"
    assert other.where is Where.OTHER and other.label == "rsync (pid 22)"
    # terminal 3's foreground command is not among the processes: it still counts, CPU unknown
    assert sleep.label == "sleep in terminal 3" and sleep.foreground and sleep.cpu_seconds is None
    assert len({p.key for p in (kernel_, term, child, other, sleep)}) == 5


@pytest.mark.parametrize("broken", [
    [],
    "not json",
    {**REPORT, "version": None},
    {**REPORT, "kernels": {"k1": {}}},
    {**REPORT, "kernels": [{**REPORT["kernels"][0], "cpu_seconds": "3"}]},
    {**REPORT, "processes": [{**REPORT["processes"][0], "cpu_seconds": -1}]},
    {**REPORT, "processes": [{**REPORT["processes"][0], "started_by": "cron"}]},
    {**REPORT, "processes": [{**REPORT["processes"][0], "started": "yesterday"}]},
    {**REPORT, "processes": [{**REPORT["processes"][0], "pid": "20"}]},
    {**REPORT, "terminals": [{"name": 1, "foreground": "python"}]},
])
def test_a_malformed_report_is_a_failed_source_never_a_partial_one(broken):
    with pytest.raises(ProbeFailure, match="^activity: "):
        parse_activity(broken)


def test_the_hub_client_asks_the_companion_like_a_probe_and_reads_404_as_absent():
    import asyncio

    from reaper.hub import Answer, HubClient, TransportTimeout

    class Scripted:
        def __init__(self, answers):
            self.answers, self.sent = list(answers), []

        async def send(self, method, url, headers, body, seconds):
            self.sent.append((method, url, headers.get("Authorization")))
            a = self.answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a

        async def aclose(self):
            return None

    def ask(*answers):
        probes = Scripted(answers)
        client = HubClient("http://127.0.0.1:1/hub/api", "tok", transports=(Scripted([]), probes))
        sv = server(target="http://127.0.0.1:5", url="/user/alice/")
        return asyncio.run(client.activity(sv)), probes.sent

    work, sent = ask(Answer(200, json.dumps(REPORT).encode()))
    assert work.companion == "ok" and len(work.programs) == 5
    assert sent == [("GET", "http://127.0.0.1:5/user/alice/api/reaper/activity?no_track_activity=1", "token tok")]
    assert ask(Answer(404, b"{}"))[0] == Work(companion="absent")
    assert ask(Answer(200, b"{not json"))[0].companion == "activity: invalid JSON"
    assert ask(Answer(200, b'{"version": 1, "processes": 3}'))[0].companion.startswith("activity: processes")
    slow, sent = ask(TransportTimeout("ReadTimeout", "slow"), TransportTimeout("ReadTimeout", "slow"))
    assert slow.companion == "activity: timeout after 5s" and len(sent) == 2  # retried once, as a probe
    assert ask(Answer(403, b""))[0].companion == "activity: HTTP 403"
