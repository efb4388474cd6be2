"""A composite (an ``sf.Composite``: an object with ``add_stages``) adds its own stages."""

from __future__ import annotations

from typing import Any

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


class AddThenDouble:
    """Not a function, not a Stage: two stages of its own, typed as Stream.map accepts."""

    def add_stages(
        self,
        stream: sf.Stream[Any],
        name: str,
        *,
        capacity: int,
        overflow: sf.Overflow,
        errors: sf.ErrorPolicy,
    ) -> sf.Stream[Any]:
        added = stream.map(f"{name}[0]", lambda x: x + 1, capacity=capacity, errors=errors)
        return added.map(f"{name}[1]", lambda x: 2 * x, capacity=capacity, overflow=overflow)


async def test_map_accepts_a_composite_and_runs_its_stages() -> None:
    out: list[int] = []
    flow = sf.Flow("composite")
    flow.source("numbers", range(5)).map("both", AddThenDouble()).sink("out", sf.collect(out))
    await flow.run()
    assert out == [2 * (x + 1) for x in range(5)]
    assert {"both[0]", "both[1]"} <= set(flow.metrics())


@pytest.mark.parametrize(
    "option",
    [{"device": "cpu:0"}, {"concurrency": 4}, {"ordered": False}, {"envelope": True}],
    ids=lambda o: next(iter(o)),
)
async def test_a_composite_refuses_the_options_it_chooses_itself(option: dict[str, Any]) -> None:
    assert isinstance(AddThenDouble(), sf.Composite)
    flow = sf.Flow("composite")
    with pytest.raises(sf.GraphError, match=f"chooses {next(iter(option))} itself"):
        flow.source("numbers", range(5)).map("both", AddThenDouble(), **option)
