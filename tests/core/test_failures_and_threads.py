"""Two stages failing at once are both reported; no thread of a flow outlives run()."""

from __future__ import annotations

import threading
import time

import pytest

import streamflow as sf

pytestmark = pytest.mark.asyncio


async def test_two_stages_failing_at_the_same_moment_are_both_reported() -> None:
    """Two worker threads raise while the event loop is busy elsewhere, so both failures
    are there when the loop looks: the flow raises one and attaches the other."""
    together = threading.Barrier(3)

    def fail(name: str) -> object:
        def fn(item: int) -> int:
            together.wait(timeout=5)
            raise ValueError(f"{name} broke on {item}")

        return fn

    def busy(item: int) -> int:  # on the loop: holds it while both workers raise
        together.wait(timeout=5)
        time.sleep(0.1)
        return item

    flow = sf.Flow("twice")
    items = flow.source("items", [1])
    items.map("left", fail("left"), device="cpu:0").sink("l", sf.collect())
    items.map("right", fail("right"), device="cpu:1").sink("r", sf.collect())
    items.map("busy", busy).sink("b", sf.collect())
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
