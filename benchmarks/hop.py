"""Cost of one hop between stages: 200,000 small items through a chain of 4 map stages.

Prints microseconds per item per hop for streamflow (metrics and acks on), a bare
asyncio.Queue(16) chain and an aiostream pipe.map chain, and the ratio to asyncio.Queue.
Run: .venv/bin/python benchmarks/hop.py [--items N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from _common import median, table

import streamflow as sf

HOPS = 4  # four map stages: source -> m1 -> m2 -> m3 -> m4 -> sink


async def inc(x: int) -> int:
    return x + 1


async def run_queue_chain(n: int) -> int:
    queues = [asyncio.Queue[int | None](16) for _ in range(HOPS + 1)]
    total = 0

    async def source() -> None:
        for i in range(n):
            await queues[0].put(i)
        await queues[0].put(None)

    async def stage(q_in: asyncio.Queue[int | None], q_out: asyncio.Queue[int | None]) -> None:
        while (item := await q_in.get()) is not None:
            await q_out.put(await inc(item))
        await q_out.put(None)

    async def sink() -> None:
        nonlocal total
        while (item := await queues[-1].get()) is not None:
            total += item

    await asyncio.gather(source(), *(stage(queues[i], queues[i + 1]) for i in range(HOPS)), sink())
    return total


async def run_aiostream(n: int) -> int:
    from aiostream import pipe, stream

    xs = stream.iterate(range(n))
    for _ in range(HOPS):
        xs = xs | pipe.map(inc, task_limit=1)
    total = 0
    async with xs.stream() as items:
        async for item in items:
            total += item
    return total


async def run_streamflow(n: int) -> int:
    total = 0

    async def add(x: int) -> None:
        nonlocal total
        total += x

    flow = sf.Flow("hop")
    s = flow.source("numbers", sf.iterate(range(n)))
    for i in range(HOPS):
        s = s.map(f"inc{i}", inc, capacity=16)
    s.sink("sum", add)
    await flow.run()
    return total


async def timed(run: Callable[[int], Awaitable[int]], n: int) -> float:
    t0 = time.perf_counter()
    total = await run(n)
    elapsed = time.perf_counter() - t0
    assert total == sum(range(n)) + HOPS * n, run.__name__
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    runs = {
        "asyncio.Queue(16)": run_queue_chain,
        "aiostream pipe.map": run_aiostream,
        "streamflow": run_streamflow,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    await timed(run_streamflow, 10_000)  # warm up imports and caches
    for _ in range(args.repeats):  # interleaved, so drift hits every contender alike
        for name, run in runs.items():
            times[name].append(await timed(run, args.items))
    per_hop = {name: median(t) / args.items / (HOPS + 1) * 1e6 for name, t in times.items()}
    base = per_hop["asyncio.Queue(16)"]
    print(
        f"{args.items:,} items, {HOPS} map stages ({HOPS + 1} channel hops), "
        f"median of {args.repeats}"
    )
    print(
        table(
            ["chain", "us/item/hop", "x asyncio.Queue"],
            [(name, us, us / base) for name, us in per_hop.items()],
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
