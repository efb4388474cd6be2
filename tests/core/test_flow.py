"""Building and running flows: the README quickstart and every stage kind."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import streamflow as sf
import streamflow.testing

pytestmark = pytest.mark.asyncio


async def test_readme_quickstart() -> None:
    async def double(x: int) -> int:
        return 2 * x

    results: list[int] = []
    flow = sf.Flow("demo")
    nums = flow.source("numbers", sf.iterate(range(1000)))
    doubled = nums.map("double", double, capacity=16)
    kept = doubled.filter("keep", lambda x: x % 3 == 0)
    kept.sink("out", sf.collect(results))
    await flow.run()
    assert results == [2 * i for i in range(1000) if (2 * i) % 3 == 0]


async def test_async_iterable_source_sync_map_and_callable_sink() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(50):
            await asyncio.sleep(0)
            yield i

    seen: list[str] = []

    async def write(item: str) -> None:
        seen.append(item)

    flow = sf.Flow("f")
    flow.source("n", numbers()).map("fmt", lambda x: f"<{x}>").sink("w", write)
    await flow.run()
    assert seen == [f"<{i}>" for i in range(50)]


async def test_flat_map_accepts_iterables_and_async_generators() -> None:
    async def twice(x: int) -> AsyncIterator[int]:
        yield x
        yield -x

    out: list[int] = []
    flow = sf.Flow("f")
    (
        flow.source("n", range(1, 4))
        .flat_map("range", lambda x: range(x))
        .flat_map("twice", twice)
        .sink("out", sf.collect(out))
    )
    await flow.run()
    assert out == [0, 0, 0, 0, 1, -1, 0, 0, 1, -1, 2, -2]


async def test_batch_emits_when_full_and_at_end() -> None:
    out: list[list[int]] = []
    flow = sf.Flow("f")
    flow.source("n", range(10)).batch("b", max_size=4, max_wait=10.0).sink("out", sf.collect(out))
    await flow.run()
    assert out == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_batch_emits_when_the_oldest_item_waited_max_wait() -> None:
    async def trickle() -> AsyncIterator[int]:
        for i in range(3):
            yield i
        await asyncio.sleep(0.3)
        yield 3

    out: list[list[int]] = []
    flow = sf.Flow("f")
    flow.source("n", trickle()).batch("b", max_size=100, max_wait=0.05).sink("o", sf.collect(out))
    await flow.run()
    assert out == [[0, 1, 2], [3]]


async def test_batch_then_unbatch_round_trips() -> None:
    out: list[int] = []
    flow = sf.Flow("f")
    (
        flow.source("n", range(25))
        .batch("b", 8, 0.01)
        .map("square", lambda xs: [x * x for x in xs])
        .unbatch("u")
        .sink("out", sf.collect(out))
    )
    await flow.run()
    assert out == [x * x for x in range(25)]


async def test_merge_fans_in_and_broadcast_fans_out() -> None:
    left: list[Any] = []
    right: list[Any] = []
    flow = sf.Flow("f")
    a = flow.source("a", range(0, 100))
    b = flow.source("b", range(1000, 1100))
    both = sf.merge("both", a, b)
    both.map("id", lambda x: x).sink("left", sf.collect(left))
    both.sink("right", sf.collect(right))
    await flow.run()
    expected = sorted([*range(100), *range(1000, 1100)])
    assert sorted(left) == expected
    assert sorted(right) == expected
    assert [x for x in left if x < 1000] == list(range(100))  # each input keeps its order


async def test_class_stage_life_cycle() -> None:
    calls: list[str] = []

    class Scale(sf.Stage[int, int]):
        def __init__(self, factor: int) -> None:
            self.factor = factor

        async def setup(self) -> None:
            calls.append("setup")

        async def process(self, item: int) -> int:
            if not calls or calls[-1] != "process":
                calls.append("process")
            return item * self.factor

        async def teardown(self) -> None:
            calls.append("teardown")

    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("n", range(5)).map("scale", Scale(10)).sink("out", sf.collect(out))
    await flow.run()
    assert out == [0, 10, 20, 30, 40]
    assert calls == ["setup", "process", "teardown"]


async def test_sync_class_stage_runs_on_its_worker_and_tears_down_on_failure() -> None:
    import threading

    threads: set[str] = set()
    torn_down = []

    class Boom(sf.Stage[int, int]):
        def setup(self, context: sf.StageContext) -> None:
            self.device = context.device

        def process(self, item: int) -> int:
            threads.add(threading.current_thread().name)
            if item == 3:
                raise KeyError(item)
            return item

        def teardown(self) -> None:
            torn_down.append(self.device)

    flow = sf.Flow("f")
    flow.source("n", range(10)).map("boom", Boom(), device="cpu:0").sink("o", sf.collect())
    with pytest.raises(sf.StageError):
        await flow.run()
    assert threads == {"streamflow-cpu:0"}
    assert torn_down == ["cpu:0"]


async def test_envelope_gives_the_message() -> None:
    out: list[Any] = []
    source = sf.testing.MemorySource(["a", "b"])
    flow = sf.Flow("f")
    flow.source("s", source).map("meta", lambda m: (m.value, m.meta["offset"]), envelope=True).sink(
        "o", sf.collect(out)
    )
    await flow.run()
    assert out == [("a", 0), ("b", 1)]


async def test_a_flow_runs_again() -> None:
    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("n", range(3)).sink("o", sf.collect(out))
    await flow.run()
    await flow.run()
    assert out == [0, 1, 2, 0, 1, 2]


async def test_describe_text_and_mermaid() -> None:
    flow = sf.Flow("demo")
    nums = flow.source("numbers", range(3))
    nums.map("double", lambda x: 2 * x, device="cpu:1").sink("out", sf.collect())
    nums.sink("raw", sf.collect())
    d = flow.describe()
    text = str(d)
    assert text.splitlines()[0] == "flow 'demo'"
    assert "double" in text and "device=cpu:1" in text and "-> double, raw" in text
    assert d.mermaid.startswith("flowchart LR")
    assert "n0 --> n1" in d.mermaid and "n0 --> n3" in d.mermaid
