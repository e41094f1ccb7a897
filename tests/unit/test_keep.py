""""Keep running" limits (reaper.core.keep.keep_until): examples, then properties over any request,
policy, count, max_age and walltime end (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reaper.config import parse_settings
from reaper.core.keep import MIN_KEEP, KeepPolicy, KeepRefused, keep_until

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_keep_until_applies_every_limit():
    p = KeepPolicy(max_extension=timedelta(hours=4), max_per_day=2)
    until, note = keep_until(now=NOW, requested=timedelta(hours=3), policy=p, keeps_today=0, started=None,
                             max_age=None, job_end=None)
    assert until == NOW + timedelta(hours=3) and note == ""
    until, note = keep_until(now=NOW, requested=timedelta(hours=3), policy=p, keeps_today=1,
                             started=NOW - timedelta(hours=1), max_age=timedelta(hours=10),
                             job_end=NOW + timedelta(hours=2))
    assert until == NOW + timedelta(hours=2) and "walltime" in note
    until, note = keep_until(now=NOW, requested=timedelta(hours=3), policy=p, keeps_today=1,
                             started=NOW - timedelta(hours=9), max_age=timedelta(hours=10), job_end=None)
    assert until == NOW + timedelta(hours=1) and note == "shortened to the longest a server may run (10h)"
    with pytest.raises(KeepRefused, match="at most 4h"):
        keep_until(now=NOW, requested=timedelta(hours=5), policy=p, keeps_today=0, started=None, max_age=None,
                   job_end=None)
    with pytest.raises(KeepRefused, match="2 times"):
        keep_until(now=NOW, requested=timedelta(hours=1), policy=p, keeps_today=2, started=None, max_age=None,
                   job_end=None)
    with pytest.raises(KeepRefused, match="walltime"):
        keep_until(now=NOW, requested=timedelta(hours=1), policy=p, keeps_today=0, started=None, max_age=None,
                   job_end=NOW)
    with pytest.raises(KeepRefused, match="choose how long"):
        keep_until(now=NOW, requested=timedelta(0), policy=p, keeps_today=0, started=None, max_age=None,
                   job_end=None)


def test_offered_choices_default_to_hours_below_the_maximum():
    assert KeepPolicy(max_extension=timedelta(hours=3)).offered() == [
        timedelta(hours=1), timedelta(hours=2), timedelta(hours=3)]
    assert KeepPolicy(max_extension=timedelta(minutes=90),
                      choices=(timedelta(minutes=90), timedelta(minutes=30), timedelta(minutes=30))).offered() == [
        timedelta(minutes=30), timedelta(minutes=90)]
    assert KeepPolicy(max_extension=timedelta(0)).offered() == []


def test_web_keep_in_config_becomes_the_core_policy():
    s = parse_settings("web:\n  keep: {max_extension: 90m, max_per_day: 5, choices: [30m, 90m]}\n", env={})
    assert s.keep_policy() == KeepPolicy(max_extension=timedelta(minutes=90), max_per_day=5,
                                         choices=(timedelta(minutes=30), timedelta(minutes=90)))
    assert parse_settings("", env={}).keep_policy() == KeepPolicy()


# --------------------------------------------------------------------------- properties

minutes = st.integers(min_value=-600, max_value=3000).map(lambda m: timedelta(minutes=m))
maybe_minutes = st.none() | minutes


@st.composite
def requests(draw: st.DrawFn) -> dict:
    most = draw(st.integers(min_value=0, max_value=1440))
    policy = KeepPolicy(max_extension=timedelta(minutes=most), max_per_day=draw(st.integers(min_value=0, max_value=5)))
    # half the requests within the policy's maximum, the others anything (too long, zero, negative)
    within = st.integers(min_value=1, max_value=max(most, 1)).map(lambda m: timedelta(minutes=m))
    requested = draw(within | minutes)
    # limits anywhere, or close to where the request ends (seconds either side)
    near = st.integers(min_value=-600, max_value=600).map(lambda s: requested + timedelta(seconds=s))
    end_in = draw(maybe_minutes | near)
    started_ago = draw(maybe_minutes)
    max_age = draw(st.none() | st.integers(min_value=1, max_value=4000).map(lambda m: timedelta(minutes=m)))
    if started_ago is not None and max_age is not None and draw(st.booleans()):
        max_age = max(started_ago + draw(near), timedelta(seconds=1))  # its end close to the request's
    return {
        "now": NOW,
        "requested": requested,
        "policy": policy,
        "keeps_today": draw(st.integers(min_value=0, max_value=8)),
        "started": NOW - started_ago if started_ago is not None else None,
        "max_age": max_age,
        "job_end": NOW + end_in if end_in is not None else None,
    }


def _run(kw: dict) -> tuple[datetime, str] | KeepRefused:
    try:
        return keep_until(**kw)
    except KeepRefused as e:
        return e


@settings(max_examples=500, deadline=None)
@given(requests())
def test_a_keep_never_passes_any_limit_nor_the_request(kw: dict) -> None:
    out = _run(kw)
    if isinstance(out, KeepRefused):
        return  # which requests are refused: the next test
    until, note = out
    now = kw["now"]
    assert now < until <= now + kw["requested"]
    assert kw["requested"] <= kw["policy"].max_extension
    if kw["job_end"] is not None:
        assert until <= kw["job_end"]
    if kw["max_age"] is not None and kw["started"] is not None:
        assert until <= kw["started"] + kw["max_age"]
    # a note says so exactly when a limit shortened the request, and never to a minute or less
    assert (note != "") == (until < now + kw["requested"])
    if note:
        assert until > now + MIN_KEEP


@settings(max_examples=500, deadline=None)
@given(requests())
def test_a_keep_is_refused_exactly_when_a_limit_forbids_it(kw: dict) -> None:
    now, p = kw["now"], kw["policy"]
    limits = [kw["job_end"]] if kw["job_end"] is not None else []
    if kw["max_age"] is not None and kw["started"] is not None:
        limits.append(kw["started"] + kw["max_age"])
    forbidden = (
        kw["requested"] <= timedelta(0)
        or kw["requested"] > p.max_extension
        or kw["keeps_today"] >= p.max_per_day
        or any(limit <= now + MIN_KEEP for limit in limits)
    )
    out = _run(kw)
    assert isinstance(out, KeepRefused) == forbidden
    if kw["keeps_today"] >= p.max_per_day and timedelta(0) < kw["requested"] <= p.max_extension:
        assert isinstance(out, KeepRefused) and f"at most {p.max_per_day}" in str(out)


@settings(max_examples=200, deadline=None)
@given(requests())
def test_a_keep_without_limits_is_what_was_asked(kw: dict) -> None:
    kw = {**kw, "job_end": None, "max_age": None}
    out = _run(kw)
    if not isinstance(out, KeepRefused):
        assert out == (kw["now"] + kw["requested"], "")
