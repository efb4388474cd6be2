"""examples/fastapi_app against a real uvicorn server on a free loopback port, with httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from examples.fastapi_app.app import FEATURES, create_app, make_model

pytestmark = pytest.mark.asyncio


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[tuple[httpx.AsyncClient, uvicorn.Server]]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port) and hand out a client for it.
    Leaving the block shuts the server down gracefully (lifespan shutdown included)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", ws="none", http="h11", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.01)
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10
        ) as client:
            yield client, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


def features(i: int) -> list[float]:
    return torch.randn(FEATURES, generator=torch.Generator().manual_seed(i)).tolist()


async def test_concurrent_requests_are_batched_and_answered_correctly() -> None:
    model = make_model()
    async with serving(create_app(model)) as (client, _):
        answers = await asyncio.gather(
            *(client.post("/predict", json={"features": features(i)}) for i in range(100))
        )
        scrape = (await client.get("/metrics")).text
    assert [a.status_code for a in answers] == [200] * 100
    bodies = [a.json() for a in answers]
    assert max(b["batch_size"] for b in bodies) > 1
    assert len({b["id"] for b in bodies}) == 100
    with torch.inference_mode():
        for i, body in enumerate(bodies):
            expected = model(torch.tensor(features(i)))
            assert torch.allclose(torch.tensor(body["scores"]), expected, atol=1e-5)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
    }
    batch = (("flow", "predict"), ("stage", "batch"))
    took = samples[("streamflow_stage_items_in_total", batch)]
    made = samples[("streamflow_stage_items_out_total", batch)]
    assert took == 100 and made < 100  # the flow's metrics, in the app's own /metrics
    assert samples[("app_predictions_total", (("status", "200"),))] == 100


async def test_a_bad_input_fails_only_its_own_request() -> None:
    async with serving(create_app(max_wait=0.05)) as (client, _):
        bodies: list[dict[str, Any]] = [{"features": features(i)} for i in range(20)]
        bodies[7] = {"features": [1.0, 2.0, 3.0]}
        answers = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))
        not_numbers = await client.post("/predict", json={"features": ["a"]})
        health = await client.get("/healthz")
    statuses = [a.status_code for a in answers]
    assert statuses == [200] * 7 + [422] + [200] * 12
    assert answers[7].json() == {"error": f"expected {FEATURES} features, got 3"}
    assert max(a.json()["batch_size"] for i, a in enumerate(answers) if i != 7) > 1
    assert not_numbers.status_code == 422  # FastAPI's own validation
    assert health.status_code == 200 and health.json() == {"state": "running", "error": None}


class Breaks(torch.nn.Module):
    """A model that, once told to, raises: the flow fails (the model stage fails the flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()
        self.entered = threading.Event()
        self.go = threading.Event()
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broken:
            self.entered.set()
            self.go.wait(10)
            raise RuntimeError("the model broke")
        return self.inner(x)


async def test_a_flow_failure_fails_pending_requests_at_once_and_healthz_turns_503() -> None:
    model = Breaks()
    async with serving(create_app(model, max_batch=4)) as (client, _):
        ok = await client.post("/predict", json={"features": features(0)})
        assert ok.status_code == 200
        model.broken = True
        pending = [
            asyncio.create_task(client.post("/predict", json={"features": features(i)}))
            for i in range(30)
        ]
        while not model.entered.is_set():  # one batch is in the model, the rest wait
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in pending)
        broke_at = time.perf_counter()
        model.go.set()
        answers = await asyncio.gather(*pending)
        failed_within = time.perf_counter() - broke_at
        health = await client.get("/healthz")
        later = await client.post("/predict", json={"features": features(1)})
        events = await client.get("/events")  # no event stream from a failed flow
    assert [a.status_code for a in answers] == [503] * 30
    assert "the model broke" in answers[0].json()["error"]
    assert failed_within < 0.5, failed_within  # HTTP included; the runtime's part is < 100 ms
    assert health.status_code == 503
    assert health.json()["state"] == "failed" and "the model broke" in health.json()["error"]
    assert later.status_code == 503
    assert events.status_code == 503


class Slow(torch.nn.Module):
    """Takes ``seconds`` per batch, so requests are in flight when the server shuts down."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.inner = make_model()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.inner(x)


async def test_shutdown_drains_requests_in_flight() -> None:
    app = create_app(Slow(0.05), max_batch=4)
    async with serving(app) as (client, server):
        pending = [
            asyncio.create_task(client.post("/predict", json={"features": features(i)}))
            for i in range(24)
        ]
        await asyncio.sleep(0.1)  # some are answered, most still inside the flow
        assert not all(task.done() for task in pending)
        server.should_exit = True  # what SIGTERM does to uvicorn
        answers = await asyncio.gather(*pending)
    assert [a.status_code for a in answers] == [200] * 24
    running = app.state.predictor.running
    assert running.state == "stopped" and running.error is None
    assert running.metrics()["reply"].items_out == 24


async def test_events_stream_every_answer() -> None:
    app = create_app()
    async with serving(app) as (client, _):
        seen: list[dict[str, Any]] = []

        async def listen() -> None:
            async with client.stream("GET", "/events", params={"limit": 5}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                seen.extend(
                    [
                        json.loads(line[len("data: ") :])
                        async for line in response.aiter_lines()
                        if line.startswith("data: ")
                    ]
                )

        listener = asyncio.create_task(listen())
        while not app.state.predictor.subscribers:
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(
            *(client.post("/predict", json={"features": features(i)}) for i in range(5))
        )
        await asyncio.wait_for(listener, 5)
    assert sorted(e["id"] for e in seen) == sorted(a.json()["id"] for a in answers)
    assert all(len(e["scores"]) == 3 for e in seen)
