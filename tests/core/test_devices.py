"""device="cpu:N": dedicated worker threads, a free event loop, real parallelism, no leftovers."""

import asyncio
import threading
import time

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


def _streamflow_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamflow-")]


async def test_sync_work_runs_on_the_named_worker_and_the_loop_stays_free() -> None:
    ticks = 0
    names: set[str] = set()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    def heavy(x: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.02)  # blocks the worker thread, never the loop
        return x

    flow = sf.Flow("f")
    flow.source("n", range(10)).map("heavy", heavy, device="cpu:3").sink("o", sf.collect())
    t = asyncio.create_task(ticker())
    await flow.run()
    t.cancel()
    assert names == {"streamflow-cpu:3"}
    assert ticks >= 10  # ~40 possible in 0.2 s; a blocked loop would give ~0
    assert _streamflow_threads() == []


async def test_stages_on_two_workers_run_at_the_same_time() -> None:
    # Both stages must be inside their functions at once for the barrier to open.
    barrier = threading.Barrier(2, timeout=5)

    def meet(x: int) -> int:
        barrier.wait()
        return x

    out_a: list[int] = []
    out_b: list[int] = []
    flow = sf.Flow("f")
    src = flow.source("n", range(5))
    src.map("a", meet, device="cpu:0").sink("oa", sf.collect(out_a))
    src.map("b", meet, device="cpu:1").sink("ob", sf.collect(out_b))
    await flow.run()
    assert out_a == out_b == list(range(5))


async def test_default_pool_device() -> None:
    names: set[str] = set()

    def where(x: int) -> int:
        names.add(threading.current_thread().name)
        return x

    flow = sf.Flow("f")
    flow.source("n", range(3)).map("w", where, device="cpu").sink("o", sf.collect())
    await flow.run()
    assert threading.main_thread().name not in names


async def test_cancelling_the_task_leaves_no_task_or_thread() -> None:
    started = threading.Event()

    def slow(x: int) -> int:
        started.set()
        time.sleep(0.05)
        return x

    flow = sf.Flow("f")
    flow.source("n", range(10**6)).map("slow", slow, device="cpu:0").sink("o", sf.collect())
    before = asyncio.all_tasks()
    task = asyncio.create_task(flow.run())
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == before
    assert _streamflow_threads() == []
