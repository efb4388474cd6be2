"""Bad graphs fail when they are built (or at the latest when started), naming the problem."""

from collections.abc import AsyncIterator

import pytest

import streamflow as sf


def test_duplicate_names() -> None:
    flow = sf.Flow("f")
    s = flow.source("a", range(3))
    with pytest.raises(sf.GraphError, match="already has a stage named 'a'"):
        s.map("a", abs)


@pytest.mark.asyncio
async def test_stream_without_consumer() -> None:
    flow = sf.Flow("f")
    flow.source("a", range(3)).map("dangling", abs)
    with pytest.raises(sf.GraphError, match="'dangling' .* has no consumer"):
        await flow.run()


def test_cycle_through_merge_is_rejected() -> None:
    flow = sf.Flow("f")
    loop = sf.merge("loop", flow.source("a", range(3)))
    back = loop.map("inc", lambda x: x + 1)
    with pytest.raises(sf.GraphError, match="cycle: loop -> inc -> loop"):
        loop.add(back)


@pytest.mark.parametrize("fn", [42, "upper", None])
def test_not_callable(fn: object) -> None:
    flow = sf.Flow("f")
    with pytest.raises(sf.GraphError, match="'m'.*not callable"):
        flow.source("a", range(3)).map("m", fn)  # type: ignore[arg-type]


def test_stage_class_instead_of_instance() -> None:
    class S(sf.Stage[int, int]):
        def process(self, item: int) -> int:
            return item

    flow = sf.Flow("f")
    with pytest.raises(sf.GraphError, match=r"pass an instance: S\(\)"):
        flow.source("a", range(3)).map("m", S)  # type: ignore[arg-type]


def test_bad_options() -> None:
    flow = sf.Flow("f")
    s = flow.source("a", range(3))
    with pytest.raises(sf.GraphError, match="capacity"):
        s.map("m1", abs, capacity=0)
    with pytest.raises(sf.GraphError, match="overflow"):
        s.map("m2", abs, overflow="spill")  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="bad device 'gpu'"):
        s.map("m3", abs, device="gpu")
    with pytest.raises(sf.GraphError, match="concurrency"):
        s.map("m4", abs, concurrency=0)
    with pytest.raises(sf.GraphError, match="errors must be"):
        s.map("m5", abs, errors="ignore")  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="max_size"):
        s.batch("b", 0, 1.0)
    with pytest.raises(sf.GraphError, match="sink must be callable"):
        s.sink("k", object())  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="expected an async iterable"):
        flow.source("bad", 42)  # type: ignore[arg-type]

    async def readings() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(sf.GraphError, match=r"call it: readings\(\.\.\.\) gives the iterable"):
        flow.source("uncalled", readings)  # type: ignore[arg-type]


def test_async_function_pinned_to_a_worker_is_rejected() -> None:
    async def f(x: int) -> int:
        return x

    flow = sf.Flow("f")
    with pytest.raises(sf.GraphError, match="is async and would run on the event loop"):
        flow.source("a", range(3)).map("m", f, device="cpu:0")


def test_merge_of_streams_from_two_flows() -> None:
    a = sf.Flow("a").source("x", range(1))
    b = sf.Flow("b").source("y", range(1))
    with pytest.raises(sf.GraphError, match="same flow"):
        sf.merge("m", a, b)


@pytest.mark.asyncio
async def test_flow_without_source() -> None:
    with pytest.raises(sf.GraphError, match="no source"):
        await sf.Flow("empty").run()


@pytest.mark.parametrize(
    "sink",
    [list.append, lambda: None, lambda a, b: None, 42],
    ids=["unbound-method", "no-argument", "two-arguments", "not-callable"],
)
def test_a_dead_letter_sink_that_cannot_take_an_item_fails_at_build(sink: object) -> None:
    flow = sf.Flow("f")
    with pytest.raises(sf.GraphError, match="stage 'm'.*dead-letter sink"):
        flow.source("a", range(3)).map("m", abs, errors=sf.DeadLetter(sink))


@pytest.mark.asyncio
async def test_a_plain_function_is_a_dead_letter_sink() -> None:
    failures: list[sf.FailedItem] = []
    out: list[int] = []
    flow = sf.Flow("f")
    flow.source("a", [1, 0, 2]).map(
        "inv", lambda x: 1 // x, errors=sf.DeadLetter(failures.append)
    ).sink("out", sf.collect(out))
    await flow.run()
    assert out == [1, 0] and [f.item for f in failures] == [0]
