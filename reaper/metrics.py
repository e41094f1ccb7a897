"""Prometheus metrics of the reaper, served at ``/services/reaper/metrics``.

Every metric lives in one :class:`Metrics` object with its own registry (so tests and a second
service in one process do not share counters). The service uses the module-level ``METRICS``
through the helper functions:

* ``record_sweep(result)``: after each sweep (sweeps, duration, servers by state, stops, notices queued);
* ``count_notice(channel, kind, result)``: from the outbox, for each delivery sent or failed;
* ``count_stop(outcome)``: a stop requested from the web page (sweeps count theirs in record_sweep);
* ``count_scancel()`` / ``count_orphan()``: from the batch-system guard;
* ``set_outbox_depth(n)`` / ``set_last_successful_sweep(when)``: gauges (the page also refreshes
  both from the store at each scrape, so they survive a restart).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .core.model import State

__all__ = [
    "CONTENT_TYPE_LATEST",
    "METRICS",
    "Metrics",
    "count_notice",
    "count_orphan",
    "count_scancel",
    "count_stop",
    "record_sweep",
    "set_last_successful_sweep",
    "set_outbox_depth",
]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sweeps = Counter("reaper_sweeps", "Sweeps run, by outcome (ok, failed, dry_run)", ["outcome"],
                              registry=r)
        self.sweep_duration = Histogram(
            "reaper_sweep_duration_seconds", "How long a sweep took",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")), registry=r,
        )
        self.servers = Gauge("reaper_servers", "Running servers seen by the last sweep, by state", ["state"],
                             registry=r)
        self.notices = Counter(
            "reaper_notices",
            "Notices by channel, kind and result (queued by a sweep; sent or failed by the outbox)",
            ["channel", "kind", "result"], registry=r,
        )
        self.stops = Counter("reaper_stops", "Server stops by outcome (stopped, pending, failed, held)",
                             ["outcome"], registry=r)
        self.probes = Counter(
            "reaper_probes",
            "Looks at single-user servers: full (status and kernels) or status_only (a server detached at "
            "its last look, nothing changed since)", ["kind"], registry=r,
        )
        self.scancels = Counter("reaper_scancels", "Batch jobs cancelled by the reaper (scancel)", registry=r)
        self.orphans = Counter("reaper_orphans", "Orphaned batch jobs found (no hub server owns them)",
                               registry=r)
        self.outbox_depth = Gauge("reaper_outbox_depth", "Notice deliveries waiting in the outbox", registry=r)
        self.last_success = Gauge("reaper_last_successful_sweep_timestamp_seconds",
                                  "Unix time of the end of the last successful sweep", registry=r)
        for state in State:
            self.servers.labels(state=state.value).set(0)
        for outcome in ("ok", "failed"):
            self.sweeps.labels(outcome=outcome)
        for outcome in ("stopped", "pending", "failed"):
            self.stops.labels(outcome=outcome)
        for kind in ("full", "status_only"):
            self.probes.labels(kind=kind)

    # ------------------------------------------------------------------ updates

    def record_sweep(self, result: Any) -> None:
        """Count one finished sweep (a reaper.sweep.SweepResult)."""
        if result.dry_run:
            self.sweeps.labels(outcome="dry_run").inc()
            return  # a dry run changed nothing: states and stops stay those of the last real sweep
        self.sweeps.labels(outcome="ok" if result.ok else "failed").inc()
        if result.finished_at is not None:
            self.sweep_duration.observe(max((result.finished_at - result.started_at).total_seconds(), 0.0))
        if not result.ok:
            return  # a failed sweep saw only part of the hub: keep the last good picture
        counts = result.counts()
        for state in State:
            self.servers.labels(state=state.value).set(counts.get(state.value, 0))
        for name, n in (("stopped", result.stops), ("pending", result.stops_pending),
                        ("failed", result.stops_failed)):
            if n:
                self.stops.labels(outcome=name).inc(n)
        if result.probes:
            self.probes.labels(kind="full").inc(result.probes - result.probes_status_only)
            self.probes.labels(kind="status_only").inc(result.probes_status_only)
        if result.held:  # (only a sweep that tripped the safety limits holds stops)
            self.stops.labels(outcome="held").inc(result.held)
        for (channel, kind), n in result.queued.items():
            self.notices.labels(channel=channel, kind=kind, result="queued").inc(n)
        if result.finished_at is not None:
            self.last_success.set(result.finished_at.timestamp())

    def count_notice(self, channel: str, kind: str, result: str) -> None:
        self.notices.labels(channel=channel, kind=str(kind), result=result).inc()

    def count_stop(self, outcome: str) -> None:
        word = {"stopped": "stopped", "gone": "stopped", "pending": "pending"}.get(outcome, "failed")
        self.stops.labels(outcome=word).inc()

    def count_scancel(self, n: int = 1) -> None:
        self.scancels.inc(n)

    def count_orphan(self, n: int = 1) -> None:
        self.orphans.inc(n)

    def set_outbox_depth(self, n: int) -> None:
        self.outbox_depth.set(n)

    def set_last_successful_sweep(self, when: datetime | None) -> None:
        if when is not None:
            current = self.last_success._value.get()  # never move backwards
            self.last_success.set(max(current, when.timestamp()))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()


def record_sweep(result: Any, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).record_sweep(result)


def count_notice(channel: str, kind: str, result: str, metrics: Metrics | None = None) -> None:
    """result: "sent" or "failed" (permanent), or "retry" for a temporary failure."""
    (metrics or METRICS).count_notice(channel, kind, result)


def count_stop(outcome: str, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).count_stop(outcome)


def count_scancel(n: int = 1, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).count_scancel(n)


def count_orphan(n: int = 1, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).count_orphan(n)


def set_outbox_depth(n: int, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).set_outbox_depth(n)


def set_last_successful_sweep(when: datetime | None, metrics: Metrics | None = None) -> None:
    (metrics or METRICS).set_last_successful_sweep(when)
