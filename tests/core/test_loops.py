"""Which loop strategy each kind of stage gets: chosen once, when the flow is built, and
shown by ``flow.describe()``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import streamflow as sf
import streamflow.testing


def plain(x: Any) -> Any:
    return x


async def coro(x: Any) -> Any:
    return x


async def agen(x: Any) -> Any:
    yield x


def future(x: Any) -> asyncio.Future[Any]:
    f: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    f.set_result(x)
    return f


class Plain(sf.Stage[Any, Any]):
    def process(self, item: Any) -> Any:
        return item


class Async(sf.Stage[Any, Any]):
    async def process(self, item: Any) -> Any:
        return item


class SendSink:
    async def send(self, item: Any) -> None:
        pass


# (kind, function, options) -> loop
TABLE: list[tuple[str, Any, dict[str, Any], str]] = [
    ("map", plain, {}, "inline"),
    ("map", coro, {}, "inline"),
    ("map", Plain(), {}, "inline"),
    ("map", Async(), {"device": "cpu:0"}, "inline"),
    ("map", plain, {"envelope": True}, "inline"),
    ("map", plain, {"device": "cpu:0"}, "worker"),
    ("map", plain, {"device": "cpu"}, "worker"),
    ("map", Plain(), {"device": "cpu:1"}, "worker"),
    ("map", coro, {"device": "cpu"}, "inline"),
    ("map", future, {"concurrency": 4}, "window"),
    ("map", plain, {"concurrency": 4, "ordered": False}, "tasks"),
    ("map", coro, {"concurrency": 4}, "tasks"),
    ("map", plain, {"concurrency": 4, "device": "cpu"}, "tasks"),
    ("map", plain, {"concurrency": 4, "envelope": True}, "tasks"),
    ("filter", plain, {}, "inline"),
    ("filter", plain, {"device": "cpu:0"}, "worker"),
    ("filter", plain, {"concurrency": 2}, "tasks"),
    ("flat_map", plain, {}, "inline"),
    ("flat_map", agen, {}, "inline"),
    ("flat_map", plain, {"device": "cpu:0"}, "worker"),
    ("sink", plain, {}, "inline"),
    ("sink", coro, {}, "inline"),
    ("sink", SendSink(), {}, "inline"),
    ("sink", plain, {"device": "cpu:0"}, "worker"),
    ("sink", coro, {"concurrency": 8}, "tasks"),
    ("key_by", plain, {}, "inline"),
    ("key_by", plain, {"device": "cpu:0"}, "worker"),
]


@pytest.mark.parametrize(("kind", "fn", "options", "loop"), TABLE)
def test_each_kind_of_stage_gets_its_loop(
    kind: str, fn: Any, options: dict[str, Any], loop: str
) -> None:
    flow = sf.Flow("loops")
    stream = flow.source("s", range(3))
    if kind == "sink":
        stream.sink("stage", fn, **options)
    else:
        getattr(stream, kind)("stage", fn, **options).sink("o", sf.collect())
    assert flow.spec()["stage"].loop == loop
    assert loop in sf.LOOPS
    line = next(x for x in str(flow.describe()).splitlines() if x.strip().startswith("stage "))
    assert f"loop={loop}" in line


def test_structural_stages_have_their_own_loops() -> None:
    flow = sf.Flow("loops")
    joined = sf.merge("m", flow.source("a", range(3)), flow.source("a2", range(3)))
    joined.batch("b", 2, 0.1).unbatch("u").sink("o", sf.collect())
    assert {s.name: s.loop for s in flow.spec().stages} == {
        "a": "source",
        "a2": "source",
        "m": "junction",
        "b": "batch",
        "u": "unbatch",
        "o": "inline",
    }
    keyed = flow.source("k", range(3)).key_by("key", lambda i: i)
    keyed.window("w", sf.Tumbling(1.0)).sink("o2", sf.collect())
    keyed.stateful_map("state", lambda s, i: (s, i)).sink("o3", sf.collect())
    spec = flow.spec()
    assert (spec["w"].loop, spec["state"].loop) == ("windows", "inline")
    assert spec["w"].keyed and spec["state"].keyed and not spec["key"].keyed
    alone = sf.Flow("fused")
    alone.source("k", range(3)).key_by("key", lambda i: i).window("w", sf.Tumbling(1.0)).sink(
        "o", sf.collect()
    )
    assert alone.spec()["key"].loop == "fused"  # a key_by that alone feeds a window: no hop
    assert "loop=fused" in str(alone.describe())


@pytest.mark.asyncio
async def test_a_fused_key_by_keeps_its_metrics_and_names_itself_when_its_key_fails() -> None:
    def key(x: int) -> int:
        if x == 7:
            raise KeyError("no key for 7")
        return x % 3

    ok = sf.Flow("fused-ok")
    ok.source("s", range(6)).key_by("key", lambda x: x % 3).window(
        "w", sf.Count(2), time=float
    ).sink("o", sf.collect())
    await ok.run()
    m = ok.metrics()["key"]
    assert (m.items_in, m.items_out) == (6, 6) and ok.metrics()["w"].items_in == 6
    bad = sf.Flow("fused-bad")
    bad.source("s", range(10)).key_by("key", key).window("w", sf.Count(2)).sink("o", sf.collect())
    with pytest.raises(sf.StageError, match="stage 'key'.*no key for 7"):
        await bad.run()


@pytest.mark.asyncio
async def test_an_item_that_waits_never_holds_back_the_items_before_it() -> None:
    """Items move in runs, but when the function really waits on one item, the items of
    the run finished before it reach the sink meanwhile."""
    release = asyncio.Event()
    out: list[int] = []

    async def slow_at_40(x: int) -> int:
        if x == 40:
            await release.wait()
        return x

    flow = sf.Flow("runs")
    flow.source("n", range(60)).map("slow", slow_at_40, capacity=64).sink(
        "out", sf.collect(out), capacity=64
    )
    async with flow.start() as running:
        for _ in range(200):
            if len(out) == 40:
                break
            await asyncio.sleep(0.005)
        assert out == list(range(40))  # 0..39 went on while 40 waits
        release.set()
        await running.wait()
    assert out == list(range(60))


@pytest.mark.asyncio
async def test_a_slow_stage_holds_its_run_inside_its_capacity() -> None:
    """The run a stage has taken still counts against its inbox: a stage busy with a run
    of 4 (capacity 4) lets its sender put nothing more until it comes back for more."""
    source = sf.testing.MemorySource(range(100))
    gate = asyncio.Event()

    async def wait_first(x: int) -> int:
        await gate.wait()
        return x

    flow = sf.Flow("held")
    flow.source("s", source).map("w", wait_first, capacity=4).sink("o", sf.collect())
    async with flow.start() as running:
        await asyncio.sleep(0.05)
        m = running.metrics()["w"]
        assert m.queue_depth == 4 and source.taken <= 4 + 1  # the run in hand, one in the send
        gate.set()
        await running.wait()


class RunSink:
    """A sink that takes runs: records each call's size and the most items in flight."""

    def __init__(self, bad: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[int] = []
        self.got: list[int] = []
        self.inflight = 0
        self.most = 0
        self.bad = bad

    async def send(self, item: int) -> None:  # what a Retry calls, for one item
        self.got.append(item)

    async def send_run(self, items: list[int]) -> list[BaseException | None]:
        self.calls.append(len(items))
        self.inflight += len(items)
        self.most = max(self.most, self.inflight)
        await asyncio.sleep(0.002)
        self.inflight -= len(items)
        out: list[BaseException | None] = []
        for i in items:
            if i in self.bad:
                out.append(ValueError(f"bad {i}"))
            else:
                self.got.append(i)
                out.append(None)
        return out


@pytest.mark.asyncio
async def test_a_sink_that_takes_runs_gets_runs_with_bounded_items_in_flight() -> None:
    sink = RunSink(bad={7, 300})
    acked: dict[int, sf.Outcome] = {}
    items = [sf.Message(i, on_ack=lambda o, i=i: acked.__setitem__(i, o)) for i in range(500)]
    flow = sf.Flow("runs")
    flow.source("s", items).sink("out", sink, concurrency=64, errors="skip")
    assert flow.spec()["out"].loop == "runs"
    await flow.run()
    assert sorted(sink.got) == [i for i in range(500) if i not in (7, 300)]
    assert sink.most <= 64 and max(sink.calls) > 1  # runs, several in flight, bounded
    assert len(sink.calls) < 500 / 4
    assert acked[7] == sf.Outcome.SKIPPED and acked[300] == sf.Outcome.SKIPPED
    assert sum(o == sf.Outcome.DELIVERED for o in acked.values()) == 498
    assert flow.metrics()["out"].items_in == 500
