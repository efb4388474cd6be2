"""sf.Channel on its own: order, backpressure, overflow policies, close and cancellation."""

import asyncio

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


async def test_fifo_and_async_for() -> None:
    ch: sf.Channel[int] = sf.Channel(4)
    for i in range(4):
        await ch.send(i)
    ch.close()
    assert [x async for x in ch] == [0, 1, 2, 3]


async def test_send_waits_while_full() -> None:
    ch: sf.Channel[int] = sf.Channel(2)
    await ch.send(1)
    await ch.send(2)
    blocked = asyncio.create_task(ch.send(3))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert ch.statistics().waiting_senders == 1
    assert await ch.receive() == 1
    await asyncio.wait_for(blocked, 1)
    assert [ch.receive_nowait(), ch.receive_nowait()] == [2, 3]


@pytest.mark.parametrize(
    ("overflow", "kept"),
    [("drop_oldest", [3, 4]), ("drop_newest", [1, 2])],
)
async def test_drop_policies_count_and_report(overflow: sf.Overflow, kept: list[int]) -> None:
    dropped: list[int] = []
    ch: sf.Channel[int] = sf.Channel(2, overflow, on_drop=dropped.append)
    for i in range(1, 5):
        await ch.send(i)
    assert [ch.receive_nowait(), ch.receive_nowait()] == kept
    assert ch.statistics().dropped == 2
    assert sorted(dropped + kept) == [1, 2, 3, 4]


async def test_error_policy_raises_when_full() -> None:
    ch: sf.Channel[int] = sf.Channel(1, "error")
    await ch.send(1)
    with pytest.raises(sf.ChannelFull):
        await ch.send(2)
    assert ch.receive_nowait() == 1


async def test_close_drains_then_ends_and_rejects_sends() -> None:
    ch: sf.Channel[str] = sf.Channel(3)
    await ch.send("a")
    ch.close()
    with pytest.raises(sf.ChannelClosed):
        await ch.send("b")
    assert await ch.receive() == "a"
    with pytest.raises(sf.ChannelClosed):
        await ch.receive()


async def test_close_wakes_waiting_receiver_and_sender() -> None:
    ch: sf.Channel[int] = sf.Channel(1)
    receiver = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    ch.close()
    with pytest.raises(sf.ChannelClosed):
        await receiver

    full: sf.Channel[int] = sf.Channel(1)
    await full.send(0)
    sender = asyncio.create_task(full.send(1))
    await asyncio.sleep(0)
    full.close()
    with pytest.raises(sf.ChannelClosed):
        await sender
    assert full.receive_nowait() == 0


async def test_cancelled_waiters_lose_nothing() -> None:
    ch: sf.Channel[int] = sf.Channel(1)
    getter = asyncio.create_task(ch.receive())
    await asyncio.sleep(0)
    getter.cancel()
    await ch.send(7)  # wakes the cancelled getter's slot
    with pytest.raises(asyncio.CancelledError):
        await getter
    assert await asyncio.wait_for(ch.receive(), 1) == 7

    await ch.send(1)
    putter = asyncio.create_task(ch.send(2))
    await asyncio.sleep(0)
    putter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await putter
    assert ch.receive_nowait() == 1
    with pytest.raises(asyncio.QueueEmpty):
        ch.receive_nowait()


async def test_many_producers_and_consumers_see_every_item_once() -> None:
    ch: sf.Channel[int] = sf.Channel(3)
    got: list[int] = []

    async def produce(base: int) -> None:
        for i in range(100):
            await ch.send(base + i)

    async def consume() -> None:
        got.extend([x async for x in ch])

    consumers = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.gather(*(produce(b) for b in (0, 1000, 2000)))
    ch.close()
    await asyncio.gather(*consumers)
    assert sorted(got) == sorted(b + i for b in (0, 1000, 2000) for i in range(100))


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True])
async def test_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        sf.Channel(capacity)  # type: ignore[arg-type]


async def test_bad_overflow() -> None:
    with pytest.raises(ValueError, match="overflow"):
        sf.Channel(2, "spill")  # type: ignore[arg-type]
