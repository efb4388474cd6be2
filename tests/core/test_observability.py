"""Metrics while running and after, and the structlog events a flow emits."""

import asyncio
import json
import time

import pytest
import structlog
from structlog.testing import capture_logs

import streamflow as sf
from streamflow.testing import MemorySink, MemorySource

pytestmark = pytest.mark.asyncio


async def test_metrics_while_running_and_after() -> None:
    def work(x: int) -> int:
        return sum(range(2000)) * 0 + x  # a little CPU on the loop

    sink = MemorySink(delay=0.005)
    flow = sf.Flow("f")
    flow.source("s", MemorySource(range(10), forever=True)).map("work", work).sink(
        "o", sink, capacity=4
    )
    async with flow.start() as running:
        await asyncio.sleep(0.1)
        live = running.metrics()
        await running.stop()
    assert set(live) == {"s", "work", "o"}
    assert live["o"].queue_depth >= 3  # the slow sink is the bottleneck: its channel is full
    assert live["o"].busy > 0.5
    after = flow.metrics()
    work_m = after["work"]
    assert work_m.items_in == work_m.items_out == after["o"].items_out == after["s"].items_out
    assert work_m.latency_p50_s is not None and work_m.latency_p99_s is not None
    assert 0 < work_m.latency_p50_s <= work_m.latency_p99_s
    assert after["o"].end_to_end_p50_s is not None and after["o"].end_to_end_p50_s > 0.005
    assert after["s"].outcomes == {"delivered": after["s"].items_out}
    assert after["work"].errors == after["work"].dropped == 0


async def test_start_stop_and_error_events() -> None:
    flow = sf.Flow("logged")
    flow.source("s", range(3)).map("boom", lambda x: 1 // (x - 1)).sink("o", sf.collect())
    with capture_logs() as logs, pytest.raises(sf.StageError):
        await flow.run()
    events = [e["event"] for e in logs]
    assert events == ["flow.start", "stage.error", "flow.stop"]
    start, error, stop = logs
    assert start["stages"] == ["s", "boom", "o"]
    assert (error["stage"], error["item"], error["policy"]) == ("boom", "1", "fail")
    assert "ZeroDivisionError" in error["error"]
    assert stop["reason"] == "failed" and stop["flow"] == "logged"


async def test_json_logging(capsys: pytest.CaptureFixture[str]) -> None:
    sf.configure_logging(json=True)
    try:
        flow = sf.Flow("j")
        flow.source("s", range(2)).sink("o", sf.collect())
        await flow.run()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["flow.start", "flow.stop"]
    assert lines[1]["delivered"] == {"o": 2} and lines[1]["level"] == "info"


async def test_latency_quantiles_are_recent_and_buckets_whole_run() -> None:
    """p50/p99 are over the last 2048 samples; the histogram counts every item of the run."""
    slow = 100

    def work(x: int) -> int:
        if x < slow:  # the first items each take 300 us
            end = time.perf_counter() + 0.0003
            while time.perf_counter() < end:
                pass
        return x

    flow = sf.Flow("ring")
    n = slow + 2100  # the slow samples have left the ring of the last 2048
    flow.source("s", range(n)).map("work", work, capacity=1).sink("o", sf.collect(), capacity=1)
    await flow.run()
    m = flow.metrics()["work"]
    assert m.items_in == n
    buckets = dict(m.latency_buckets)
    assert buckets[float("inf")] == n  # every item, in one bucket or another
    assert n - buckets[0.00025] >= slow  # the slow items are still counted
    assert m.latency_p99_s is not None and m.latency_p99_s < 0.00025  # but not in the ring
