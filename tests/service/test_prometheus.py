"""Prometheus metrics of a running flow: scraped over real HTTP, parsed with prometheus-client's
own parser."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import streamflow as sf
from streamflow.testing import MemorySink

pytestmark = pytest.mark.asyncio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def odd_fails(x: int) -> int:
    if x % 10 == 3:
        raise ValueError(f"no {x}")
    return x


async def slow(x: int) -> int:
    await asyncio.sleep(0.0002)
    return x


async def test_scrape_over_http_gives_counters_gauges_and_histograms() -> None:
    out = MemorySink[int]()
    flow = sf.Flow("metrics")
    (
        flow.source("numbers", sf.iterate(range(500)))
        .map("check", odd_fails, errors="skip", capacity=8)
        .map("slow", slow, capacity=4)
        .sink("out", out)
    )
    async with flow.start() as running, sf.serve_metrics(running) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        during = await scrape(server.url)  # while it runs: the families are all there
        assert value(during, "streamflow_stage_queue_capacity", flow="metrics", stage="slow") == 4
        assert value(during, "streamflow_flow_state", flow="metrics", state="running") == 1
        await running.wait()
        after = await scrape(server.url)
    labels: dict[str, Any] = {"flow": "metrics"}
    assert value(after, "streamflow_stage_items_out_total", **labels, stage="numbers") == 500
    assert value(after, "streamflow_stage_items_in_total", **labels, stage="check") == 500
    assert value(after, "streamflow_stage_errors_total", **labels, stage="check") == 50
    assert value(after, "streamflow_stage_skipped_total", **labels, stage="check") == 50
    assert value(after, "streamflow_stage_items_out_total", **labels, stage="out") == 450
    assert value(after, "streamflow_stage_dropped_total", **labels, stage="out") == 0
    assert value(after, "streamflow_stage_queue_depth", **labels, stage="out") == 0
    assert 0 <= value(after, "streamflow_stage_busy_ratio", **labels, stage="slow") <= 1
    assert value(after, "streamflow_source_acks_total", **labels, stage="numbers", outcome="delivered") == 450  # fmt: skip
    assert value(after, "streamflow_source_acks_total", **labels, stage="numbers", outcome="skipped") == 50  # fmt: skip
    assert value(after, "streamflow_source_length", **labels, stage="numbers") == 500
    assert value(after, "streamflow_stage_info", **labels, stage="slow", kind="map", device="") == 1
    assert value(after, "streamflow_flow_state", **labels, state="stopped") == 1
    # histograms: cumulative buckets from 100 us to 10 s, +Inf equals the count
    stage = {**labels, "stage": "slow"}
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in after.items()
        if k[0] == "streamflow_stage_latency_seconds_bucket" and dict(k[1])["stage"] == "slow"
    )
    bounds = [b for b, _ in buckets]
    assert bounds[0] == 0.0001 and bounds[-2] == 10.0 and bounds[-1] == float("inf")
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == 450
    assert value(after, "streamflow_stage_latency_seconds_count", **stage) == 450
    assert value(after, "streamflow_stage_latency_seconds_sum", **stage) > 0
    e2e = {**labels, "stage": "out"}
    assert value(after, "streamflow_end_to_end_latency_seconds_count", **e2e) == 450
    assert value(after, "streamflow_end_to_end_latency_seconds_bucket", **e2e, le="10.0") == 450
    assert value(after, "streamflow_end_to_end_latency_seconds_sum", **e2e) > 0


async def test_the_collector_joins_an_apps_own_registry() -> None:
    registry = CollectorRegistry()
    requests = Counter("app_requests", "The app's own counter.", registry=registry)
    requests.inc(3)
    flow = sf.Flow("joined")
    flow.source("numbers", sf.iterate(range(10))).sink("out", MemorySink[int]())
    async with flow.start() as running:
        registry.register(sf.FlowCollector(running))
        await running.wait()
        own = parse(generate_latest(registry).decode())
        async with sf.serve_metrics(running, registry=CollectorRegistry()) as server:
            served = await scrape(server.url)
        # a scrape from another thread (a WSGI server) is answered by the flow's loop
        threaded = parse((await asyncio.to_thread(generate_latest, registry)).decode())
    assert value(own, "app_requests_total") == 3
    assert value(own, "streamflow_stage_items_out_total", flow="joined", stage="out") == 10
    assert threaded == own
    assert value(served, "streamflow_stage_items_out_total", flow="joined", stage="out") == 10


async def test_two_flows_in_one_collector_are_told_apart_by_label() -> None:
    flows = [sf.Flow(name) for name in ("a", "b")]
    for n, flow in enumerate(flows, start=1):
        flow.source("numbers", sf.iterate(range(10 * n))).sink("out", MemorySink[int]())
    async with flows[0].start() as a, flows[1].start() as b:
        await a.wait()
        await b.wait()
        registry = CollectorRegistry()
        registry.register(sf.FlowCollector(a, b))
        samples = parse(generate_latest(registry).decode())
    assert value(samples, "streamflow_stage_items_out_total", flow="a", stage="out") == 10
    assert value(samples, "streamflow_stage_items_out_total", flow="b", stage="out") == 20


async def test_a_failed_flow_says_so_and_other_paths_are_404() -> None:
    def boom(x: int) -> int:
        raise RuntimeError("boom")

    flow = sf.Flow("failing")
    flow.source("numbers", sf.iterate(range(3))).map("boom", boom).sink("out", MemorySink[int]())
    running = flow.start()
    with pytest.raises(sf.StageError):
        async with running:
            await running.wait()
    async with sf.serve_metrics(running) as server, httpx.AsyncClient() as client:
        missing = await client.get(f"http://127.0.0.1:{server.port}/nothing")
        samples = await scrape(server.url)
    assert missing.status_code == 404
    assert value(samples, "streamflow_flow_state", flow="failing", state="failed") == 1
    assert value(samples, "streamflow_flow_state", flow="failing", state="running") == 0
    assert value(samples, "streamflow_stage_errors_total", flow="failing", stage="boom") == 1


async def test_trainer_loss_and_prequential_accuracy_are_gauges() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    trainer = sf.OnlineTrainer(
        model,
        ["cpu:0"],
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        partition=[3],
    )
    xs = torch.randn(64, 4)
    pairs = [(x[None], (x[:1] > 0).long()) for x in xs]
    flow = sf.Flow("learning")
    flow.source("pairs", sf.iterate(pairs)).map("learn", trainer).sink("out", MemorySink[Any]())
    async with flow.start() as running:
        await running.wait()
        registry = CollectorRegistry()
        registry.register(sf.FlowCollector(running))
        samples = parse(generate_latest(registry).decode())
    stage = {"flow": "learning", "stage": "learn"}
    expected = trainer.metrics()
    assert value(samples, "streamflow_trainer_loss", **stage) == pytest.approx(expected.loss)
    assert value(samples, "streamflow_trainer_accuracy", **stage) == pytest.approx(
        expected.accuracy
    )
    assert 0 <= value(samples, "streamflow_trainer_recent_accuracy", **stage) <= 1
    assert value(samples, "streamflow_trainer_samples_total", **stage) == 64
    assert value(samples, "streamflow_trainer_updates_total", **stage, part="0") == 64
    part = {"flow": "learning", "stage": "learn[0]"}  # the trainer's part, as a stage
    assert value(samples, "streamflow_stage_latency_seconds_count", **part) > 0


async def test_keyed_stages_report_what_they_hold() -> None:
    """Open windows and keys of a window stage, and late items, are gauges by ``what``."""
    source: sf.Channel[tuple[str, float]] = sf.Channel(16)
    flow = sf.Flow("held")
    flow.source("readings", source).key_by("by", lambda r: r[0]).window(
        "w", sf.Tumbling(10.0), time=lambda r: r[1]
    ).sink("out", MemorySink[Any]())
    async with flow.start() as running:
        for reading in [("a", 1.0), ("b", 2.0), ("a", 3.0), ("c", 15.0), ("a", 4.0)]:
            await source.send(reading)
        await asyncio.sleep(0.05)
        async with sf.serve_metrics(running) as server:
            samples = await scrape(server.url)
        source.close()
        await running.wait()
    held = {
        w: value(samples, "streamflow_stage_state", flow="held", stage="w", what=w)
        for w in ("keys", "windows_open", "items_held", "late")
    }
    assert held == {"keys": 1, "windows_open": 1, "items_held": 1, "late": 1}


async def test_checkpoints_report_count_size_pause_and_write_time(tmp_path: Any) -> None:
    source: sf.Channel[int] = sf.Channel(16)
    flow = sf.Flow("ckpt", checkpoints=sf.Checkpoints(tmp_path, every=0.02))
    flow.source("numbers", source).key_by("by", lambda x: x % 3).stateful_map(
        "sum", lambda s, x: ((s or 0) + x, x)
    ).sink("out", MemorySink[Any]())
    async with flow.start() as running:
        for i in range(20):
            await source.send(i)
        await asyncio.sleep(0.1)
        async with sf.serve_metrics(running) as server:
            samples = await scrape(server.url)
        source.close()
        await running.wait()
    assert value(samples, "streamflow_checkpoints_total", flow="ckpt") >= 2
    assert value(samples, "streamflow_checkpoints_skipped_total", flow="ckpt") == 0
    assert value(samples, "streamflow_checkpoints_failed_total", flow="ckpt") == 0
    assert value(samples, "streamflow_checkpoint_bytes", flow="ckpt") > 0
    assert 0 < value(samples, "streamflow_checkpoint_pause_seconds", flow="ckpt") < 1
    assert 0 < value(samples, "streamflow_checkpoint_write_seconds", flow="ckpt") < 1
