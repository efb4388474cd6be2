"""Keyed streams: keys on messages, per-key order under concurrency, stateful_map with
its state per key, forgetting keys, ttl eviction, and errors that change no state."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

import streamflow as sf


@pytest.mark.asyncio
async def test_key_by_sets_the_key_and_keeps_the_value_through_later_stages() -> None:
    seen: list[tuple[Any, Any]] = []
    flow = sf.Flow("keys")
    keyed = flow.source("n", sf.iterate(range(6))).key_by("parity", lambda i: i % 2)
    assert isinstance(keyed, sf.KeyedStream)
    later = keyed.map("double", lambda i: i * 2).filter("some", lambda i: i != 4)
    assert isinstance(later, sf.KeyedStream)
    later.sink("out", lambda m: seen.append((m.key, m.value)), envelope=True)
    await flow.run()
    assert seen == [(0, 0), (1, 2), (1, 6), (0, 8), (1, 10)]
    assert not isinstance(flow.source("m", [1]).batch("b", 2, 0.1), sf.KeyedStream)


@pytest.mark.asyncio
async def test_concurrency_runs_keys_at_once_but_each_key_in_order() -> None:
    """Random delays, ordered=False, 8 at once: different keys overlap (the run takes far
    less than the sum of the delays), one key's items never overlap and finish in order."""
    rng = random.Random(7)
    delays = {i: rng.uniform(0, 0.01) for i in range(120)}
    running: dict[int, int] = {}
    overlap_same_key = 0
    finished: list[tuple[int, int]] = []

    async def work(i: int) -> int:
        nonlocal overlap_same_key
        key = i % 5
        if running.get(key):
            overlap_same_key += 1
        running[key] = running.get(key, 0) + 1
        await asyncio.sleep(delays[i])
        running[key] -= 1
        finished.append((key, i))
        return i

    out: list[tuple[int, int]] = []
    flow = sf.Flow("order")
    flow.source("n", sf.iterate(range(120))).key_by("k", lambda i: i % 5).map(
        "work", work, concurrency=8, ordered=False
    ).sink("out", lambda m: out.append((m.key, m.value)), envelope=True)
    t0 = asyncio.get_running_loop().time()
    await flow.run()
    took = asyncio.get_running_loop().time() - t0
    assert overlap_same_key == 0
    for key in range(5):
        mine = [i for k, i in out if k == key]
        assert mine == sorted(mine) and len(mine) == 24
        assert [i for k, i in finished if k == key] == mine
    assert took < sum(delays.values()) / 2  # keys ran at once


@pytest.mark.asyncio
async def test_stateful_map_keeps_state_per_key_and_none_forgets_the_key() -> None:
    def running_total(state: int | None, item: tuple[str, int]) -> tuple[int | None, Any]:
        total = (state or 0) + item[1]
        return (None if total >= 10 else total), (item[0], total)  # reset at 10

    items = [("a", 4), ("b", 1), ("a", 5), ("a", 3), ("b", 2), ("a", 1)]
    out: list[Any] = []
    flow = sf.Flow("totals")
    flow.source("s", items).key_by("k", lambda x: x[0]).stateful_map("total", running_total).sink(
        "out", out.append
    )
    await flow.run()
    assert out == [("a", 4), ("b", 1), ("a", 9), ("a", 12), ("b", 3), ("a", 1)]
    assert flow.metrics()["total"].state["keys"] == 2


@pytest.mark.asyncio
async def test_keys_that_appear_at_run_time_each_get_their_own_state() -> None:
    source: sf.Channel[str] = sf.Channel(8)
    out: list[tuple[str, int]] = []
    flow = sf.Flow("runtime-keys")
    flow.source("s", source).key_by("k", lambda x: x).stateful_map(
        "count", lambda n, x: ((n or 0) + 1, (x, (n or 0) + 1))
    ).sink("out", out.append)
    async with flow.start() as running:
        for name in ["x", "y", "x", "new", "y", "x"]:
            await source.send(name)
        source.close()
        await running.wait()
    assert out == [("x", 1), ("y", 1), ("x", 2), ("new", 1), ("y", 2), ("x", 3)]


@pytest.mark.asyncio
async def test_ttl_forgets_keys_left_idle() -> None:
    """Keys idle longer than ttl are forgotten: a key seen again after that starts over,
    and the metrics count what expired."""
    source: sf.Channel[str] = sf.Channel(1024)
    out: list[tuple[str, int]] = []
    flow = sf.Flow("ttl")
    flow.source("s", source).key_by("k", lambda x: x[0]).stateful_map(
        "count", lambda n, x: ((n or 0) + 1, (x, (n or 0) + 1)), ttl=0.05
    ).sink("out", out.append)
    async with flow.start() as running:
        await source.send("old")
        await asyncio.sleep(0.1)
        for i in range(300):  # enough calls for the stage to look for idle keys
            await source.send(f"n{i}")
        await source.send("old")
        source.close()
        await running.wait()
    assert out[0] == ("old", 1) and out[-1] == ("old", 1)  # forgotten in between
    metrics = flow.metrics()["count"].state
    assert metrics["expired"] >= 1


@pytest.mark.asyncio
async def test_a_raising_stateful_function_changes_no_state_and_follows_the_policy() -> None:
    def fragile(state: int | None, x: int) -> tuple[int, int]:
        if x < 0:
            raise ValueError("negative")
        return (state or 0) + x, (state or 0) + x

    out: list[int] = []
    flow = sf.Flow("fragile")
    flow.source("s", [1, -5, 2]).key_by("k", lambda x: "one").stateful_map(
        "sum", fragile, errors="skip"
    ).sink("out", out.append)
    await flow.run()
    assert out == [1, 3]
    assert flow.metrics()["sum"].skipped == 1


def test_stateful_map_options_are_checked_at_build() -> None:
    keyed = sf.Flow("bad").source("s", [1]).key_by("k", lambda x: x)

    async def not_plain(state: Any, x: Any) -> Any:
        return state, x

    with pytest.raises(sf.GraphError, match="plain function"):
        keyed.stateful_map("m", not_plain)
    with pytest.raises(sf.GraphError, match="ttl"):
        keyed.stateful_map("m", lambda s, x: (s, x), ttl=0)


def test_keyed_state_snapshot_and_restore() -> None:
    state: sf.KeyedState[int] = sf.KeyedState()
    state.set("a", 1)
    state.set("b", 2)
    state.delete("b")
    snap = state.snapshot()
    state.set("a", 5)
    other: sf.KeyedState[int] = sf.KeyedState()
    other.restore(snap)
    assert other.snapshot() == {"a": 1} and len(other) == 1 and "a" in other
