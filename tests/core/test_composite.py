"""A composite (an object with ``__streamflow_expand__``) adds its own stages to a flow."""

from __future__ import annotations

from typing import Any

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


class AddThenDouble:
    """Not a function, not a Stage: two stages of its own, typed as Stream.map accepts."""

    def __streamflow_expand__(
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
