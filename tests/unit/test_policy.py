"""The pure policy: examples of the notice cycle, then properties that must hold for any input."""

from dataclasses import replace as dc_replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.config import parse_settings
from reaper.core.model import (
    Action,
    History,
    HubServer,
    NoticeKind,
    Observation,
    SentNotice,
    State,
    Work,
)
from reaper.core.policy import could_stop, decide, probe_horizon, select_rule

NOW = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
H = timedelta(hours=1)
M = timedelta(minutes=1)

CFG = parse_settings(
    """
defaults:
  detached: {warn_after: 1h, stop_after: 3h}
  attached: {warn_after: 8h, stop_after: 24h}
  remind_every: 30m
  min_notice: 30m
rules:
  - name: staff
    match: {groups: [staff]}
    exempt: true
  - name: gpu
    match: {min_gpus: 1}
    detached: {stop_after: 2h}
    max_age: 2d
  - name: long-jobs
    match: {user_options: {partition: [long, "long-*"]}}
    computing: count
  - name: batch-work
    match: {user_options: {partition: batch}}
    working: count
working: {protect_idle: 2h}
""",
    env={},
)
RULES = CFG.resolved_rules()
DEFAULT = CFG.default_rule()


def srv(**kw) -> HubServer:
    base = dict(user="alice", name="", started=NOW - 10 * H, last_activity=NOW - H, url="/user/alice/")
    base.update(kw)
    return HubServer(**base)


def obs(state=State.DETACHED, idle=H, server=None, connected=False) -> Observation:
    since = NOW - idle
    return Observation(
        server=server or srv(),
        state=state,
        at=NOW,
        last_activity=since,
        detached_since=since if state is State.DETACHED else None,
        browser_connected=connected,
        detail="test",
    )


def rule_for(server):
    return select_rule(RULES, DEFAULT, server)


def notice(kind, spell, at, delivered=True):
    return SentNotice(kind=kind, spell=spell, created_at=at, delivered_at=at if delivered else None)


def d(o, h=History(), now=NOW, rule=None):
    return decide(o, h, rule or rule_for(o.server), now, UTC)


# ---------------------------------------------------------------- examples


def test_detached_under_warn_after_is_ok_and_says_when_it_will_warn_and_stop():
    dec = d(obs(idle=30 * M))
    assert dec.action is Action.OK
    assert "warning at 20:30" in dec.reason and "stop at 22:30" in dec.reason
    assert dec.stop_at == NOW + 150 * M


def test_detached_past_warn_after_warns_once_then_reminds():
    o = obs(idle=70 * M)
    spell = o.idle_since
    assert d(o).action is Action.WARN
    h = History(notices=(notice(NoticeKind.WARNING, spell, NOW - 10 * M),))
    assert d(o, h).action is Action.OK
    h2 = History(notices=(notice(NoticeKind.WARNING, spell, NOW - 31 * M),))
    assert d(o, h2).action is Action.REMIND


def test_final_notice_goes_out_min_notice_before_stop_after():
    o = obs(idle=150 * M)  # 2h30 = stop_after 3h - min_notice 30m
    dec = d(o, History(notices=(notice(NoticeKind.WARNING, o.idle_since, NOW - 60 * M),)))
    assert dec.action is Action.FINAL and dec.notice is NoticeKind.FINAL
    assert dec.stop_at == NOW + 30 * M


def test_stop_only_after_delivered_final_and_min_notice():
    o = obs(idle=4 * H)
    spell = o.idle_since
    # final queued but not delivered: no stop
    h = History(notices=(notice(NoticeKind.FINAL, spell, NOW - H, delivered=False),))
    assert d(o, h).action is Action.OK and "not delivered" in d(o, h).reason
    # delivered 10 minutes ago: stop waits until 30 min after delivery
    h = History(notices=(notice(NoticeKind.FINAL, spell, NOW - 10 * M),))
    dec = d(o, h)
    assert dec.action is Action.OK and dec.stop_at == NOW + 20 * M
    h = History(notices=(notice(NoticeKind.FINAL, spell, NOW - 31 * M),))
    assert d(o, h).action is Action.STOP


def test_final_failed_on_every_channel_still_lets_the_stop_happen_after_min_notice():
    o = obs(idle=4 * H)
    n = SentNotice(NoticeKind.FINAL, o.idle_since, NOW - H, None, failed=True, failed_at=NOW - 40 * M)
    dec = d(o, History(notices=(n,)))
    assert dec.action is Action.STOP and "failed on every channel" in dec.reason


def test_activity_starts_a_new_spell_old_notices_do_not_count():
    old_spell = NOW - 5 * H
    h = History(notices=(notice(NoticeKind.FINAL, old_spell, NOW - 3 * H),))
    o = obs(idle=20 * M)  # came back and left again 20 minutes ago
    assert d(o, h).action is Action.OK


def test_busy_kernel_is_protected_by_default():
    dec = d(obs(State.COMPUTING, idle=30 * H))
    assert dec.action is Action.OK and "protected" in dec.reason


def test_busy_kernel_counts_as_idle_where_a_rule_says_count():
    s = srv(user_options={"partition": "long-a100"})
    assert rule_for(s).name == "long-jobs"
    assert d(obs(State.COMPUTING, idle=2 * H, server=s)).action is Action.WARN


def test_exempt_group_is_never_acted_on():
    s = srv(groups=("staff",))
    dec = d(obs(idle=30 * H, server=s))
    assert dec.action is Action.EXEMPT


def test_hidden_tab_uses_attached_thresholds():
    assert d(obs(State.ATTACHED, idle=5 * H, connected=True)).action is Action.OK
    assert d(obs(State.ATTACHED, idle=9 * H, connected=True)).action is Action.WARN


def test_unreachable_may_warn_but_never_gets_final_or_stop():
    o = obs(State.UNREACHABLE, idle=30 * H)
    dec = d(o)
    assert dec.action is Action.WARN
    h = History(notices=(notice(NoticeKind.WARNING, o.idle_since, NOW - 2 * H),))
    assert d(o, h).action is Action.REMIND
    h = History(notices=(notice(NoticeKind.FINAL, o.idle_since, NOW - 2 * H),))
    assert d(o, h).action is not Action.STOP


def test_gpu_rule_matches_on_user_options_and_has_max_age():
    s = srv(user_options={"gpus": "2"}, started=NOW - 47 * H - 40 * M)
    r = rule_for(s)
    assert r.name == "gpu" and r.detached.warn_after == H and r.detached.stop_after == 2 * H
    dec = d(obs(State.COMPUTING, idle=H, server=s))  # busy, but max_age 2d is 20 min away
    assert dec.action is Action.FINAL and dec.spell is None and "longest allowed" in dec.reason


def test_gpu_and_partition_rules_read_every_spawners_user_options():
    # stock batchspawner (its trait names, and the script variables), slurmformspawner's gres choice
    for opts in ({"req_ngpus": "1"}, {"ngpus": "2"}, {"gres": "gpu:2"}, {"gpus": "gpu:a100:1"}):
        assert rule_for(srv(user_options=opts)).name == "gpu", opts
    for opts in ({"gpus": "gpu:0"}, {"gpus": 0}, {"gres": "shard:1"}):
        assert rule_for(srv(user_options=opts)).name != "gpu", opts
    cfg = parse_settings("rules:\n  - name: main\n    match: {partitions: [main]}\n    exempt: true\n", env={})
    rule = select_rule(cfg.resolved_rules(), cfg.default_rule(), srv(user_options={"req_partition": "main"}))
    assert rule.name == "main"


def test_kept_until_suspends_idle_notices():
    o = obs(idle=10 * H)
    assert d(o, History(kept_until=NOW + H)).action is Action.OK
    assert d(o, History(kept_until=NOW - M)).action is not Action.OK


def test_future_activity_is_treated_as_active():
    o = Observation(server=srv(), state=State.DETACHED, at=NOW, last_activity=NOW + H, detached_since=NOW + H)
    assert d(o).action is Action.OK


def test_probe_horizon_is_the_shortest_time_any_rule_could_act():
    assert probe_horizon(RULES, DEFAULT) == H  # detached.warn_after 1h


def test_pending_server_is_ok():
    o = Observation(server=srv(pending="spawn", ready=False), state=State.PENDING, at=NOW, last_activity=None)
    assert d(o).action is Action.OK


# ---------------------------------------------------------------- properties

states = st.sampled_from([State.DETACHED, State.ATTACHED, State.COMPUTING, State.UNREACHABLE, State.WORKING])
durations = st.integers(min_value=0, max_value=80 * 3600).map(lambda s: timedelta(seconds=s))
kinds = st.sampled_from(list(NoticeKind)[:3])


@st.composite
def scenario(draw):
    state = draw(states)
    idle = draw(durations)
    age = idle + draw(durations)
    opts = draw(st.sampled_from([{}, {"gpus": 1}, {"partition": "long"}, {"partition": "batch"}]))
    groups = draw(st.sampled_from([(), ("staff",), ("students",)]))
    server = srv(started=NOW - age, user_options=opts, groups=groups)
    o = obs(state, idle=idle, server=server, connected=draw(st.booleans()))
    spells = [o.idle_since, None, o.idle_since - H]
    notices = tuple(
        SentNotice(
            kind=draw(kinds),
            spell=draw(st.sampled_from(spells)),
            created_at=NOW - draw(durations),
            delivered_at=draw(st.one_of(st.none(), st.just(NOW - draw(durations)))),
        )
        for _ in range(draw(st.integers(0, 4)))
    )
    working_at = draw(st.one_of(st.none(), durations.map(lambda t: NOW - t)))
    return o, History(notices=notices, working_at=working_at)


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_never_stop_a_computing_server_under_protect_unless_max_age(sc):
    o, h = sc
    o = dc_replace(o, state=State.COMPUTING)
    r = rule_for(o.server)
    dec = decide(o, h, r, NOW, UTC)
    if r.computing == "protect":
        assert dec.action is not Action.STOP or dec.spell is None  # only the run-wide max_age


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_never_stop_without_a_final_notice_settled_min_notice_earlier(sc):
    o, h = sc
    r = rule_for(o.server)
    dec = decide(o, h, r, NOW, UTC)
    if dec.action is Action.STOP:
        finals = [n for n in h.notices if n.kind is NoticeKind.FINAL and n.spell == dec.spell]
        assert finals, "stop without a final notice"
        settled = finals[0].delivered_at
        assert settled is not None and settled + r.min_notice <= NOW


@settings(max_examples=300, deadline=None)
@given(scenario(), st.sampled_from(list(State)))
def test_could_stop_is_an_upper_bound_on_stop_whatever_the_probe_shows(sc, state):
    # The sweep counts could_stop() runs BEFORE probing to know the safety limits cannot trip;
    # that is sound only if no observation of such a run can lead to a stop otherwise.
    o, h = sc
    o = dc_replace(o, state=state)
    if decide(o, h, rule_for(o.server), NOW, UTC).action is Action.STOP:
        assert could_stop(h)


def test_could_stop_needs_a_settled_final_notice() -> None:
    t = NOW - H
    assert not could_stop(History())
    assert not could_stop(History(notices=(SentNotice(NoticeKind.WARNING, t, t, t),)))
    assert not could_stop(History(notices=(SentNotice(NoticeKind.FINAL, t, t, None),)))  # queued only
    assert could_stop(History(notices=(SentNotice(NoticeKind.FINAL, t, t, t),)))
    assert could_stop(History(notices=(SentNotice(NoticeKind.FINAL, t, t, None, failed=True, failed_at=t),)))


@given(scenario())
def test_never_stop_an_exempt_server(sc):
    o, h = sc
    s = dc_replace(o.server, groups=("staff",))
    o = dc_replace(o, server=s)
    assert decide(o, h, rule_for(s), NOW, UTC).action is Action.EXEMPT


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_never_stop_on_a_failed_probe_alone(sc):
    o, h = sc
    o = dc_replace(o, state=State.UNREACHABLE)
    dec = decide(o, h, rule_for(o.server), NOW, UTC)
    assert dec.action is not Action.STOP or dec.spell is None
    assert dec.action is not Action.FINAL or dec.spell is None


@settings(max_examples=300, deadline=None)
@given(scenario(), st.lists(durations, min_size=2, max_size=6))
def test_decisions_are_monotone_in_time_for_a_fixed_history(sc, steps):
    o, h = sc
    r = rule_for(o.server)
    ranks = []
    t = NOW
    for step in sorted(steps):
        now = NOW + step
        if now < t:
            continue
        t = now
        ranks.append(decide(dc_replace(o, at=now), h, r, now, UTC).rank)
    assert ranks == sorted(ranks)


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_every_decision_has_a_reason_and_a_notice_only_when_it_sends_one(sc):
    o, h = sc
    dec = decide(o, h, rule_for(o.server), NOW, UTC)
    assert dec.reason
    if dec.action in (Action.WARN, Action.REMIND, Action.FINAL):
        assert dec.notice is not None
    else:
        assert dec.notice is None



# ---------------------------------------------------------------- working (a program running)


def working(idle=4 * H, server=None, detail="python in terminal 1 used 14m of CPU in the last 1h") -> Observation:
    return dc_replace(obs(State.WORKING, idle=idle, server=server), detail=detail)


def test_a_working_server_under_protect_gets_no_notice_and_no_stop_and_its_reason_names_the_program():
    o = working()
    spell = o.idle_since
    h = History(notices=(notice(NoticeKind.FINAL, spell, NOW - 2 * H),))  # a final notice long delivered
    for hist in (History(), h):
        dec = d(o, hist)
        assert dec.action is Action.OK and dec.notice is None and dec.stop_at is None
        assert dec.reason == ("working: python in terminal 1 used 14m of CPU in the last 1h; "
                              "a running program is protected (defaults)")


def test_max_age_still_ends_a_working_server():
    s = srv(started=NOW - 3 * 24 * H, user_options={"gpus": 1})  # rule gpu: max_age 2d
    o = working(server=s)
    h = History(notices=(notice(NoticeKind.FINAL, None, NOW - 2 * H),))
    dec = d(o, h)
    assert dec.action is Action.STOP and dec.spell is None and "running for 3d" in dec.reason


def test_working_count_counts_a_working_server_as_idle():
    o = working(idle=70 * M, server=srv(user_options={"partition": "batch"}))
    dec = d(o)
    assert dec.action is Action.WARN and dec.rule == "batch-work"
    assert dec.reason.startswith("python in terminal 1 used 14m of CPU in the last 1h, counted as idle by policy")


def test_when_a_server_stops_working_its_idle_spell_starts_no_earlier_than_the_last_working_look():
    o = obs(idle=4 * H)  # its kernels say idle for 4h ...
    was = NOW - 20 * M  # ... but a program ran until 20 minutes ago
    dec = d(o, History(working_at=was))
    assert dec.action is Action.OK and dec.spell == was and "warning at 20:40" in dec.reason
    # count: the program never counted, the spell is the kernels'
    dec = d(dc_replace(o, server=srv(user_options={"partition": "batch"})), History(working_at=was))
    assert dec.spell == o.idle_since and dec.action is Action.FINAL
    # activity after the program ended starts the spell later still
    assert d(obs(idle=10 * M), History(working_at=was)).spell == NOW - 10 * M


def test_a_stop_waits_while_a_source_of_the_work_look_fails_for_at_most_protect_idle():
    o = dc_replace(obs(idle=5 * H), work=Work(companion="activity: timeout after 5s", batch="absent"))
    spell = o.idle_since
    h = History(notices=(notice(NoticeKind.FINAL, spell, NOW - 31 * M),))  # stop due at NOW - 1 min
    dec = d(o, h)
    assert dec.action is Action.OK and "stop held: could not tell whether a program runs" in dec.reason
    assert "companion: activity: timeout after 5s" in dec.reason
    assert d(o, h, now=NOW + 2 * H).action is Action.STOP  # not forever: protect_idle after it was due
    absent = dc_replace(o, work=Work(companion="absent", batch="no figure for job 42"))
    assert d(absent, h).action is Action.STOP  # absent sources are no doubt: decided as before


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_never_stop_a_working_server_under_protect_unless_max_age(sc):
    o, h = sc
    o = dc_replace(o, state=State.WORKING, detached_since=None)
    r = rule_for(o.server)
    for now in (NOW, NOW + 10 * H, NOW + 1000 * H):
        dec = decide(dc_replace(o, at=now), h, r, now, UTC)
        if r.working == "protect":
            assert dec.action is not Action.STOP or dec.spell is None  # only the run-wide max_age
            assert dec.notice in (None, NoticeKind.FINAL) and (dec.notice is None or dec.spell is None)
