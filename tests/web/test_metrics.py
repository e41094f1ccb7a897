# ruff: noqa: F811  (pytest fixtures imported from tests.web are parameters here)
"""/metrics: scraped after real sweeps (real Sweeper, real SQLite store, scripted hub) and checked
against what the sweeps did; the helper counters for the outbox and the batch guard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from reaper.core.model import HubServer, Kernel, NoticeKind, Probe
from reaper.metrics import Metrics, record_sweep
from reaper.store import NoticeContext
from reaper.sweep import SweepResult
from tests.fakes import Clock
from tests.web import make_web, utcnow  # noqa: F401  (fixture)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def detached(user: str, since: datetime, started: datetime) -> tuple[HubServer, Probe]:
    s = HubServer(user=user, name="", started=started, last_activity=since, url=f"/user/{user}/",
                  target="http://127.0.0.1:1", state={"job_id": "9"})
    return s, Probe(ok=True, status_last_activity=since, kernels=(Kernel("k", "python3", "idle", 0, since),))


def attached(user: str, now: datetime, started: datetime) -> tuple[HubServer, Probe]:
    s = HubServer(user=user, name="", started=started, last_activity=now, url=f"/user/{user}/",
                  target="http://127.0.0.1:1", state={"job_id": "8"})
    return s, Probe(ok=True, status_last_activity=now, kernels=(Kernel("k", "python3", "idle", 1, now),))


async def test_metrics_after_sweeps_count_what_happened(make_web):
    w = await make_web(servers=[], sweep=False)
    t0 = utcnow()
    clock = Clock(t0)
    w.service.sweeper.clock = clock
    # alice: detached for 10 h (final notice now, stop after min_notice); bob: detached 70 min (warning);
    # carol: attached (nothing).
    for srv, probe in (detached("alice", t0 - timedelta(hours=10), t0 - timedelta(hours=11)),
                       detached("bob", t0 - timedelta(minutes=70), t0 - timedelta(hours=2)),
                       attached("carol", t0, t0 - timedelta(hours=1))):
        w.hub.add(srv, probe)

    r1 = await w.service.sweeper.run_once()
    record_sweep(r1, w.metrics)
    text = (await w.client.get(w.url("metrics"))).text
    assert value(text, "reaper_sweeps_total", outcome="ok") == 1
    assert value(text, "reaper_servers", state="detached") == 2
    assert value(text, "reaper_servers", state="attached") == 1
    assert value(text, "reaper_servers", state="computing") == 0
    assert value(text, "reaper_notices_total", channel="log", kind="final", result="queued") == 1
    assert value(text, "reaper_notices_total", channel="log", kind="warning", result="queued") == 1
    assert value(text, "reaper_stops_total", outcome="stopped") == 0
    assert value(text, "reaper_sweep_duration_seconds_count") == 1
    # a first look is always in full
    assert value(text, "reaper_probes_total", kind="full") == 3
    assert value(text, "reaper_probes_total", kind="status_only") == 0
    assert value(text, "reaper_last_successful_sweep_timestamp_seconds") == r1.finished_at.timestamp()
    # the log channel delivered both notices during the sweep: nothing waits in the outbox
    assert value(text, "reaper_outbox_depth") == 0

    clock.advance(timedelta(minutes=31))
    w.hub.servers.pop(("carol", ""))  # carol stopped her server herself
    r2 = await w.service.sweeper.run_once()
    assert r2.stops == 1 and w.hub.stops == [("alice", "")]
    record_sweep(r2, w.metrics)
    text = (await w.client.get(w.url("metrics"))).text
    assert value(text, "reaper_sweeps_total", outcome="ok") == 2
    assert value(text, "reaper_stops_total", outcome="stopped") == 1
    assert value(text, "reaper_servers", state="attached") == 0
    assert value(text, "reaper_servers", state="detached") == 2  # alice counted as seen before the stop
    assert value(text, "reaper_notices_total", channel="log", kind="final", result="queued") == 1  # no repeat
    assert value(text, "reaper_sweep_duration_seconds_count") == 2
    # alice and bob were detached at their last look and nothing changed: /api/status alone
    assert value(text, "reaper_probes_total", kind="full") == 3
    assert value(text, "reaper_probes_total", kind="status_only") == 2
    assert value(text, "reaper_outbox_depth") == 0

    # a notice queued and not yet delivered shows in the outbox depth at the next scrape
    bob = w.hub.servers[("bob", "")].run_key()
    w.store.outbox.add_notice(bob, NoticeKind.REMINDER, None, clock(), channels=["log"], context=NoticeContext())
    text = (await w.client.get(w.url("metrics"))).text
    assert value(text, "reaper_outbox_depth") == w.store.outbox.depth() == 1


async def test_a_failed_sweep_counts_as_failed_and_keeps_the_last_picture(make_web):
    w = await make_web(servers=[], sweep=False)
    now = utcnow()
    w.hub.add(*attached("carol", now, now - timedelta(hours=1)))
    record_sweep(await w.service.sweeper.run_once(), w.metrics)
    w.hub.fail_listing = True
    failed = await w.service.sweeper.run_once()
    assert not failed.ok
    record_sweep(failed, w.metrics)
    text = (await w.client.get(w.url("metrics"))).text
    assert value(text, "reaper_sweeps_total", outcome="failed") == 1
    assert value(text, "reaper_sweeps_total", outcome="ok") == 1
    assert value(text, "reaper_servers", state="attached") == 1


async def test_stop_now_from_the_page_counts_a_stop(make_web):
    w = await make_web()
    r = await w.post("stop", "alice", {"user": "alice", "server": ""})
    assert r.status_code == 303
    text = (await w.client.get(w.url("metrics"))).text
    assert value(text, "reaper_stops_total", outcome="stopped") == 1


async def test_metrics_and_health_need_no_login_and_name_no_user(make_web):
    w = await make_web()
    r = await w.client.get(w.url("metrics"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "alice" not in r.text and "bob" not in r.text


def test_helper_counters_for_the_outbox_and_the_batch_guard():
    m = Metrics()
    m.count_notice("email", "final", "sent")
    m.count_notice("email", "final", "sent")
    m.count_notice("slack", "warning", "failed")
    m.count_scancel()
    m.count_orphan(2)
    m.set_outbox_depth(5)
    m.set_last_successful_sweep(datetime(2026, 11, 25, tzinfo=UTC))
    m.set_last_successful_sweep(datetime(2026, 11, 24, tzinfo=UTC))  # never moves backwards
    text = m.exposition().decode()
    assert value(text, "reaper_notices_total", channel="email", kind="final", result="sent") == 2
    assert value(text, "reaper_notices_total", channel="slack", kind="warning", result="failed") == 1
    assert value(text, "reaper_scancels_total") == 1
    assert value(text, "reaper_orphans_total") == 2
    assert value(text, "reaper_outbox_depth") == 5
    assert value(text, "reaper_last_successful_sweep_timestamp_seconds") == datetime(2026, 11, 25,
                                                                                     tzinfo=UTC).timestamp()


def test_a_dry_run_changes_no_gauge():
    m = Metrics()
    t = datetime(2026, 11, 25, tzinfo=UTC)
    m.record_sweep(SweepResult(started_at=t, finished_at=t, ok=True, dry_run=True))
    text = m.exposition().decode()
    assert value(text, "reaper_sweeps_total", outcome="dry_run") == 1
    assert value(text, "reaper_sweeps_total", outcome="ok") == 0
    assert value(text, "reaper_last_successful_sweep_timestamp_seconds") == 0
