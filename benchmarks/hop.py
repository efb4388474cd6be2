"""Cost of one hop between stages: small items through a chain of 4 map stages.

Two rows per contender, side by side in one run (rounds interleaved, so drift hits every
contender alike):

- queued: the source is far ahead (an iterator), so every stage finds items waiting;
- trickle: one item at a time (the next one enters when the previous one reached the sink),
  so each item goes through alone: the latency of a hop with nothing queued.

Prints microseconds per item per hop (the whole chain's time over its 5 hops) for
streamflow (metrics and acks on; its stages as `async def` like the other Python chains,
and as plain `def` like Bytewax's), a bare asyncio.Queue(16) chain, an aiostream pipe.map
chain and, when it is installed, Bytewax (`pip install bytewax==0.21.*`) at input batches
of 1, 100 and 1000, with the ratio to asyncio.Queue; then what one more map stage costs
(chains of 4 and 8 maps) and what every item pays once whatever the chain's length.
Run: .venv/bin/python benchmarks/hop.py [--items N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from _common import median, table

import streamflow as sf

HOPS = 4  # four map stages: source -> m1 -> m2 -> m3 -> m4 -> sink
TRICKLE_SHARE = 20  # the trickle rows move items/20 items (one at a time is slow)


async def inc(x: int) -> int:
    return x + 1


def inc_plain(x: int) -> int:
    return x + 1


class Trickle:
    """Yields ``n`` items, the next one only once the sink has the previous one."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = asyncio.Event()

    def done(self) -> None:
        self.arrived.set()

    async def items(self) -> AsyncIterator[int]:
        for i in range(self.n):
            self.arrived.clear()
            yield i
            await self.arrived.wait()


async def queue_chain(n: int, trickle: bool, hops: int = HOPS) -> int:
    queues = [asyncio.Queue[int | None](16) for _ in range(hops + 1)]
    total = 0
    pace = Trickle(n)

    async def source() -> None:
        if trickle:
            async for i in pace.items():
                await queues[0].put(i)
        else:
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
            pace.done()

    await asyncio.gather(source(), *(stage(queues[i], queues[i + 1]) for i in range(hops)), sink())
    return total


async def aiostream_chain(n: int, trickle: bool) -> int:
    from aiostream import pipe, stream

    pace = Trickle(n)
    xs = stream.iterate(pace.items() if trickle else range(n))
    for _ in range(HOPS):
        xs = xs | pipe.map(inc, task_limit=1)
    total = 0
    async with xs.stream() as items:
        async for item in items:
            total += item
            pace.done()
    return total


async def streamflow_chain(n: int, trickle: bool, plain: bool = False, hops: int = HOPS) -> int:
    total = 0
    pace = Trickle(n)

    def add(x: int) -> None:
        nonlocal total
        total += x
        pace.done()

    async def add_async(x: int) -> None:
        add(x)

    flow = sf.Flow("hop")
    s = flow.source("numbers", pace.items() if trickle else sf.iterate(range(n)))
    for i in range(hops):
        s = s.map(f"inc{i}", inc_plain if plain else inc, capacity=16)
    s.sink("sum", add if plain else add_async)
    await flow.run()
    return total


async def streamflow_plain_chain(n: int, trickle: bool) -> int:
    return await streamflow_chain(n, trickle, plain=True)


def bytewax_chain(batch: int) -> Callable[[int, bool], Awaitable[int]]:
    async def run(n: int, trickle: bool) -> int:
        import bytewax.operators as op
        from bytewax.dataflow import Dataflow
        from bytewax.testing import TestingSink, TestingSource, run_main

        out: list[int] = []
        flow = Dataflow("hop")
        s = op.input("in", flow, TestingSource(range(n), batch_size=batch))
        for i in range(HOPS):
            s = op.map(f"inc{i}", s, lambda x: x + 1)
        op.output("out", s, TestingSink(out))
        run_main(flow)  # blocks this thread: nothing else runs meanwhile
        return sum(out)

    return run


async def timed(run: Callable[[int, bool], Awaitable[int]], n: int, trickle: bool) -> float:
    t0 = time.perf_counter()
    total = await run(n, trickle)
    elapsed = time.perf_counter() - t0
    assert total == sum(range(n)) + HOPS * n, run
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    contenders: dict[str, Callable[[int, bool], Awaitable[int]]] = {
        "asyncio.Queue(16)": queue_chain,
        "aiostream pipe.map": aiostream_chain,
        "streamflow (async def)": streamflow_chain,
        "streamflow (def)": streamflow_plain_chain,
    }
    bytewax = importlib.util.find_spec("bytewax") is not None
    if bytewax:
        for batch in (1, 100, 1000):
            contenders[f"bytewax 0.21 (batch {batch})"] = bytewax_chain(batch)
    rows = [(name, trickle) for trickle in (False, True) for name in contenders]
    rows = [(n, t) for n, t in rows if not (t and n.startswith("bytewax"))]  # no pacing hook
    times: dict[tuple[str, bool], list[float]] = {row: [] for row in rows}
    await timed(streamflow_chain, 10_000, False)  # warm up imports and caches
    for _ in range(args.repeats):
        for name, trickle in rows:
            n = args.items // TRICKLE_SHARE if trickle else args.items
            times[name, trickle].append(await timed(contenders[name], n, trickle) / n)
    per_hop = {row: median(t) / (HOPS + 1) * 1e6 for row, t in times.items()}
    print(
        f"{args.items:,} items queued, {args.items // TRICKLE_SHARE:,} trickled, {HOPS} map "
        f"stages ({HOPS + 1} channel hops), median of {args.repeats} interleaved rounds"
    )
    table_rows = []
    for name, trickle in rows:
        base = per_hop["asyncio.Queue(16)", trickle]
        us = per_hop[name, trickle]
        table_rows.append((name, "trickle" if trickle else "queued", us, us / base))
    print(table(["chain", "items", "us/item/hop", "x asyncio.Queue"], table_rows))
    if not bytewax:
        print("(bytewax is not installed: pip install 'bytewax==0.21.*' adds its rows)")
    await marginal(args.items, args.repeats)


async def marginal(n: int, repeats: int) -> None:
    """What one more map stage costs: chains of 4 and 8 maps, queued, in paired rounds;
    (t8 - t4) / 4 per item. The rows above divide the whole chain's time by its 5 hops, so
    they also spread what every item pays once (its envelope and ack at the source, its
    delivery at the sink) over the hops."""
    chains: dict[str, Callable[[int], Awaitable[int]]] = {
        "asyncio.Queue(16)": lambda hops: queue_chain(n, False, hops),
        "streamflow (async def)": lambda hops: streamflow_chain(n, False, False, hops),
        "streamflow (def)": lambda hops: streamflow_chain(n, False, True, hops),
    }
    slopes: dict[str, list[float]] = {name: [] for name in chains}
    fixed: dict[str, list[float]] = {name: [] for name in chains}
    for _ in range(repeats):
        for name, run in chains.items():
            t = {}
            for hops in (4, 8):
                t0 = time.perf_counter()
                await run(hops)
                t[hops] = (time.perf_counter() - t0) / n * 1e6
            slopes[name].append((t[8] - t[4]) / 4)
            fixed[name].append(t[4] - 4 * (t[8] - t[4]) / 4)
    print(f"\none more map stage, queued ({n:,} items, chains of 4 and 8 maps, {repeats} rounds):")
    base = median(slopes["asyncio.Queue(16)"])
    rows = [
        (name, median(slopes[name]), median(slopes[name]) / base, median(fixed[name]))
        for name in chains
    ]
    print(table(["chain", "us/item/added hop", "x asyncio.Queue", "us/item fixed"], rows))


if __name__ == "__main__":
    asyncio.run(main())
