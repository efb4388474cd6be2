"""Which loop strategy each kind of stage gets: chosen once, when the flow is built, and
shown by ``flow.describe()``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import streamflow as sf


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
