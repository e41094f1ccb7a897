"""reaper.units: the one parser/formatter of each unit, by example and by property."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.units import (
    Requested,
    format_duration,
    format_memory,
    format_walltime,
    humanize,
    local_datetime,
    local_time,
    parse_duration,
    parse_gres,
    parse_iso,
    parse_memory_mb,
    parse_walltime,
    read_user_options,
    relative,
    requested_gpus,
    requested_partition,
    utc_or_none,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "api-jupyterhub-6.1.1"
MONTREAL = ZoneInfo("America/Montreal")

# --------------------------------------------------------------------------- ISO 8601


def _timestamps(data: object) -> list[str]:
    if isinstance(data, dict):
        return [v for k, v in data.items() if k in ("started", "last_activity", "created") and isinstance(v, str)] + [
            t for v in data.values() for t in _timestamps(v)]
    if isinstance(data, list):
        return [t for v in data for t in _timestamps(v)]
    return []


def test_every_timestamp_the_real_hub_and_server_wrote_parses_to_aware_utc() -> None:
    found = [t for f in sorted(FIXTURES.glob("*.json")) for t in _timestamps(json.loads(f.read_text()))]
    assert len(found) >= 5
    for text in found:
        dt = parse_iso(text)
        assert dt.tzinfo is UTC and dt.isoformat().startswith(text[:19])


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-25T20:11:18.450611Z", datetime(2026, 11, 25, 20, 11, 18, 450611, tzinfo=UTC)),  # JupyterHub
    ("2026-11-25T20:11:18.450Z", datetime(2026, 11, 25, 20, 11, 18, 450000, tzinfo=UTC)),  # JavaScript
    ("2026-11-25T15:11:18-05:00", datetime(2026, 11, 25, 20, 11, 18, tzinfo=UTC)),  # an offset
    ("2026-11-25T21:11:18+0100", datetime(2026, 11, 25, 20, 11, 18, tzinfo=UTC)),
    ("2026-11-25 20:11:18.450611", datetime(2026, 11, 25, 20, 11, 18, 450611, tzinfo=UTC)),  # SQLite, naive
    ("2026-11-25T20:11", datetime(2026, 11, 25, 20, 11, tzinfo=UTC)),
    ("2026-11-25T20:11:18.123456789Z", datetime(2026, 11, 25, 20, 11, 18, 123456, tzinfo=UTC)),
])
def test_iso_timestamps_of_real_sources_parse(text: str, expected: datetime) -> None:
    assert parse_iso(text) == expected and parse_iso(text).tzinfo is UTC


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-11-25", "2026-W48-3T10:00", "20261125T201118Z",
                                 "2026-13-25T20:11:18Z", "1732565478", "2026-11-25T20:11:18Z trailing"])
def test_iso_parse_refuses_what_no_source_writes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_iso(bad)
    assert utc_or_none(bad) is None


def test_as_utc_takes_datetimes_and_strings_and_forgives_nothing_else() -> None:
    assert utc_or_none(None) is None and utc_or_none(42) is None
    assert utc_or_none(datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    plus1 = datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert utc_or_none(plus1) == datetime(2026, 1, 1, tzinfo=UTC) and utc_or_none(plus1).tzinfo is UTC  # type: ignore[union-attr]


aware = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1),
                     timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30)),
                                                MONTREAL]), allow_imaginary=False)


@given(aware)
def test_iso_parse_reads_back_isoformat(dt: datetime) -> None:
    # compared as UTC instants: Python never calls a time in a zone's repeated hour equal to another zone's
    assert parse_iso(dt.isoformat()) == dt.astimezone(UTC)
    assert parse_iso(dt.astimezone(UTC).isoformat().replace("+00:00", "Z")) == dt.astimezone(UTC)


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1)))
def test_iso_parse_takes_naive_values_as_utc(dt: datetime) -> None:
    assert parse_iso(dt.isoformat()) == dt.replace(tzinfo=UTC)
    assert parse_iso(dt.isoformat(sep=" ")) == dt.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- local and relative time


def test_local_time_is_the_clock_today_and_names_the_day_otherwise() -> None:
    assert local_time(NOW, MONTREAL, NOW) == "07:00"
    assert local_time(NOW + timedelta(days=1), MONTREAL, NOW) == "Thu 26 Nov 07:00"
    assert local_time(datetime(2026, 12, 3, 12, tzinfo=UTC), MONTREAL, NOW) == "Thu 3 Dec 07:00"  # no leading 0
    assert local_time(None, MONTREAL, NOW) == ""
    # "today" is the hub's day: 02:00 UTC on the 26th is still the 25th in Montreal
    assert local_time(datetime(2026, 11, 26, 2, tzinfo=UTC), MONTREAL, NOW) == "21:00"


def test_local_datetime_names_its_zone_and_date_for_a_notice() -> None:
    at = datetime(2026, 11, 25, 19, 0, tzinfo=UTC)
    assert local_datetime(at, ZoneInfo("America/Toronto")) == "14:00 EST, Wed 25 Nov"
    assert local_datetime(at, ZoneInfo("America/Toronto"), with_date=False) == "14:00 EST"
    assert local_datetime(datetime(2026, 7, 1, 18), ZoneInfo("America/Toronto")) == "14:00 EDT, Wed 1 Jul"  # naive = UTC
    assert local_datetime(None, UTC) == "(unknown)"


@pytest.mark.parametrize(("delta", "words"), [
    (timedelta(seconds=10), "now"), (timedelta(seconds=-59), "now"),
    (timedelta(minutes=1), "in 1 min"), (timedelta(minutes=42, seconds=59), "in 42 min"),
    (-timedelta(minutes=42), "42 min ago"), (timedelta(hours=1), "in 1h"),
    (-timedelta(hours=3, minutes=10), "3h10m ago"), (timedelta(hours=3, minutes=5), "in 3h05m"),
    (timedelta(days=3), "in 3d"), (-timedelta(days=2, hours=3, minutes=59), "2d3h ago"),
])
def test_relative_times(delta: timedelta, words: str) -> None:
    assert relative(NOW + delta, NOW) == words


@given(st.timedeltas(min_value=timedelta(minutes=1), max_value=timedelta(days=3000)))
def test_relative_is_symmetric_in_past_and_future(delta: timedelta) -> None:
    future, past = relative(NOW + delta, NOW), relative(NOW - delta, NOW)
    assert future.startswith("in ") and past.endswith(" ago")
    assert future.removeprefix("in ") == past.removesuffix(" ago")


# --------------------------------------------------------------------------- durations


def test_durations_parse_as_config_writes_them() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration(" 2 D ") == timedelta(days=2)
    assert parse_duration(90) == timedelta(seconds=90)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    for bad in ("-1h", "soon", "", True, None, "1y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


whole_seconds = st.integers(min_value=0, max_value=10**9).map(lambda s: timedelta(seconds=s))


@given(whole_seconds)
def test_format_duration_round_trips(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10**5)))
def test_humanize_keeps_the_largest_unit_and_never_overstates(td: timedelta) -> None:
    words = humanize(td)
    back = parse_duration(words)
    assert back <= td and td - back < (timedelta(days=1) if td >= timedelta(days=1) else timedelta(hours=1)
                                       if td >= timedelta(hours=1) else timedelta(minutes=1)
                                       if td >= timedelta(minutes=1) else timedelta(seconds=1))
    assert humanize(-td) == ("-" + words if int(td.total_seconds()) else words)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize(("value", "mb"), [
    ("4G", 4096), ("512M", 512), ("16000", 16000), (16000, 16000), ("512K", 0.5), ("1.5T", 1.5 * 1024**2),
    ("16 GB", 16384), ("16GiB", 16384), ("8g", 8192), ("1P", 1024.0**3),
])
def test_memory_sizes_as_slurm_writes_them(value: object, mb: float) -> None:
    assert parse_memory_mb(value) == mb


@pytest.mark.parametrize("bad", [None, "", "0", 0, -5, "lots", "512B", "4 X", True, "-4G"])
def test_memory_that_says_nothing_is_unknown(bad: object) -> None:
    assert parse_memory_mb(bad) is None


units = st.sampled_from(["K", "M", "G", "T"])


@given(st.integers(1, 10**6), st.integers(1, 10**6), units)
def test_memory_parse_is_monotone_in_the_number(a: int, b: int, unit: str) -> None:
    lo, hi = sorted((a, b))
    assert parse_memory_mb(f"{lo}{unit}") <= parse_memory_mb(f"{hi}{unit}")  # type: ignore[operator]


@given(st.integers(1, 10**6))
def test_memory_parse_is_monotone_in_the_unit(n: int) -> None:
    sizes = [parse_memory_mb(f"{n}{u}") for u in "KMGTP"]
    assert sizes == sorted(sizes) and parse_memory_mb(str(n)) == parse_memory_mb(f"{n}M")


def test_memory_for_people() -> None:
    assert format_memory(16384) == "16 GB"
    assert format_memory(16000) == "15.6 GB"
    assert format_memory(512) == "512 MB"
    assert format_memory(None) == ""


@given(st.integers(1, 1023) | st.integers(1, 10**5).map(lambda g: g * 1024))
def test_memory_format_reads_back_exactly_for_whole_mb_and_gb(mb: int) -> None:
    assert parse_memory_mb(format_memory(mb)) == mb


# --------------------------------------------------------------------------- walltime


@pytest.mark.parametrize(("value", "td"), [
    ("2:00:00", timedelta(hours=2)), ("1-12:00:00", timedelta(days=1, hours=12)), ("90", timedelta(minutes=90)),
    ("30:00", timedelta(minutes=30)), ("30:15", timedelta(minutes=30, seconds=15)), ("1-02", timedelta(days=1, hours=2)),
    ("1-02:30", timedelta(days=1, hours=2, minutes=30)), (90, timedelta(minutes=90)), ("8h", timedelta(hours=8)),
])
def test_walltimes_as_slurm_writes_them(value: object, td: timedelta) -> None:
    assert parse_walltime(value) == td


@pytest.mark.parametrize("bad", [None, "", "never", "UNLIMITED", "INFINITE", 0, "0", "00:00:00", True, "1-", "1:2:3:4"])
def test_walltime_without_an_end_is_none(bad: object) -> None:
    assert parse_walltime(bad) is None


@given(st.integers(0, 10**8).map(lambda s: timedelta(seconds=s)))
def test_walltime_format_round_trips(td: timedelta) -> None:
    assert parse_walltime(format_walltime(td)) == (td or None)


# --------------------------------------------------------------------------- GPUs and user_options


@pytest.mark.parametrize(("gres", "parsed"), [
    ("gpu:2", (2, None)), ("gpu:a100:2", (2, "a100")), ("gres:gpu:1", (1, None)), ("gres/gpu=4", (4, None)),
    ("gres/gpu:a100=2", (2, "a100")), ("gpu", (1, None)), ("gpu:0", (0, None)),
    ("cpu=4,mem=16G,gres/gpu=2,gres/gpu:a100=2", (2, "a100")), ("gpu:a100:1,gpu:v100:1", (2, None)),
    ("gres:gpu:a100:2(IDX:0-1)", (2, "a100")), ("mem=4G", None), ("", None),
])
def test_gres(gres: str, parsed: object) -> None:
    assert parse_gres(gres) == parsed


def test_user_options_of_our_spawner() -> None:
    # reaper.hubside.spawner.SlurmSpawner.validate_user_options' output
    r = read_user_options({"partition": "gpu", "runtime": "1-00:00:00", "memory": "32G", "gpus": 2})
    assert r == Requested(cpus=None, mem_mb=32768, gpus=2, partition="gpu", walltime=timedelta(days=1))


def test_user_options_of_stock_batchspawner_both_namings() -> None:
    # batchspawner 1.3 copies user_options into the script's variables ({nprocs}, {memory}, ...)
    assert read_user_options({"nprocs": "4", "memory": "16000", "runtime": "8:00:00", "partition": "long",
                              "gres": "gpu:1"}) == Requested(4, 16000, 1, None, "long", timedelta(hours=8))
    # ... and forms that name the traits themselves
    assert read_user_options({"req_nprocs": "2", "req_memory": "4G", "req_runtime": "120", "req_queue": "main",
                              "req_ngpus": "1"}) == Requested(2, 4096, 1, None, "main", timedelta(hours=2))


def test_user_options_of_slurmformspawner() -> None:
    # its form data: runtime in hours (a float), memory in MB, gpus a gres choice
    r = read_user_options({"runtime": 1.5, "nprocs": 4, "memory": 8000, "gpus": "gpu:v100:1", "ui": "lab",
                           "partition": "", "account": "def-alice", "oversubscribe": False, "reservation": ""})
    assert r == Requested(cpus=4, mem_mb=8000, gpus=1, gpu_type="v100", partition=None,
                          walltime=timedelta(hours=1, minutes=30))
    assert read_user_options({"gpus": "gpu:0"}).gpus == 0
    assert read_user_options({"gpus": "2.0"}).gpus == 2 and read_user_options({"gpus": "lots"}).gpus is None


def test_user_options_as_form_lists_and_the_reapers_own_records() -> None:
    assert read_user_options({"partition": ["long"], "gpus": ["2"]}) == Requested(gpus=2, partition="long")
    assert read_user_options({"cpus": "4", "gpus": "gpu:2", "mem": "16G"}) == Requested(4, 16384, 2)


KNOWN_KEYS = ["cpus", "nprocs", "req_nprocs", "ncpus", "cores", "mem", "memory", "req_memory", "gpus", "ngpus",
              "req_ngpus", "gres", "req_gres", "partition", "req_partition", "queue", "req_queue", "runtime",
              "req_runtime", "walltime"]
any_value = (st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400) | st.floats() | st.text()
             | st.from_regex(r"\d{1,30}(-\d{1,12})?(:\d{1,12}){0,2}|\d{1,400}[KMGTP]?|gpu:\w*:?\d{0,30}", fullmatch=True)
             | st.lists(st.text(), max_size=2))


@given(st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=12), any_value))
def test_user_options_reader_never_raises(opts: dict[str, object]) -> None:
    r = read_user_options(opts)
    assert (requested_gpus(opts), requested_partition(opts)) == (r.gpus, r.partition)
    assert r.gpus is None or r.gpus >= 0
    assert r.walltime is None or r.walltime > timedelta(0)
    assert read_user_options(None) == Requested() == read_user_options("junk")  # type: ignore[arg-type]
