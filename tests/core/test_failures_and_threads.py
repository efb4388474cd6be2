"""Two stages failing at once are both reported; no thread of a flow outlives run()."""

from __future__ import annotations

import threading

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


async def test_two_stages_failing_at_the_same_moment_are_both_reported() -> None:
    both = threading.Barrier(2)

    def fail(name: str) -> object:
        def fn(item: int) -> int:
            both.wait(timeout=5)  # the two workers raise together
            raise ValueError(f"{name} broke on {item}")

        return fn

    flow = sf.Flow("twice")
    items = flow.source("items", [1])
    items.map("left", fail("left"), device="cpu:0").sink("l", sf.collect())
    items.map("right", fail("right"), device="cpu:1").sink("r", sf.collect())
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    error = info.value
    stages = {error.stage, *(other.stage for other in error.also)}
    assert stages == {"left", "right"}
    assert len(error.also) == 1
    assert f"also failed: stage {error.also[0].stage!r}" in "\n".join(error.__notes__)


def _streamflow_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t is not threading.current_thread()}


async def test_the_shared_cpu_device_leaves_no_thread_behind() -> None:
    before = _streamflow_threads()
    seen: set[str] = set()

    def work(x: int) -> int:
        seen.add(threading.current_thread().name)
        return x * 2

    out: list[int] = []
    flow = sf.Flow("pool")
    flow.source("n", range(200)).map("double", work, device="cpu", concurrency=4).sink(
        "out", sf.collect(out)
    )
    await flow.run()
    assert out == [2 * i for i in range(200)]
    assert seen and all(name.startswith("streamflow-cpu/double") for name in seen)
    assert 1 <= len(seen) <= 4
    assert _streamflow_threads() == before  # every worker thread was joined
