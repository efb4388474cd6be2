"""A FastAPI app that serves a torch model from a flow (see README.md beside this file).

Run: .venv/bin/python -m examples.fastapi_app.app [--port 8000]
(or: uvicorn examples.fastapi_app.app:app --timeout-graceful-shutdown 5)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import torch
import uvicorn
from anyio.abc import TaskStatus
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel

import streamflow as sf

FEATURES = 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
    ).eval()


@dataclass(slots=True)
class Request:
    """What travels through the flow: the input, and why it was rejected (if it was)."""

    id: int
    x: torch.Tensor
    problem: str | None = None


class Rejected(Exception):
    """The flow rejected this request's input (a 422)."""


class Unavailable(Exception):
    """The flow is not running, or stopped before answering (a 503)."""


class Predictor:
    """The flow behind the app. Requests are batched (up to ``max_batch``, or what came
    within ``max_wait`` s); ``check`` takes bad inputs out of their batch one by one
    (``sf.PartialFailure`` under ``errors="skip"``); the model runs once per batch on the
    ``cpu:0`` worker thread with the default ``errors="fail"``, so a model that raises fails
    the flow; ``unbatch`` gives each answer its request's envelope back; two sinks read the
    answers: ``reply`` resolves the request's future, ``events`` feeds the SSE clients."""

    def __init__(
        self, model: torch.nn.Module, *, max_batch: int = 32, max_wait: float = 0.005
    ) -> None:
        self.model = model
        self.requests: sf.Channel[sf.Message[Request]] = sf.Channel(256)
        self.running: sf.RunningFlow | None = None
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.ended = False  # the flow has stopped: no more events
        self.ids = itertools.count(1)
        self.flow = sf.Flow("predict")
        answers = (
            self.flow.source("requests", self.requests)
            .batch("batch", max_size=max_batch, max_wait=max_wait)
            .map("check", self.check, errors="skip")
            .map("model", self.forward, device="cpu:0")
            .unbatch("split")
        )
        answers.sink("reply", self.reply, envelope=True)
        answers.sink("events", self.publish, envelope=True)

    # -- the stages ----------------------------------------------------------------------

    def check(self, batch: list[Request]) -> list[Request]:
        """Inputs of the wrong shape leave the batch, each failing its own request."""
        errors: dict[int, Exception] = {}
        for i, request in enumerate(batch):
            if request.x.shape != (FEATURES,):
                request.problem = f"expected {FEATURES} features, got {request.x.numel()}"
                errors[i] = ValueError(request.problem)
        if errors:
            raise sf.PartialFailure([r for i, r in enumerate(batch) if i not in errors], errors)
        return batch

    def forward(self, batch: list[Request]) -> list[dict[str, Any]]:
        """One model call per batch, on the worker thread (off the event loop)."""
        with torch.inference_mode():
            scores = self.model(torch.stack([r.x for r in batch])).tolist()
        return [
            {"id": r.id, "scores": s, "batch_size": len(batch)}
            for r, s in zip(batch, scores, strict=True)
        ]

    def reply(self, msg: sf.Message[dict[str, Any]]) -> None:
        assert msg.meta is not None
        future: asyncio.Future[dict[str, Any]] = msg.meta["future"]
        if not future.done():  # the client may have gone
            future.set_result(msg.value)

    def publish(self, msg: sf.Message[dict[str, Any]]) -> None:
        for queue in self.subscribers:
            with contextlib.suppress(asyncio.QueueFull):  # a slow client misses events
                queue.put_nowait(msg.value)

    # -- what the routes call ------------------------------------------------------------

    async def predict(self, features: list[float]) -> dict[str, Any]:
        """Send one input through the flow and wait for its answer.

        :raises Rejected: the input was taken out of its batch by ``check``.
        :raises Unavailable: the flow is not running, or stopped before answering.
        """
        running = self.running
        if running is None or running.state != "running":
            raise Unavailable(self.status()[1]["error"] or "the flow is not running")
        request = Request(next(self.ids), torch.tensor(features, dtype=torch.float32))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_ack(outcome: sf.Outcome) -> None:
            if future.done():
                return
            if request.problem is not None:
                future.set_exception(Rejected(request.problem))
            else:  # ABORTED: the flow failed or stopped without draining
                future.set_exception(Unavailable(self._why(outcome)))

        try:
            await self.requests.send(sf.Message(request, meta={"future": future}, on_ack=on_ack))
        except sf.ChannelClosed as exc:
            raise Unavailable(str(exc)) from None
        return await future

    def status(self) -> tuple[int, dict[str, Any]]:
        """The health check: 200 while the flow runs, else 503 with its state and error."""
        running = self.running
        state = "starting" if running is None else str(running.state)
        error = None if running is None or running.error is None else str(running.error)
        return (200 if state == "running" else 503), {"state": state, "error": error}

    def _why(self, outcome: sf.Outcome) -> str:
        running = self.running
        if running is not None and running.error is not None:
            return f"the flow failed: {running.error.stage} raised {running.error.cause!r}"
        return f"the request was not answered ({(outcome.name or 'lost').lower()})"

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, stop: anyio.Event, *, task_status: TaskStatus[None]) -> None:
        """Run the flow until ``stop`` is set, then drain it. A failure is not re-raised
        here: the runtime logs it, ``running.state`` says ``failed`` and every request
        still inside was failed at once; the server stays up and ``/healthz`` says 503."""
        running = self.flow.start()
        try:
            async with running:
                self.running = running
                task_status.started()
                await stop.wait()
        except sf.StageError:
            pass
        finally:
            self.ended = True
            for queue in self.subscribers:  # the event streams end with the flow
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
            if self.running is None:  # it never started: let the lifespan fail
                task_status.started()


class Features(BaseModel):
    features: list[float]


def create_app(
    model: torch.nn.Module | None = None, *, max_batch: int = 32, max_wait: float = 0.005
) -> FastAPI:
    """The app, with its own Prometheus registry (the app's metrics and the flow's)."""
    predictor = Predictor(model or make_model(), max_batch=max_batch, max_wait=max_wait)
    registry = CollectorRegistry()
    collector = sf.FlowCollector()
    registry.register(collector)
    answered = Counter(
        "app_predictions", "POST /predict answers by status.", ["status"], registry=registry
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(predictor.run, stop)
            if predictor.running is None:
                raise RuntimeError("the flow did not start")
            collector.add(predictor.running)
            yield
            stop.set()  # uvicorn has finished the requests in flight: drain the flow

    app = FastAPI(title="streamflow predictions", lifespan=lifespan)
    app.state.predictor = predictor

    @app.post("/predict")
    async def predict(body: Features) -> JSONResponse:
        try:
            answer = await predictor.predict(body.features)
            status = 200
        except Rejected as exc:
            status, answer = 422, {"error": str(exc)}
        except Unavailable as exc:
            status, answer = 503, {"error": str(exc)}
        answered.labels(str(status)).inc()
        return JSONResponse(answer, status_code=status)

    @app.get("/events")
    async def events(limit: int | None = None) -> Response:
        """Every answer, as server-sent events (``limit``: end after that many); the stream
        ends when the flow stops."""
        if predictor.ended:
            return JSONResponse(predictor.status()[1], status_code=503)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(256)
        predictor.subscribers.add(queue)

        async def stream() -> AsyncIterator[str]:
            try:
                yield ": streaming predictions\n\n"
                sent = 0
                while (limit is None or sent < limit) and (event := await queue.get()):
                    yield f"id: {event['id']}\nevent: prediction\ndata: {json.dumps(event)}\n\n"
                    sent += 1
            finally:
                predictor.subscribers.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status, body = predictor.status()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:  # async: scraped on the loop the flow runs on
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


app = create_app()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    sf.configure_logging()
    # open event streams would hold a graceful shutdown forever: cut them after 5 s
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
