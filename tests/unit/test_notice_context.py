"""A notice's context is built once (NoticeContext, from the decision's observation), stored once as
JSON with the keys the reaper always stored, and read back by the renderer: rows written before
NoticeContext existed, including sparse ones (an orphan job's), still read and render the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from reaper.config import parse_settings
from reaper.core.model import Action, Decision, HubServer, NoticeKind, Observation, RunKey, State
from reaper.notify.channels import render_delivery
from reaper.store import NoticeContext, Store, notice_context
from reaper.store.models import NOTICES

NOW = datetime(2026, 11, 25, 18, 18, tzinfo=UTC)
SETTINGS = parse_settings('hub: {public_url: "https://hub.example.org", timezone: America/Toronto, name: Mila}',
                          env={})


def observed() -> tuple[Observation, Decision]:
    server = HubServer(
        user="alice", name="gpu1", started=NOW - timedelta(hours=5), last_activity=NOW - timedelta(hours=3),
        url="/user/alice/gpu1/", user_options={"partition": "long", "req_ngpus": "1", "cpus": "4", "mem": "16G"},
        state={"job_id": "77", "job_status": "RUNNING cn-b002", "secret_token": "never stored"},
    )
    obs = Observation(server=server, state=State.DETACHED, at=NOW, last_activity=NOW - timedelta(hours=3),
                      detached_since=NOW - timedelta(hours=3, minutes=13), detail="no browser connected",
                      job_end=NOW + timedelta(hours=20))
    dec = Decision(Action.FINAL, "window closed 3h13m ago; stop at 14:00", rule="gpu", notice=NoticeKind.FINAL,
                   spell=obs.idle_since, stop_at=NOW + timedelta(minutes=42), next_at=NOW + timedelta(minutes=30),
                   channels=("email",))
    return obs, dec


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


# What the reaper stored with a decision's notice before NoticeContext (store.repo.notice_context).
OLD_ROW = {
    "user": "alice",
    "server": "gpu1",
    "started": iso(NOW - timedelta(hours=5)),
    "url": "/user/alice/gpu1/",
    "job_id": "77",
    "spawner_state": {"job_id": "77", "job_status": "RUNNING cn-b002"},
    "user_options": {"partition": "long", "req_ngpus": "1", "cpus": "4", "mem": "16G"},
    "state": "detached",
    "detail": "no browser connected",
    "last_activity": iso(NOW - timedelta(hours=3)),
    "detached_since": iso(NOW - timedelta(hours=3, minutes=13)),
    "idle_since": iso(NOW - timedelta(hours=3, minutes=13)),
    "job_end": iso(NOW + timedelta(hours=20)),
    "action": "final-warning",
    "reason": "window closed 3h13m ago; stop at 14:00",
    "rule": "gpu",
    "spell": iso(NOW - timedelta(hours=3, minutes=13)),
    "stop_at": iso(NOW + timedelta(minutes=42)),
    "next_at": iso(NOW + timedelta(minutes=30)),
    "created_at": iso(NOW),
}
# What the batch guard stored with an orphan job's notice.
OLD_ORPHAN = {"user": "bob", "server": "", "started": "2026-11-25T10:00:00+00:00", "job_id": "4242",
              "state": "detached", "reason": "batch job 4242 was still running but no server of yours owned it",
              "user_options": {"partition": "main", "gpus": 2, "cpus": 8}}


def test_the_stored_form_is_the_dict_the_reaper_always_stored() -> None:
    obs, dec = observed()
    ctx = notice_context(obs, dec, NOW)
    assert ctx.to_json() == OLD_ROW  # same keys, same values: the spawner's secrets stay out
    assert NoticeContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx


def test_a_stopped_notice_adds_when_and_what_was_reclaimed_only() -> None:
    obs, dec = observed()
    ctx = notice_context(obs, dec, NOW)
    stopped = NoticeContext.from_json({**OLD_ROW, "stopped_at": iso(NOW), "reclaimed": "4 CPUs for 20h"})
    assert stopped.to_json() == {**ctx.to_json(), "stopped_at": iso(NOW), "reclaimed": "4 CPUs for 20h"}
    assert "stopped_at" not in ctx.to_json() and "reclaimed" not in ctx.to_json()


def test_a_sparse_or_odd_old_context_reads_with_defaults() -> None:
    ctx = NoticeContext.from_json(OLD_ORPHAN)
    assert (ctx.user, ctx.server, ctx.job_id, ctx.state, ctx.action) == ("bob", "", "4242", "detached", "ok")
    assert ctx.started == datetime(2026, 11, 25, 10, tzinfo=UTC) and ctx.stop_at is None and ctx.url == ""
    odd = NoticeContext.from_json({"state": "sleeping", "action": "nap", "started": "2026-11-25T10:00:00Z",
                                   "spawner_state": {"job_id": 9}, "unknown": 1})
    assert (odd.state, odd.action, odd.job_id) == ("detached", "ok", "9")  # as the old reader rendered them
    assert odd.started == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert NoticeContext.from_json(None) == NoticeContext.from_json({}) == NoticeContext()


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    yield s
    s.close()


def _queue_old_row(store: Store, run: RunKey, kind: NoticeKind, old: dict) -> int:
    """A notice as an older reaper left it in the database: its context column holds ``old``."""
    nid = store.outbox.add_notice(run, kind, None, NOW, channels=["email"], context=NoticeContext())
    assert nid is not None
    with store.db.write() as s:
        s.execute(update(NOTICES).where(NOTICES.c.id == nid).values(context=old))
    return nid


def test_an_old_row_in_the_database_renders_as_the_same_notice_queued_now(store: Store) -> None:
    obs, dec = observed()
    key = obs.server.run_key()
    assert key is not None
    new_id = store.runs.record(obs, dec, NOW)
    old_id = _queue_old_row(store, RunKey("alice", "gpu1", NOW - timedelta(hours=4)), NoticeKind.FINAL, OLD_ROW)
    due = {d.notice_id: d for d in store.outbox.due_deliveries(NOW, 10)}
    new, old = due[new_id], due[old_id]
    assert old.context == new.context == notice_context(obs, dec, NOW)
    a, b = render_delivery(new, SETTINGS, NOW), render_delivery(old, SETTINGS, NOW)
    assert a == b
    assert "https://hub.example.org/user/alice/gpu1/" in a.text and "Slurm job 77 on node cn-b002" in a.text


def test_an_old_orphan_row_renders(store: Store) -> None:
    nid = _queue_old_row(store, RunKey("bob", "job-4242", NOW - timedelta(hours=8)), NoticeKind.ORPHAN, OLD_ORPHAN)
    (d,) = [d for d in store.outbox.due_deliveries(NOW, 10) if d.notice_id == nid]
    text = render_delivery(d, SETTINGS, NOW).text
    assert "4242" in text and "bob" in text


def test_odd_values_are_stored_as_json_as_before() -> None:
    ctx = NoticeContext(user_options={"hours": (1, 2), 3: {"at": NOW}, "obj": State.DETACHED, "s": frozenset()})
    assert json.loads(json.dumps(ctx.to_json()))["user_options"] == {"hours": [1, 2], "3": {"at": NOW.isoformat()},
                                                                     "obj": "detached", "s": []}
