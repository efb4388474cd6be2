"""What a host application sees when its flow fails or stops: every item still inside is
acked ABORTED at once (request futures fail, never hang), the state says so, and sending
into the flow fails fast."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import streamflow as sf
from streamflow.testing import MemorySink

pytestmark = pytest.mark.asyncio


class Requests:
    """A host app's side of a flow: each request is a message with a future, failed by its
    ack when it never reaches the sink (the pattern of examples/model_server.py)."""

    def __init__(self, capacity: int = 64) -> None:
        self.channel: sf.Channel[sf.Message[int]] = sf.Channel(capacity)
        self.acked_at: dict[int, float] = {}
        self.outcomes: dict[int, sf.Outcome] = {}

    def reply(self, msg: sf.Message[int]) -> None:
        assert msg.meta is not None
        msg.meta["future"].set_result(msg.value)

    async def send(self, x: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_ack(outcome: sf.Outcome) -> None:
            self.acked_at[x] = time.perf_counter()
            self.outcomes[x] = outcome
            if not future.done():
                future.set_exception(RuntimeError(f"request {x}: {outcome.name}"))

        await self.channel.send(sf.Message(x, meta={"future": future}, on_ack=on_ack))
        return future


async def test_a_failure_fails_every_pending_request_within_100_ms() -> None:
    """Items held by a batch being formed, in the channels and the failing item itself."""
    app = Requests()
    failed_at: list[float] = []

    def check(x: int) -> int:
        if x == 9:
            failed_at.append(time.perf_counter())
            raise ValueError("bad item")
        return x

    flow = sf.Flow("serve")
    (
        flow.source("requests", app.channel)
        .map("check", check)
        .batch("batch", max_size=100, max_wait=60)  # holds 0..8 when 9 fails
        .unbatch("split")
        .sink("reply", app.reply, envelope=True)
    )
    with pytest.raises(sf.StageError, match="bad item"):
        async with flow.start() as running:
            futures = [await app.send(x) for x in range(30)]
            await running.wait()
    (failure,) = failed_at
    assert sorted(app.outcomes) == list(range(30))
    assert set(app.outcomes.values()) == {sf.Outcome.ABORTED}
    assert max(app.acked_at.values()) - failure < 0.1
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)


async def test_failing_stage_aborts_everything_inside_at_once() -> None:
    app = Requests()
    failed_at: list[float] = []
    gate = asyncio.Event()

    async def slow(x: int) -> int:
        if x >= 4:
            await asyncio.sleep(30)  # in flight in a concurrency=4 stage when the flow fails
        return x

    async def check(x: int) -> int:
        if x == 3:
            await gate.wait()
            failed_at.append(time.perf_counter())
            raise ValueError("bad item")
        return x

    flow = sf.Flow("serve")
    (
        flow.source("requests", app.channel)
        .map("slow", slow, concurrency=4, ordered=False)
        .map("check", check)
        .sink("reply", app.reply, envelope=True)
    )
    futures: list[asyncio.Future[int]] = []
    with pytest.raises(sf.StageError, match="bad item") as caught:
        async with flow.start() as running:
            assert running.state == sf.FlowState.RUNNING
            futures = [await app.send(x) for x in range(20)]  # 4 in flight, the rest queued
            while len(app.outcomes) < 3:  # 0, 1, 2 answered
                await asyncio.sleep(0.001)
            gate.set()
            await running.wait()
    assert running.state == sf.FlowState.FAILED == "failed"
    assert running.error is caught.value
    assert caught.value.stage == "check"
    assert [f.result() for f in futures[:3]] == [0, 1, 2]
    for x, future in enumerate(futures[3:], start=3):
        with pytest.raises(RuntimeError, match="ABORTED"):
            future.result()
        assert app.outcomes[x] == sf.Outcome.ABORTED
    (failure,) = failed_at
    latest = max(app.acked_at[x] for x in range(3, 20))
    assert latest - failure < 0.1


async def test_sending_into_a_failed_flow_fails_fast_naming_the_failure() -> None:
    app = Requests()

    def check(x: int) -> int:
        raise ValueError("broken model")

    flow = sf.Flow("serve")
    flow.source("requests", app.channel).map("check", check).sink("reply", app.reply)
    with pytest.raises(sf.StageError):
        async with flow.start() as running:
            first = await app.send(1)
            await running.wait()
    with pytest.raises(RuntimeError, match="ABORTED"):
        await first
    with pytest.raises(sf.ChannelClosed, match="flow 'serve' failed: stage 'check'"):
        await asyncio.wait_for(app.send(2), 1)
    with pytest.raises(sf.ChannelClosed, match="broken model"):
        app.channel.send_nowait(sf.Message(3))


async def test_a_failure_fails_the_senders_waiting_for_room() -> None:
    app = Requests(capacity=1)
    gate = asyncio.Event()

    async def check(x: int) -> int:
        await gate.wait()
        raise ValueError("broken")

    flow = sf.Flow("serve")
    flow.source("requests", app.channel).map("check", check, capacity=1).sink("o", app.reply)
    with pytest.raises(sf.StageError):
        async with flow.start() as running:
            # one in the stage's hands, one in its inbox, one in the source channel
            futures = [await app.send(x) for x in range(3)]
            blocked = asyncio.ensure_future(app.send(99))  # waits for room
            await asyncio.sleep(0.01)
            gate.set()
            await running.wait()
    with pytest.raises(sf.ChannelClosed, match="failed"):
        await asyncio.wait_for(blocked, 1)
    assert sorted(app.outcomes) == [0, 1, 2]
    assert set(app.outcomes.values()) == {sf.Outcome.ABORTED}
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)


async def test_stop_without_drain_aborts_in_flight_items_and_refuses_sends() -> None:
    app = Requests()

    async def slow(x: int) -> int:
        await asyncio.sleep(30)
        return x

    flow = sf.Flow("serve")
    flow.source("requests", app.channel).map("slow", slow, concurrency=3).sink("o", app.reply)
    async with flow.start() as running:
        futures = [await app.send(x) for x in range(10)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        stopping = asyncio.ensure_future(running.stop(drain=False))
        await asyncio.sleep(0)
        assert running.state == sf.FlowState.STOPPED
        assert len(app.outcomes) == 10  # acked before the stages have even wound down
        assert max(app.acked_at.values()) - t0 < 0.1
        await stopping
    assert running.state == "stopped" and running.error is None
    assert set(app.outcomes.values()) == {sf.Outcome.ABORTED}
    assert all(f.done() and isinstance(f.exception(), RuntimeError) for f in futures)
    with pytest.raises(sf.ChannelClosed, match="flow 'serve' was stopped"):
        await app.send(11)


async def test_drain_answers_what_was_sent_then_refuses_sends() -> None:
    app = Requests()
    gate = asyncio.Event()
    states: list[sf.FlowState] = []

    async def slow(x: int) -> int:
        await gate.wait()
        return x

    flow = sf.Flow("serve")
    flow.source("requests", app.channel).map("slow", slow).sink("o", app.reply, envelope=True)
    running = flow.start()
    assert running.state == sf.FlowState.STARTING
    async with running:
        futures = [await app.send(x) for x in range(10)]  # most still in the source channel
        stopping = asyncio.ensure_future(running.stop(drain=True))
        await asyncio.sleep(0.01)
        states.append(running.state)
        with pytest.raises(sf.ChannelClosed, match="flow 'serve' is draining"):
            await app.send(10)
        gate.set()
        await stopping
        states.append(running.state)
    assert states == [sf.FlowState.DRAINING, sf.FlowState.STOPPED]
    assert [await f for f in futures] == list(range(10))
    assert set(app.outcomes.values()) == {sf.Outcome.DELIVERED}
    with pytest.raises(sf.ChannelClosed, match="draining"):
        await app.send(11)


async def test_sources_ending_leave_the_flow_stopped() -> None:
    flow = sf.Flow("f")
    sink: MemorySink[int] = MemorySink()
    flow.source("s", range(5)).sink("o", sink)
    async with flow.start() as running:
        await running.wait()
        assert running.state == sf.FlowState.STOPPED
    assert running.error is None and sink.items == [0, 1, 2, 3, 4]


async def test_a_pipeline_in_flight_is_aborted_when_a_later_stage_fails() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 8), partition=[1, 2])
    acks: list[sf.Outcome] = []

    def fail_on_fifth(msg: sf.Message[Any]) -> None:
        if msg.meta == {"i": 5}:
            raise ValueError("sink broke")

    def source() -> Any:
        for i in range(200):
            yield sf.Message(torch.randn(8), meta={"i": i}, on_ack=acks.append)

    flow = sf.Flow("p")
    flow.source("s", source()).map("model", pipe).sink("o", fail_on_fifth, envelope=True)
    with pytest.raises(sf.StageError, match="sink broke"):
        await flow.run()
    delivered, aborted = acks.count(sf.Outcome.DELIVERED), acks.count(sf.Outcome.ABORTED)
    assert delivered <= 5 and aborted >= 1  # the failing item, and what was in the pipeline
    assert len(acks) == delivered + aborted  # every item taken is acked
