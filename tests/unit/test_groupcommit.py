"""Group commit: every waiter returns only once its record is written, bursts share transactions,
and a failed write reaches every waiter of its batch (and no other)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reaper.groupcommit import GroupWriter


async def test_a_burst_is_written_in_few_batches_and_each_waiter_sees_its_own_record() -> None:
    written: list[list[int]] = []

    def write(items: list[int]) -> None:
        time.sleep(0.01)  # a transaction takes time: the next batch gathers meanwhile
        written.append(list(items))

    g: GroupWriter[int] = GroupWriter(write)

    async def one(i: int) -> int:
        await g.add(i)
        assert any(i in batch for batch in written)  # durable before add() returned
        return i

    assert sorted(await asyncio.gather(*(one(i) for i in range(500)))) == list(range(500))
    assert sorted(i for b in written for i in b) == list(range(500))  # each exactly once
    assert g.batches == len(written) <= 5


async def test_a_trickle_is_written_one_by_one() -> None:
    written: list[list[int]] = []
    g: GroupWriter[int] = GroupWriter(lambda items: written.append(list(items)))
    for i in range(3):
        await g.add(i)
    assert written == [[0], [1], [2]]


async def test_a_failed_write_raises_in_every_waiter_of_that_batch_only() -> None:
    gate = threading.Event()
    calls: list[list[str]] = []

    def write(items: list[str]) -> None:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)
            return
        if "bad" in items:
            raise RuntimeError("database is down")

    g: GroupWriter[str] = GroupWriter(write)
    first = asyncio.create_task(g.add("first"))
    await asyncio.sleep(0.05)  # the first batch is being written; these two gather behind it
    second = asyncio.gather(g.add("bad"), g.add("also in the bad batch"), return_exceptions=True)
    await asyncio.sleep(0.05)
    gate.set()
    await first
    results = await second
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    await g.add("after")  # the writer recovers for the next batch
    assert calls[-1] == ["after"]


async def test_max_batch_bounds_a_transaction() -> None:
    sizes: list[int] = []
    g: GroupWriter[int] = GroupWriter(lambda items: sizes.append(len(items)), max_batch=10)
    await asyncio.gather(*(g.add(i) for i in range(35)))
    assert sum(sizes) == 35 and max(sizes) <= 10


async def test_linger_gathers_a_steady_trickle_into_one_batch() -> None:
    written: list[list[int]] = []
    g: GroupWriter[int] = GroupWriter(lambda items: written.append(list(items)), linger=0.05)

    async def later(i: int) -> None:
        await asyncio.sleep(0.005 * i)  # one every 5 ms: without linger, one transaction each
        await g.add(i)

    await asyncio.gather(*(later(i) for i in range(6)))
    assert sorted(i for b in written for i in b) == list(range(6))
    assert len(written) <= 2


@pytest.mark.parametrize("n", [1, 600])
def test_mark_delivered_many_marks_each_delivery_and_its_notice(tmp_path, n: int) -> None:
    from datetime import UTC, datetime, timedelta

    from reaper.core.model import NoticeKind, RunKey
    from reaper.store import NoticeContext, Store

    store = Store.open(f"sqlite:///{tmp_path}/s.sqlite")
    t0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    for i in range(n):
        store.outbox.add_notice(RunKey(f"u{i}", "", t0), NoticeKind.STOPPED, None, t0, channels=["log", "email"],
                         context=NoticeContext(user=f"u{i}"))
    due = store.outbox.due_deliveries(t0, 10 * n)
    assert len(due) == 2 * n
    logs = [(d.id, t0 + timedelta(minutes=1)) for d in due if d.channel == "log"]
    emails = [(d.id, t0 + timedelta(minutes=2)) for d in due if d.channel == "email"]
    store.outbox.mark_delivered_many(emails + logs)  # the later channel first in the list: the first time wins
    assert store.outbox.due_deliveries(t0 + timedelta(hours=1), 10 * n) == []
    notices = store.reports.recent_notices(t0 - timedelta(days=1), 10 * n)
    assert len(notices) == n
    first = t0 + timedelta(minutes=1)
    assert all(n_.status == "delivered" and n_.delivered_at == first for n_ in notices)
    store.close()


async def test_bounded_map_keeps_order_bounds_concurrency_and_raises_the_first_error() -> None:
    from reaper.sweep import bounded_map

    running, most = 0, 0

    async def f(i: int, d: float) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(d)
        running -= 1
        return i * 10

    items = [(i, 0.001 * ((7 * i) % 5)) for i in range(50)]
    assert await bounded_map(f, items, 4) == [i * 10 for i in range(50)]
    assert most == 4
    assert await bounded_map(f, [], 4) == []

    async def bad(i: int) -> int:
        if i == 3:
            raise ValueError("boom")
        return i

    with pytest.raises(ValueError, match="boom"):
        await bounded_map(bad, [(i,) for i in range(10)], 2)


def test_the_service_freezes_its_start_up_objects_out_of_garbage_collection() -> None:
    # (in a child interpreter: the freeze would otherwise last for the rest of the test session)
    import subprocess
    import sys

    code = ("import gc; from reaper.service import tune_gc; before = gc.get_threshold(); tune_gc(); "
            "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count(); "
            "assert gc.get_threshold() == (10_000, 10, 10) != before; "
            "a = []; a.append(a); del a; assert gc.collect() >= 1")  # cycles are still collected
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
