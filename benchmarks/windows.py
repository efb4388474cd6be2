"""Keyed event-time windows: a mean per key over 10 s tumbling windows.

1,000,000 readings ``(key, t, value)`` over 1,000 keys, one reading per millisecond of event
time (about one per key per second, so about 10 per window), each up to 1 s older than the
readings before it (out of order within 1 s; seeded, so every run sees the same events). A
window closes when the watermark, the largest event time seen minus a lateness of 1 s,
reaches its end; with that lateness no reading is late. Contenders, side by side in one run
(rounds interleaved, so drift hits every contender alike; the median of the rounds):

- hand loop: a dict of ``[sum, count]`` accumulators per (end, key) and the same watermark
  and lateness rule, written for this job alone: the floor;
- streamflow aggregate: ``sf.iterate(readings)`` -> ``key_by`` -> ``window(Tumbling(10),
  time=..., lateness=1, aggregate=(init, add))`` -> a sink that takes the mean;
- streamflow items: the same window holding its items, the mean taken by a ``map`` after it;
- Bytewax 0.21 (when installed: ``pip install 'bytewax==0.21.*'``): ``key_on`` ->
  ``fold_window`` (``EventClock``, ``TumblingWindower``, upstream order) -> ``map`` (the mean)
  -> ``TestingSink``, run with ``run_main`` at input batches of 1 (on the first 20,000
  readings: it is slow), 100 and 1000. Its clock is per key (the watermark is a key's largest
  time minus the lateness), the others' per input; with no late reading both give the same
  windows. Its ``now_getter`` is frozen, so its watermark is pure event time like the
  others' (by default it also moves with the system clock between items, which at about
  1,000 events/s would make readings late); it gets its timestamps as datetimes made before
  the clock starts.

Every contender's windows (count and sum per key and window) are checked against the hand
loop's. Prints events/s, the ratios the targets are about (streamflow / Bytewax's best, >= 2;
streamflow / hand loop, >= 0.5), and memory per open window: tracemalloc's count of what is
allocated between the start of a run and a pause in the middle of the stream (the flow held
at its source once the window stage has taken every item before the pause; gc run before
both readings; these runs keep no results), divided by the windows open then (the stage's
``windows_open``). That is the whole flow: windows, accumulators or item lists (references:
the readings exist before), the acks the windows hold, buffers; the three files that
allocated most are shown. Bytewax keeps its state in Rust, out of tracemalloc's sight, so it
has no memory row.

Run: .venv/bin/python benchmarks/windows.py [--readings N] [--repeats R]
     (--readings 100000 --repeats 1 for a quick run)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import itertools
import math
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

from _common import median, table

import streamflow as sf

KEYS = 1000
SIZE = 10.0  # seconds, tumbling
LATENESS = 1.0  # seconds; readings are out of order by less than this
BYTEWAX_BATCH_1_READINGS = 20_000

Reading = tuple[str, float, float]  # key, event time (s), value
Result = dict[tuple[str, float], tuple[int, float]]  # (key, start) -> (count, sum)
Run = Callable[[list[Any]], Awaitable[Result]]
Mean = tuple[str, float, float, int, float]  # key, start, mean, count, sum

key_of = itemgetter(0)
time_of = itemgetter(1)


def make_readings(n: int, seed: int = 16) -> list[Reading]:
    """Reading ``i`` is due at ``i`` ms and stamped up to 999 ms earlier: each is older than
    the readings before it by less than 1 s. Whole milliseconds, so floats and Bytewax's
    microsecond datetimes put every reading in the same window."""
    rng = random.Random(seed)
    return [
        (f"k{rng.randrange(KEYS):03d}", (i + 1000 - rng.randrange(1000)) / 1000, rng.gauss(20, 5))
        for i in range(n)
    ]


class Pause:
    """Where the memory run stops: tracemalloc's count there, less the one at the start,
    and the same by the file that allocated it."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.bytes = 0
        self.windows = 0
        self.by_file: list[tuple[str, int]] = []
        self._base: tracemalloc.Snapshot | None = None

    def start(self) -> None:
        gc.collect()
        self._base = tracemalloc.take_snapshot()

    def __call__(self, windows: int) -> None:
        gc.collect()
        assert self._base is not None
        diff = tracemalloc.take_snapshot().compare_to(self._base, "filename")
        self.bytes = sum(d.size_diff for d in diff)
        self.by_file = [(d.traceback[0].filename, d.size_diff) for d in diff[:3]]
        self.windows = windows


# -- the floor ---------------------------------------------------------------------------


def hand_loop(
    readings: Iterable[Reading], emit: Callable[[Mean], Any], pause: Pause | None = None
) -> None:
    """Open windows as ``{end: {key: [sum, count]}}``; a window closes (its mean taken and
    emitted) when the watermark reaches its end, late readings are dropped, the rest close
    at the end. ``pause(open windows)`` is called where the memory run pauses."""
    by_end: dict[float, dict[str, list[float]]] = {}
    ends: list[float] = []  # the open ends, ascending (tumbling: at most a few)
    largest = -math.inf
    late = 0

    def close(end: float) -> None:
        start = end - SIZE
        for key, (total, count) in by_end.pop(end).items():
            emit((key, start, total / count, int(count), total))

    for i, (key, t, value) in enumerate(readings):
        if pause is not None and i == pause.at:
            pause(sum(len(w) for w in by_end.values()))
        if t > largest:
            largest = t
            watermark = largest - LATENESS
            while ends and ends[0] <= watermark:
                close(ends.pop(0))
        start = SIZE * math.floor(t / SIZE)
        end = start + SIZE
        if end <= largest - LATENESS:
            late += 1
            continue
        windows = by_end.get(end)
        if windows is None:
            windows = by_end[end] = {}
            ends.append(end)
            ends.sort()
        acc = windows.get(key)
        if acc is None:
            windows[key] = [value, 1]
        else:
            acc[0] += value
            acc[1] += 1
    while ends:
        close(ends.pop(0))
    assert late == 0


def result(out: list[Mean]) -> Result:
    return {(k, s): (c, total) for k, s, _, c, total in out}


async def run_hand_loop(readings: list[Any]) -> Result:
    out: list[Mean] = []
    hand_loop(readings, out.append)
    return result(out)


# -- streamflow --------------------------------------------------------------------------


def init() -> list[float]:
    return [0.0, 0]


def add(acc: list[float], reading: Reading) -> list[float]:
    acc[0] += reading[2]
    acc[1] += 1
    return acc


def build_streamflow(source: Any, aggregate: bool, emit: Callable[[Mean], Any]) -> sf.Flow:
    flow = sf.Flow("windows")
    keyed = flow.source("readings", source).key_by("by_key", key_of)
    if aggregate:

        def mean_of(w: sf.Window[Reading]) -> None:
            total, count = w.value
            emit((w.key, w.start, total / count, int(count), total))

        keyed.window(
            "per_10s",
            sf.Tumbling(SIZE),
            time=time_of,
            lateness=LATENESS,
            aggregate=(init, add),
        ).sink("means", mean_of)
    else:

        def mean_items(w: sf.Window[Reading]) -> Mean:
            total = 0.0
            for r in w.items:
                total += r[2]
            return (w.key, w.start, total / len(w.items), len(w.items), total)

        keyed.window("per_10s", sf.Tumbling(SIZE), time=time_of, lateness=LATENESS).map(
            "mean", mean_items
        ).sink("means", emit)
    return flow


def streamflow_run(aggregate: bool) -> Run:
    async def run(readings: list[Any]) -> Result:
        out: list[Mean] = []
        flow = build_streamflow(sf.iterate(readings), aggregate, out.append)
        await flow.run()
        assert flow.metrics()["per_10s"].state.get("late", 0) == 0
        return result(out)

    return run


# -- Bytewax -----------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FROZEN = datetime(2000, 1, 1, tzinfo=UTC)


def bytewax_readings(readings: list[Reading]) -> list[tuple[str, datetime, float]]:
    return [(k, EPOCH + timedelta(milliseconds=round(t * 1000)), v) for k, t, v in readings]


def bytewax_run(batch: int) -> Run:
    async def run(readings: list[Any]) -> Result:
        import bytewax.operators as op
        from bytewax.dataflow import Dataflow
        from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window
        from bytewax.testing import TestingSink, TestingSource, run_main

        def folder(acc: list[float], reading: tuple[str, datetime, float]) -> list[float]:
            acc[0] += reading[2]
            acc[1] += 1
            return acc

        def mean_of(item: tuple[str, tuple[int, list[float]]]) -> tuple[Any, ...]:
            key, (window_id, (total, count)) = item
            return (key, window_id * SIZE, total / count, int(count), total)

        out: list[Mean] = []
        flow = Dataflow("windows")
        s = op.input("readings", flow, TestingSource(readings, batch_size=batch))
        keyed = op.key_on("by_key", s, key_of)
        clock = EventClock(
            time_of,
            wait_for_system_duration=timedelta(seconds=LATENESS),
            now_getter=lambda: FROZEN,
            to_system_utc=lambda _: None,
        )
        windower = TumblingWindower(length=timedelta(seconds=SIZE), align_to=EPOCH)
        windows = fold_window("per_10s", keyed, clock, windower, init, folder, _merge, False)
        op.output("out", op.map("mean", windows.down, mean_of), TestingSink(out))
        run_main(flow)  # type: ignore[no-untyped-call]  # blocks this thread meanwhile
        return result(out)

    return run


def _merge(a: list[float], b: list[float]) -> list[float]:
    return [a[0] + b[0], a[1] + b[1]]


# -- memory ------------------------------------------------------------------------------


def pause_point(n: int) -> int:
    """Mid-stream, 9.5 s into a window (each key's window about full), clamped to ``n``."""
    return min(n - 1, 9_500 + 10_000 * ((n // 10_000) // 2))


def discard(mean: Mean) -> None:
    """The memory runs keep no results: what is measured is what the windows hold."""


def memory_hand_loop(readings: list[Reading]) -> Pause:
    pause = Pause(pause_point(len(readings)))
    tracemalloc.start()
    try:
        pause.start()
        hand_loop(itertools.islice(readings, pause.at + 1), discard, pause)
    finally:
        tracemalloc.stop()
    return pause


async def memory_streamflow(readings: list[Reading], aggregate: bool) -> Pause:
    pause = Pause(pause_point(len(readings)))
    running: Any = None

    async def source() -> AsyncIterator[Reading]:
        pause.start()
        for r in itertools.islice(readings, pause.at):
            yield r
        while running is None or running.metrics()["per_10s"].items_in < pause.at:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let it settle what it took
        pause(running.metrics()["per_10s"].state["windows_open"])

    tracemalloc.start()
    try:
        flow = build_streamflow(source(), aggregate, discard)
        async with flow.start() as running:
            await running.wait()
    finally:
        tracemalloc.stop()
    return pause


# -- the run -----------------------------------------------------------------------------


async def timed(run: Run, readings: list[Any], expected: Result | None) -> tuple[float, Result]:
    gc.collect()
    t0 = time.perf_counter()
    result = await run(readings)
    elapsed = time.perf_counter() - t0
    if expected is not None:
        check(result, expected)
    return elapsed, result


class Mismatch(AssertionError):
    pass


def check(result: Result, expected: Result) -> None:
    """Same windows, same counts, sums equal (exactly: every contender adds in arrival
    order; a relative 1e-9 is tolerated and reported as such)."""
    if result.keys() != expected.keys():
        missing, extra = expected.keys() - result.keys(), result.keys() - expected.keys()
        raise Mismatch(f"windows differ: {len(missing)} missing, {len(extra)} extra")
    for w, (count, total) in result.items():
        want_count, want_total = expected[w]
        if count != want_count or not math.isclose(total, want_total, rel_tol=1e-9):
            raise Mismatch(f"window {w}: {count}, {total} != {want_count}, {want_total}")
    inexact = sum(1 for w, (_, total) in result.items() if total != expected[w][1])
    if inexact:
        print(f"  ({inexact} window sums equal only to 1e-9: a different order of addition)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    readings = make_readings(args.readings)
    subset = readings[: min(args.readings, BYTEWAX_BATCH_1_READINGS)]
    contenders: dict[str, tuple[Run, list[Any]]] = {
        "hand loop": (run_hand_loop, readings),
        "streamflow aggregate": (streamflow_run(True), readings),
        "streamflow items": (streamflow_run(False), readings),
    }
    bytewax = importlib.util.find_spec("bytewax") is not None
    if bytewax:
        bw = bytewax_readings(readings)
        for batch in (1, 100, 1000):
            data = bw[: len(subset)] if batch == 1 else bw
            contenders[f"bytewax 0.21 (batch {batch})"] = (bytewax_run(batch), data)
    expected = {len(readings): await run_hand_loop(readings)}
    expected[len(subset)] = await run_hand_loop(subset)
    windows = len(expected[len(readings)])
    await timed(streamflow_run(True), subset, expected[len(subset)])  # warm up
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (run, data) in contenders.items():
            elapsed, _ = await timed(run, data, expected[len(data)])
            times[name].append(elapsed / len(data))
    rate = {name: 1 / median(t) for name, t in times.items()}

    memory = {
        "hand loop": memory_hand_loop(readings),
        "streamflow aggregate": await memory_streamflow(readings, True),
        "streamflow items": await memory_streamflow(readings, False),
    }

    print(
        f"{args.readings:,} readings over {KEYS:,} keys, 10 s tumbling windows in event time, "
        f"out of order within 1 s, lateness 1 s: {windows:,} windows; median of "
        f"{args.repeats} interleaved rounds (bytewax batch 1: the first {len(subset):,} "
        "readings); every contender's windows (count and sum per key and window) equal "
        "the hand loop's"
    )
    hand = rate["hand loop"]
    rows = []
    for name in contenders:
        m = memory.get(name)
        per_window = f"{m.bytes / m.windows:,.0f}" if m and m.windows else "n/a"
        rows.append((name, f"{rate[name]:,.0f}", rate[name] / hand, per_window))
    print(table(["contender", "events/s", "x hand loop", "bytes/open window"], rows))
    first = memory["streamflow aggregate"]
    print(
        f"memory: tracemalloc at reading {first.at:,} (a pause mid-stream, "
        f"{first.windows:,} windows open in streamflow), less the start of the run; "
        "the most per file:"
    )
    for name, m in memory.items():
        top = ", ".join(
            f"{file.rsplit('/', 1)[-1]} {size / m.windows:,.0f}" for file, size in m.by_file
        )
        print(f"  {name}: {top} (bytes per open window)")
    if bytewax:
        best = max((n for n in rate if n.startswith("bytewax")), key=rate.__getitem__)
        for name in ("streamflow aggregate", "streamflow items"):
            print(
                f"{name}: {rate[name] / rate[best]:.2f}x {best} (target >= 2), "
                f"{rate[name] / hand:.2f}x hand loop (target >= 0.5)"
            )
    else:
        print("(bytewax is not installed: pip install 'bytewax==0.21.*' adds its rows)")


if __name__ == "__main__":
    asyncio.run(main())
