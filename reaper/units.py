"""One home for the units the reaper reads and writes: times, durations, memory, walltimes, GPUs,
and the spawner's ``user_options``.

Pure: no I/O, no clock reads (``now`` is an argument), no locale (day and month names are English
whatever the process's locale), no imports from the rest of the reaper.

=========================  ======================================================================
times                      :func:`parse_iso` (strict, raises), :func:`utc_or_none` (lenient, None)
shown in the hub's zone    :func:`local_time` ("14:05", "Wed 26 Nov 14:05": the page, reasons),
                           :func:`local_datetime` ("14:00 EST, Tue 25 Nov": notices)
relative to ``now``        :func:`relative` ("in 42 min", "3h10m ago", "now")
durations                  :func:`parse_duration` / :func:`format_duration` (config: "1h30m"),
                           :func:`humanize` (people: "3h10m", "2d3h", "45s")
memory                     :func:`parse_memory_mb` (Slurm "4G", "512M", bare = MB),
                           :func:`format_memory` ("16 GB")
walltime                   :func:`parse_walltime` (Slurm "1-02:00:00", "HH:MM:SS", minutes; "8h"),
                           :func:`format_walltime` (Slurm "D-HH:MM:SS")
GPUs                       :func:`parse_gres` ("gpu:a100:2", "gres/gpu=2" -> count, type)
user_options               :func:`read_user_options` -> :class:`Requested` (and its
                           :func:`requested_gpus`, :func:`requested_partition` alone)
=========================  ======================================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

__all__ = [
    "Requested",
    "format_duration",
    "format_memory",
    "format_walltime",
    "humanize",
    "local_datetime",
    "local_time",
    "parse_duration",
    "parse_gres",
    "parse_iso",
    "parse_memory_mb",
    "parse_walltime",
    "read_user_options",
    "relative",
    "requested_gpus",
    "requested_partition",
    "utc_or_none",
]

# --------------------------------------------------------------------------- ISO 8601 times

# What real sources write: JupyterHub ("2026-11-25T20:11:18.450611Z"), Python's isoformat()
# ("...+00:00", naive without an offset), SQLite's text timestamps ("2026-11-25 20:11:18.450611"),
# JavaScript's toISOString() ("...18.450Z"). Week dates, ordinal dates, basic format and
# date-only values are no timestamp any of them writes: refused.
_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}(?::?\d{2}(?::?\d{2})?)?)?",
    re.ASCII,
)


def parse_iso(value: str) -> datetime:
    """An ISO 8601 timestamp -> aware UTC datetime. ``Z`` and offsets are honoured, a value without
    an offset is UTC. Raises ValueError on anything else (never read malformed data as "no time")."""
    if not isinstance(value, str) or not _ISO.fullmatch(value.strip()):
        raise ValueError(f"not an ISO 8601 timestamp: {value!r}")
    dt = datetime.fromisoformat(value.strip())  # beyond microseconds: truncated
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def utc_or_none(value: Any) -> datetime | None:
    """A datetime or an ISO 8601 string -> aware UTC datetime; None, "" or anything unreadable ->
    None. For display and records; where bad data must be an error, use :func:`parse_iso`."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str) and value:
        try:
            return parse_iso(value)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------- local and relative time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _date_words(local: datetime) -> str:
    return f"{_DAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]}"


def local_time(when: datetime | None, tz: tzinfo, now: datetime) -> str:
    """``14:05`` on the day of ``now``, ``Wed 26 Nov 14:05`` on another day, in ``tz``; None -> "".
    Naive datetimes are UTC."""
    if when is None:
        return ""
    local = _aware(when).astimezone(tz)
    if local.date() == _aware(now).astimezone(tz).date():
        return f"{local:%H:%M}"
    return f"{_date_words(local)} {local:%H:%M}"


def local_datetime(when: datetime | None, tz: tzinfo, *, with_date: bool = True) -> str:
    """``14:00 EST, Tue 25 Nov`` (or ``14:00 EST`` without the date) in ``tz``: for a notice, read
    later than it is written, so it always names its zone. None -> ``(unknown)``."""
    if when is None:
        return "(unknown)"
    local = _aware(when).astimezone(tz)
    hm = f"{local:%H:%M} {local.tzname()}"
    return f"{hm}, {_date_words(local)}" if with_date else hm


def relative(when: datetime | None, now: datetime) -> str:
    """``now`` within a minute; ``in 42 min`` / ``42 min ago`` under an hour (whole minutes, rounded
    down); then :func:`humanize`: ``in 3h10m``, ``2d3h ago``. None -> ""."""
    if when is None:
        return ""
    secs = (_aware(when) - _aware(now)).total_seconds()
    amount = timedelta(seconds=abs(secs))
    if amount < timedelta(minutes=1):
        return "now"
    words = f"{int(amount.total_seconds() // 60)} min" if amount < timedelta(hours=1) else humanize(amount)
    return f"in {words}" if secs > 0 else f"{words} ago"


# --------------------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*([smhdw]))+\s*$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _seconds(secs: float, value: Any) -> timedelta:
    try:
        return timedelta(seconds=secs)
    except (OverflowError, ValueError):  # inf, nan, beyond timedelta's 999999999 days
        raise ValueError(f"not a usable duration: {value!r}") from None


def parse_duration(value: Any) -> timedelta:
    """"90m", "2h", "1h30m", "7d", "45s", or a number of seconds -> timedelta (never negative).
    Raises ValueError with a message for config.yaml."""
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, bool):
        raise ValueError(f"expected a duration such as '90m', '2h' or '7d', got {value!r}")
    elif isinstance(value, int | float):
        td = _seconds(value, value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            raise ValueError(f"a duration cannot be negative: {value!r}")
        if not _DURATION_RE.match(text):
            raise ValueError(
                f"expected a duration such as '90m', '2h', '1h30m' or '7d' (units s, m, h, d, w), got {value!r}"
            )
        td = _seconds(sum(float(n) * _UNIT[u] for n, u in _PART_RE.findall(text)), value)
    else:
        raise ValueError(f"expected a duration such as '90m', '2h' or '7d', got {value!r}")
    if td < timedelta(0):
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return td


def format_duration(td: timedelta) -> str:
    """Exact, in whole seconds, as config.yaml writes it: ``1d3h10m5s``, ``0s``; the inverse of
    :func:`parse_duration` for non-negative whole seconds."""
    secs = int(td.total_seconds())
    if secs == 0:
        return "0s"
    sign, secs = ("-", -secs) if secs < 0 else ("", secs)
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, secs = divmod(secs, size)
        if n:
            out.append(f"{n}{unit}")
    return sign + "".join(out)


def humanize(delta: timedelta) -> str:
    """For people, two units at most: ``3h10m``, ``3h05m``, ``45m``, ``20s``, ``2d3h``."""
    secs = int(delta.total_seconds())
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{sign}{d}d{h}h" if h else f"{sign}{d}d"
    if h:
        return f"{sign}{h}h{m:02d}m" if m else f"{sign}{h}h"
    if m:
        return f"{sign}{m}m"
    return f"{sign}{s}s"


# --------------------------------------------------------------------------- memory

_MEM_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:i?b)?)?\s*", re.I | re.ASCII)
_MEM_MB = {"k": 1 / 1024, "": 1.0, "m": 1.0, "g": 1024.0, "t": 1024.0**2, "p": 1024.0**3}


def parse_memory_mb(value: Any) -> float | None:
    """A memory size -> megabytes (MiB, as Slurm counts): ``4G``, ``512M``, ``512K``, ``1.5T``,
    ``16 GB``, ``16GiB``; a bare number (or a number type) is megabytes, Slurm's default unit.
    None, "", 0, a negative or unreadable value -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        mb = float(value) if abs(value) < 1e300 else math.inf  # float() of a huge int raises
    else:
        m = _MEM_RE.fullmatch(str(value))
        if not m:
            return None
        mb = float(m.group(1)) * _MEM_MB[(m.group(2) or "").lower()]
    return mb if math.isfinite(mb) and mb > 0 else None


def format_memory(mb: float | None) -> str:
    """Megabytes for people: ``512 MB``, ``16 GB``, ``15.6 GB`` (GB = 1024 MB, as Slurm's G);
    None -> ""."""
    if mb is None:
        return ""
    if mb < 1024:
        return f"{round(mb):d} MB"
    return f"{round(mb / 1024, 1):g} GB"


# --------------------------------------------------------------------------- walltime

# Slurm's --time: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S".
_WALLTIME = re.compile(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", re.ASCII)
_UNLIMITED = {"UNLIMITED", "INFINITE", "NONE", "N/A"}


def parse_walltime(value: Any) -> timedelta | None:
    """Slurm time formats (``90`` = minutes, ``30:00`` = min:sec, ``2:00:00``, ``1-12``,
    ``1-12:30``, ``1-12:30:00``) and the reaper's own durations (``8h``) -> timedelta. A number
    type is minutes, as in Slurm. None, "", 0, ``UNLIMITED`` or unreadable -> None (no known end)."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        td = _walltime(value)
    except (OverflowError, ValueError):  # beyond timedelta's range, inf, nan, unreadable
        return None
    return td if td is not None and td > timedelta(0) else None  # Slurm: a time of 0 is no limit


def _walltime(value: Any) -> timedelta | None:
    if isinstance(value, int | float):
        return timedelta(minutes=value)
    text = str(value)
    if text.strip().upper() in _UNLIMITED:
        return None
    m = _WALLTIME.fullmatch(text)
    if m is None:
        return parse_duration(text)
    d, a, b, c = m.groups()
    if d is not None:  # D-H[:M[:S]]
        return timedelta(days=int(d), hours=int(a), minutes=int(b or 0), seconds=int(c or 0))
    if c is not None:  # H:M:S
        return timedelta(hours=int(a), minutes=int(b), seconds=int(c))
    return timedelta(minutes=int(a), seconds=int(b or 0))  # M[:S]


def format_walltime(td: timedelta) -> str:
    """Slurm's ``D-HH:MM:SS`` (``HH:MM:SS`` under a day), whole seconds; parse_walltime reads it back."""
    secs = max(int(td.total_seconds()), 0)
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    hms = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{d}-{hms}" if d else hms


# --------------------------------------------------------------------------- GPUs

_GRES_GPU = re.compile(r"(?:gres[:/])?gpu(?::([^:=(]+))?(?:[:=](\d+))?(?:\(.*\))?", re.I)


def parse_gres(value: Any) -> tuple[int, str | None] | None:
    """GPUs in a GRES/TRES string -> (count, type or None): ``gpu:2``, ``gpu:a100:2``,
    ``gres:gpu:2``, ``gres/gpu=2``, ``gres/gpu:a100=2``, ``gpu`` (= 1). Entries of several types
    are summed; an untyped total beside typed entries (TRES lists both) is the count.
    None when the string names no GPU."""
    if not isinstance(value, str):
        return None
    untyped: int | None = None
    typed = 0
    kinds: list[str] = []
    for part in value.split(","):
        m = _GRES_GPU.fullmatch(part.strip())
        if m is None:
            continue
        kind, n = m.group(1), int(m.group(2)) if m.group(2) is not None else 1
        if kind is not None and kind.isdigit() and m.group(2) is None:  # "gpu:2": the count, not a type
            kind, n = None, int(kind)
        if kind is None:
            untyped = (untyped or 0) + n
        else:
            typed += n
            kinds.append(kind)
    if untyped is None and not kinds:
        return None
    kind = kinds[0] if len(set(kinds)) == 1 else None
    return (untyped if untyped is not None else typed), kind


# --------------------------------------------------------------------------- user_options


@dataclass(frozen=True)
class Requested:
    """What a server's job asked for, from the spawner's ``user_options``; None = not known."""

    cpus: int | None = None
    mem_mb: float | None = None
    gpus: int | None = None
    gpu_type: str | None = None
    partition: str | None = None
    walltime: timedelta | None = None


# Keys in the order they are tried. The shapes:
# - our spawner (reaper.hubside.spawner): partition, runtime (Slurm time), memory ("8G"), gpus (int)
# - stock batchspawner 1.3: user_options override the batch script's variables, named as its
#   req_* traits without "req_" (nprocs, memory, runtime, partition, queue, ngpus, gres); sites'
#   forms also send the trait names themselves (req_nprocs, req_memory, ...)
# - slurmformspawner 2.11: nprocs (int), memory (int, MB), gpus ("gpu:0", "gpu:a100:2"), partition,
#   account, reservation, ui, constraint, modules; runtime: the hub's server model shows the
#   spawner's converted options, an int of MINUTES (measured: tests/fixtures/sites/), while its form
#   data says HOURS as a float (1.5): a float "runtime" is read as hours, an int as minutes
# - the reaper's own records (orphan jobs, tests): cpus, mem, gpus
_CPUS = ("cpus", "nprocs", "req_nprocs", "ncpus", "cores")
_MEM = ("mem", "memory", "req_memory")
_GPUS = ("gpus", "ngpus", "req_ngpus", "gres", "req_gres")
_PARTITION = ("partition", "req_partition", "queue", "req_queue")
_WALL = ("runtime", "req_runtime", "walltime")


def _pick(opts: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first key of ``keys`` with a value, and that value."""
    for k in keys:
        v = opts.get(k)
        if isinstance(v, list | tuple) and len(v) == 1:  # form data: {"partition": ["long"]}
            v = v[0]
        if v is not None and v != "" and not isinstance(v, list | tuple | dict):
            return k, v
    return None, None


def _value(opts: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return _pick(opts, keys)[1]


def _count(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(f) if math.isfinite(f) and f >= 0 and f == int(f) else None


def _options(user_options: Any) -> Mapping[str, Any]:
    if isinstance(user_options, dict):  # the usual case, and much cheaper than the ABC check
        return user_options
    return user_options if isinstance(user_options, Mapping) else {}


def _gpus(opts: Mapping[str, Any]) -> tuple[int | None, str | None]:
    raw = _value(opts, _GPUS)
    n = _count(raw)  # 2, "2", "2.0"
    if n is not None:
        return n, None
    return parse_gres(raw) or (None, None)  # "gpu:a100:2"


def requested_gpus(user_options: Mapping[str, Any] | None) -> int | None:
    """:attr:`Requested.gpus` alone, for the policy's rule matching on every server of every sweep."""
    return _gpus(_options(user_options))[0]


def requested_partition(user_options: Mapping[str, Any] | None) -> str | None:
    """:attr:`Requested.partition` alone (see :func:`requested_gpus`)."""
    v = _value(_options(user_options), _PARTITION)
    return str(v) if v is not None else None


def read_user_options(user_options: Mapping[str, Any] | None) -> Requested:
    """The one reader of a spawner's ``user_options`` (every shape above): CPUs, memory, GPUs,
    partition and walltime, each None when absent or unreadable. Never raises."""
    opts = _options(user_options)
    gpus, gpu_type = _gpus(opts)
    wall_key, raw_wall = _pick(opts, _WALL)
    if isinstance(raw_wall, float) and wall_key == "runtime":  # slurmformspawner: hours
        walltime = parse_walltime(raw_wall * 60)
    else:
        walltime = parse_walltime(raw_wall)
    return Requested(
        cpus=_count(_value(opts, _CPUS)) or None,
        mem_mb=parse_memory_mb(_value(opts, _MEM)),
        gpus=gpus,
        gpu_type=gpu_type,
        partition=requested_partition(opts),
        walltime=walltime,
    )
