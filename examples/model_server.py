"""Serve a model from a flow inside an asyncio web app, batching concurrent requests.

The flow lives as long as the app (``async with flow.start()``, what a FastAPI lifespan
does). Each request puts its input into the flow with a future in the message's metadata
and awaits that future. Concurrent requests are batched (up to 32, or whatever arrived
within 2 ms), run through the model in one call on a CPU worker thread, and split again;
the sink answers each request. The message's ack tells a request whose item never reached
the sink that it failed, so no request hangs. An input of the wrong shape fails alone: the
model stage runs the batch without it and raises ``sf.PartialFailure`` naming it, so its
request gets an error and the requests batched with it get their answers.

The HTTP part is a few lines of asyncio streams, so the example needs nothing beyond
streamflow; with FastAPI, ``predict`` is the body of a route and the flow starts in the
lifespan. Run: .venv/bin/python examples/model_server.py (it serves on 127.0.0.1, sends
itself 200 concurrent requests, then 20 more with a bad one among them, checks every
answer and prints metrics).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import torch

import streamflow as sf

FEATURES = 16


class Server:
    """The flow behind the app: requests in, one answer out per request."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.requests: sf.Channel[sf.Message[torch.Tensor]] = sf.Channel(256)
        self.flow = sf.Flow("serve")
        (
            self.flow.source("requests", self.requests)
            .batch("batch", max_size=32, max_wait=0.002)
            .map("model", self.forward, device="cpu:0", errors="skip")
            .unbatch("split")
            .sink("reply", self.reply, envelope=True)
        )

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One model call for the batch (on the worker thread, off the event loop). Inputs of
        the wrong shape are left out and reported one by one."""
        errors: dict[int, Exception] = {
            i: ValueError(f"expected {FEATURES} features, got shape {list(x.shape)}")
            for i, x in enumerate(inputs)
            if x.shape != (FEATURES,)
        }
        good = [x for i, x in enumerate(inputs) if i not in errors]
        with torch.inference_mode():
            outputs = list(self.model(torch.stack(good)).unbind(0)) if good else []
        if errors:
            raise sf.PartialFailure(outputs, errors)
        return outputs

    async def reply(self, msg: sf.Message[torch.Tensor]) -> None:
        assert msg.meta is not None
        future: asyncio.Future[torch.Tensor] = msg.meta["reply"]
        if not future.done():  # the client may have given up already
            future.set_result(msg.value)

    async def predict(self, x: torch.Tensor) -> torch.Tensor:
        """What a route handler calls: send ``x`` through the flow and await its answer."""
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()

        def on_ack(outcome: sf.Outcome) -> None:
            if not future.done():  # handled, but never answered: skipped, dropped, filtered
                future.set_exception(
                    RuntimeError(f"the request was {outcome.name or 'lost'}".lower())
                )

        await self.requests.send(sf.Message(x, meta={"reply": future}, on_ack=on_ack))
        return await future


async def handle_http(server: Server, reader: Any, writer: Any) -> None:
    """POST /predict with {"features": [...]}: 200 {"scores": [...]} or 400/500 {"error"}."""
    answer: dict[str, Any]
    try:
        await reader.readline()  # request line
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = json.loads(await reader.readexactly(length))
        x = torch.tensor(body["features"], dtype=torch.float32)
        try:
            scores = await server.predict(x)
            status, answer = 200, {"scores": scores.tolist()}
        except RuntimeError as exc:
            status, answer = 500, {"error": str(exc)}
    except (ValueError, KeyError, TypeError) as exc:
        status, answer = 400, {"error": f"bad request: {exc}"}
    payload = json.dumps(answer).encode()
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    writer.close()


async def post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A minimal HTTP client for the demo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    status = int((await reader.readline()).split()[1])
    raw = await reader.read()
    writer.close()
    return status, json.loads(raw.split(b"\r\n\r\n", 1)[1])


async def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
    )
    server = Server(model)
    async with server.flow.start() as running:  # the app's lifespan
        http = await asyncio.start_server(lambda r, w: handle_http(server, r, w), "127.0.0.1", 0)
        port = http.sockets[0].getsockname()[1]
        inputs = [torch.randn(FEATURES) for _ in range(200)]
        answers = await asyncio.gather(*(post(port, {"features": x.tolist()}) for x in inputs))
        with torch.inference_mode():
            for x, (status, body) in zip(inputs, answers, strict=True):
                assert status == 200, body
                assert torch.allclose(torch.tensor(body["scores"]), model(x), atol=1e-5)
        # a wrong number of features among good requests: it alone gets a 500
        bodies = [{"features": x.tolist()} for x in inputs[:20]]
        bodies.insert(7, {"features": [1.0, 2.0]})
        answers = await asyncio.gather(*(post(port, body) for body in bodies))
        statuses = [status for status, _ in answers]
        assert statuses == [200] * 7 + [500] + [200] * 13, statuses
        assert "skipped" in answers[7][1]["error"], answers[7]
        status, body = await post(port, {"feature": []})  # no "features": rejected at once
        assert status == 400, (status, body)
        http.close()
        await http.wait_closed()
        metrics = running.metrics()
        await running.stop()
    batch = metrics["batch"]
    print(
        f"{batch.items_in} inputs in {batch.items_out} model calls "
        f"(mean batch {batch.items_in / max(batch.items_out, 1):.1f}); "
        f"request latency p50 {1e3 * (metrics['reply'].end_to_end_p50_s or 0):.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
