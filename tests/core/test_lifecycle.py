"""Running inside an app: start/stop, drain, backpressure bounds, acks."""

import asyncio
from typing import Any

import pytest

import streamflow as sf
from streamflow.testing import MemorySink, MemorySource

pytestmark = pytest.mark.asyncio


async def test_stop_with_drain_loses_nothing_taken_from_the_source() -> None:
    source = MemorySource(range(100), forever=True)
    sink = MemorySink(delay=0.001)

    async def inc(x: int) -> int:
        return x + 1

    flow = sf.Flow("f")
    flow.source("s", source).map("inc", inc, capacity=8).map("dup", lambda x: x, capacity=8).sink(
        "o", sink, capacity=8
    )
    async with flow.start() as running:
        while len(sink.items) < 50:
            await asyncio.sleep(0.001)
        await running.stop(drain=True)
    assert source.taken > 50
    assert len(sink.items) == source.taken  # everything pulled reached the sink
    assert source.unacked == []
    assert set(source.acked.values()) == {sf.Outcome.DELIVERED}
    assert flow.metrics()["o"].items_out == source.taken


async def test_leaving_the_block_drains() -> None:
    source = MemorySource(range(10), forever=True)
    sink = MemorySink()
    flow = sf.Flow("f")
    flow.source("s", source).map("m", lambda x: x).sink("o", sink)
    async with flow.start():
        await asyncio.sleep(0.01)
    assert len(sink.items) == source.taken > 0


async def test_stop_without_drain_acks_in_flight_items_aborted() -> None:
    source = MemorySource(range(10), forever=True)
    flow = sf.Flow("f")
    flow.source("s", source).sink("o", MemorySink(delay=0.01), capacity=4)
    async with flow.start() as running:
        await asyncio.sleep(0.05)
        await running.stop(drain=False)
    delivered = [o for o, outcome in source.acked.items() if outcome == sf.Outcome.DELIVERED]
    assert len(delivered) <= flow.metrics()["o"].items_out
    assert len(source.acked) == source.taken  # every item taken is acked: nothing hangs
    assert sorted(source.unacked) == [o for o in range(source.taken) if o not in delivered]
    assert len(source.unacked) >= 1  # those would be delivered again by a broker


@pytest.mark.parametrize("capacity", [1, 4, 16])
async def test_backpressure_bounds_items_in_flight(capacity: int) -> None:
    """Slow sink, fast source: taken-but-not-sunk never exceeds what the graph can hold."""
    source = MemorySource(range(10_000))
    peak = 0

    async def slow_sink(x: Any) -> None:
        nonlocal peak
        peak = max(peak, source.taken - len(sunk))
        await asyncio.sleep(0)
        sunk.append(x)

    sunk: list[int] = []
    flow = sf.Flow("f")
    (
        flow.source("s", source)
        .map("a", lambda x: x, capacity=capacity)
        .batch("b", 4, 0.01, capacity=capacity)
        .unbatch("u", capacity=capacity)
        .sink("o", slow_sink, capacity=capacity)
    )
    async with flow.start() as running:
        while len(sunk) < 2000:
            await asyncio.sleep(0.001)
            m = running.metrics()
            assert all(s.queue_depth <= s.capacity for s in m.values())
        await running.stop()
    # Channels: a, b and o hold `capacity` items each, u holds `capacity` batches of 4.
    # In hand: a and o one item each, b a batch being filled, u one batch being split,
    # and the source one item it is trying to send.
    bound = 3 * capacity + 4 * capacity + 1 + 1 + 4 + 4 + 1
    assert 0 < peak <= bound
    assert len(sunk) == source.taken


async def test_drop_oldest_acks_the_dropped_items() -> None:
    source = MemorySource(range(200))
    sink = MemorySink(delay=0.001)
    flow = sf.Flow("f")
    flow.source("s", source).sink("o", sink, capacity=2, overflow="drop_oldest")
    await flow.run()
    dropped = [o for o, outcome in source.acked.items() if outcome == sf.Outcome.DROPPED]
    assert len(dropped) > 0
    assert len(dropped) + len(sink.items) == 200
    assert flow.metrics()["o"].dropped == len(dropped)
    assert sink.items[-1] == 199  # the newest survive


async def test_acks_follow_every_derived_item() -> None:
    source = MemorySource([0, 1, 2, 3])
    seen_acked_at_sink: list[bool] = []

    async def record(x: Any) -> None:
        seen_acked_at_sink.append(len(source.acked) == 4)

    flow = sf.Flow("f")
    src = flow.source("s", source)
    # 0 -> no children (filtered); others fan out into x children, each sunk
    fan = src.flat_map("fan", lambda x: range(x))
    fan.sink("o", record)
    src.filter("odd", lambda x: x % 2).sink("p", sf.collect())
    await flow.run()
    assert source.ack_calls == 4  # once per source item, after every branch finished
    assert source.acked[0] == sf.Outcome.FILTERED
    assert source.acked[1] == sf.Outcome.DELIVERED
    assert source.acked[2] == sf.Outcome.DELIVERED | sf.Outcome.FILTERED
    assert not any(seen_acked_at_sink[:-1])
    assert flow.metrics()["s"].outcomes == {"filtered": 1, "delivered": 2, "delivered|filtered": 1}


async def test_batch_acks_each_member_after_the_batch_is_sunk() -> None:
    source = MemorySource(range(10))
    flow = sf.Flow("f")
    flow.source("s", source).batch("b", 4, 1.0).sink("o", sf.collect())
    await flow.run()
    assert sorted(source.acked) == list(range(10))
    assert set(source.acked.values()) == {sf.Outcome.DELIVERED}


async def test_flow_embedded_next_to_other_work() -> None:
    """A flow shares the loop with the application; both make progress."""
    source = MemorySource(range(10), forever=True)
    flow = sf.Flow("f")
    flow.source("s", source).sink("o", MemorySink(delay=0.0005))
    app_ticks = 0
    async with flow.start() as running:
        for _ in range(20):
            await asyncio.sleep(0.001)
            app_ticks += 1
        assert running.metrics()["o"].items_out > 0
    assert app_ticks == 20


async def test_a_channel_is_a_source_read_without_waiting_when_it_holds_items() -> None:
    inbox: sf.Channel[int] = sf.Channel(64)
    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("inbox", inbox).map("m", lambda x: x * 2).sink("o", sf.collect(out))
    async with flow.start() as running:
        for i in range(200):
            await inbox.send(i)
        while len(out) < 200:
            await asyncio.sleep(0.001)
        await running.stop()  # the source waits on an empty, open channel: stop cancels that
    assert out == [2 * i for i in range(200)]

    ended: sf.Channel[int] = sf.Channel(4)
    for i in range(3):
        ended.send_nowait(i)
    ended.close()
    out.clear()
    flow = sf.Flow("g")
    flow.source("ended", ended).sink("o", sf.collect(out))
    await flow.run()  # receive_nowait raises ChannelClosed at the end: the flow completes
    assert out == [0, 1, 2]
