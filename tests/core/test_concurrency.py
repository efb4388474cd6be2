"""concurrency=k: at most k items at once, input order kept unless ordered=False."""

import asyncio
import random

import pytest

import streamflow as sf
import streamflow.testing

pytestmark = pytest.mark.asyncio


async def _run(concurrency: int, ordered: bool) -> tuple[list[int], int]:
    rng = random.Random(1)
    delays = [rng.uniform(0, 0.004) for _ in range(60)]
    active = peak = 0

    async def jitter(x: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(delays[x])
        active -= 1
        return x

    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("n", range(60)).map(
        "jitter", jitter, concurrency=concurrency, ordered=ordered
    ).sink("o", sf.collect(out))
    await flow.run()
    return out, peak


async def test_ordered_keeps_input_order_with_k_in_flight() -> None:
    out, peak = await _run(8, ordered=True)
    assert out == list(range(60))
    assert peak == 8


async def test_unordered_emits_everything_as_it_completes() -> None:
    out, peak = await _run(8, ordered=False)
    assert sorted(out) == list(range(60))
    assert out != list(range(60))
    assert peak == 8


async def test_concurrent_errors_follow_the_policy() -> None:
    async def half(x: int) -> int:
        await asyncio.sleep(0)
        if x % 2:
            raise ValueError(x)
        return x

    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("n", range(20)).map("half", half, concurrency=4, errors="skip").sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == list(range(0, 20, 2))

    flow = sf.Flow("g")
    flow.source("n", range(20)).map("half", half, concurrency=4).sink("o", sf.collect())
    with pytest.raises(sf.StageError, match="stage 'half' of flow 'g' failed on item 1"):
        await flow.run()


async def test_concurrent_sink_and_pool_threads() -> None:
    import time

    def slow(x: int) -> int:
        time.sleep(0.001)
        return x

    sink = sf.testing.MemorySink(delay=0.001)
    flow = sf.Flow("f")
    flow.source("n", range(40)).map("slow", slow, device="cpu", concurrency=4).sink(
        "o", sink, concurrency=4
    )
    await flow.run()
    assert sink.items == list(range(40))


async def test_a_plain_function_returning_futures_keeps_k_in_flight_in_order() -> None:
    """The windowed path: no task per item; results are awaited in input order, a raise
    or a failed future goes to the error policy and the rest goes on."""
    loop = asyncio.get_running_loop()
    rng = random.Random(2)
    started: list[int] = []
    pending: set[asyncio.Future[int]] = set()
    peak = 0

    def start(x: int) -> asyncio.Future[int]:
        nonlocal peak
        if x == 7:
            raise ValueError("raised at once")
        started.append(x)
        future: asyncio.Future[int] = loop.create_future()
        pending.add(future)
        peak = max(peak, sum(not f.done() for f in pending))

        def finish() -> None:
            if x == 11:
                future.set_exception(ValueError("failed later"))
            else:
                future.set_result(x * 10)

        loop.call_later(rng.uniform(0, 0.003), finish)
        return future

    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("n", range(40)).map("start", start, concurrency=4, errors="skip").sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == [x * 10 for x in range(40) if x not in (7, 11)]
    assert peak == 4
    assert flow.metrics()["start"].skipped == 2

    flow = sf.Flow("g")
    flow.source("n", range(40)).map("start", start, concurrency=4).sink("o", sf.collect())
    with pytest.raises(sf.StageError, match="stage 'start' of flow 'g' failed on item 7"):
        await flow.run()
