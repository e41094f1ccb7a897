"""The pure notice rules (reaper.core.notices): quiet hours and the daily cap. Examples, then
properties that must hold for any input."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from reaper.core.model import Action, Decision, NoticeKind
from reaper.core.notices import SOFT, limit_notices, quiet_hours_end, soft_notice_counts

T = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
MONTREAL = ZoneInfo("America/Montreal")


@dataclass(frozen=True)
class Window:
    start: str
    end: str


ACTION_OF = {NoticeKind.WARNING: Action.WARN, NoticeKind.REMINDER: Action.REMIND, NoticeKind.FINAL: Action.FINAL,
             None: Action.OK}


def dec(notice: NoticeKind | None) -> Decision:
    return Decision(ACTION_OF[notice], "idle 2h", notice=notice, channels=("email",) if notice else ())


hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))
times = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC))
notices = st.sampled_from([NoticeKind.WARNING, NoticeKind.REMINDER, NoticeKind.FINAL, None])
items = st.lists(st.tuples(st.sampled_from(["ann", "bob", "cy"]), notices.map(dec)), max_size=30)


def test_quiet_hours_over_midnight_end_the_next_morning_and_not_at_noon():
    q = Window("22:00", "07:00")
    assert quiet_hours_end(q, datetime(2026, 1, 1, 23, 0, tzinfo=UTC), UTC) == datetime(2026, 1, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(q, datetime(2026, 1, 2, 3, 0, tzinfo=UTC), UTC) == datetime(2026, 1, 2, 7, 0, tzinfo=UTC)
    assert quiet_hours_end(q, datetime(2026, 1, 2, 7, 0, tzinfo=UTC), UTC) is None
    assert quiet_hours_end(q, datetime(2026, 1, 2, 12, 0, tzinfo=UTC), UTC) is None
    assert quiet_hours_end(Window("08:00", "08:00"), T, UTC) is None  # an empty window


def test_quiet_hours_are_read_in_the_hubs_time_zone():
    # 03:00 UTC is 22:00 in Montreal (winter): quiet until 07:00 there, 12:00 UTC
    end = quiet_hours_end(Window("22:00", "07:00"), datetime(2026, 1, 2, 3, 0, tzinfo=UTC), MONTREAL)
    assert end is not None and end.astimezone(UTC) == datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


@given(start=hhmm, end=hhmm, now=times)
def test_quiet_hours_end_later_within_a_day_at_their_local_end(start, end, now):
    until = quiet_hours_end(Window(start, end), now, MONTREAL)
    if until is None:
        return
    assert now < until <= now + timedelta(days=1, hours=1)  # (an hour of slack: a DST change)
    assert f"{until.astimezone(MONTREAL):%H:%M}" == end


@given(start=hhmm, end=hhmm, now=times)
def test_a_time_in_the_window_over_midnight_is_quiet_and_one_outside_is_not(start, end, now):
    local = f"{now:%H:%M}"  # ("HH:MM" strings compare as times; a time within the end minute is past it)
    if start == end:
        inside = False
    elif start < end:  # e.g. 12:00-14:00
        inside = start <= local < end
    else:  # over midnight, e.g. 22:00-07:00
        inside = local >= start or local < end
    assert (quiet_hours_end(Window(start, end), now, UTC) is not None) == inside


@given(items=items, cap=st.one_of(st.none(), st.integers(0, 3)), quiet=st.booleans(),
       before=st.dictionaries(st.sampled_from(["ann", "bob", "cy"]), st.integers(0, 4)))
def test_only_warnings_and_reminders_are_ever_postponed(items, cap, quiet, before):
    out, _ = limit_notices(items, before, cap=cap, quiet_until=T + timedelta(hours=3) if quiet else None, tz=UTC)
    assert len(out) == len(items)
    for (_, d), o in zip(items, out, strict=True):
        if d.notice not in SOFT:
            assert o is d  # a final notice (or no notice) passes untouched: never postponed
        elif o is not d:
            assert o.action is Action.OK and o.notice is None and o.channels == ()
            assert o.reason.startswith(d.reason) and "postponed" in o.reason


@given(items=items, cap=st.integers(0, 3),
       before=st.dictionaries(st.sampled_from(["ann", "bob", "cy"]), st.integers(0, 4)))
def test_the_cap_lets_no_user_past_it_and_the_counts_carry_over(items, cap, before):
    out, after = limit_notices(items, before, cap=cap, quiet_until=None, tz=UTC)
    for user in ("ann", "bob", "cy"):
        sent = sum(1 for (u, d), o in zip(items, out, strict=True) if u == user and d.notice in SOFT and o is d)
        asked = sum(1 for u, d in items if u == user and d.notice in SOFT)
        had = before.get(user, 0)
        assert sent == max(0, min(asked, cap - had))  # as many as the cap leaves, in order
        assert after.get(user, 0) == had + sent
    # batches of a sweep: the counts of one go into the next, same result as all at once
    half = len(items) // 2
    first, mid = limit_notices(items[:half], before, cap=cap, quiet_until=None, tz=UTC)
    second, end = limit_notices(items[half:], mid, cap=cap, quiet_until=None, tz=UTC)
    assert first + second == out and end == after


def test_quiet_hours_postpone_and_say_until_when_in_the_hubs_time():
    out, after = limit_notices([("ann", dec(NoticeKind.WARNING))], {}, cap=5,
                               quiet_until=datetime(2026, 1, 2, 12, 0, tzinfo=UTC), tz=MONTREAL)
    assert out[0].reason == "idle 2h [warning postponed: quiet hours until 07:00]"
    assert after == {}  # a postponed notice does not count against the cap


def test_soft_notice_counts_count_warnings_and_reminders_per_user():
    recent = [("ann", "warning"), ("ann", "reminder"), ("ann", "final"), ("bob", "stopped"), ("bob", "warning")]
    assert soft_notice_counts(recent) == {"ann": 2, "bob": 1}
