"""Answering concurrent requests with a model: one call per request against a flow that
batches the requests in flight (the pattern of examples/model_server.py, without HTTP).

``--clients`` coroutines each send ``--requests`` requests one after another (a new one as
soon as the last is answered). Contenders, in one run, rounds interleaved:
(a) each request calls ``model(x)`` on the event loop; (b) each request calls it in a
worker thread (``asyncio.to_thread``); (c) streamflow: requests go into a flow that batches
them (up to ``--batch``, or 2 ms), runs one model call per batch on a ``cpu:0`` worker and
answers each request through a future in its message. Prints requests per second, latency
p50/p99 and the ratio to (a). (a) blocks the event loop while it computes: its latency
leaves out the time the other requests wait for the loop, and a web server doing this
stops accepting connections meanwhile.
Run: .venv/bin/python benchmarks/serving.py [--clients N] [--requests N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import torch
from _common import table

import streamflow as sf

FEATURES = 256


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).eval()


class Batched:
    """The flow behind (c): requests in, one answer per request out."""

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        self.model = model
        self.requests: sf.Channel[sf.Message[torch.Tensor]] = sf.Channel(1024)
        self.flow = sf.Flow("serve")
        (
            self.flow.source("requests", self.requests)
            .batch("batch", max_size=batch, max_wait=0.002)
            .map("model", self.forward, device="cpu:0")
            .unbatch("split")
            .sink("reply", self.reply, envelope=True)
        )

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(self.model(torch.stack(inputs)).unbind(0))

    def reply(self, msg: sf.Message[torch.Tensor]) -> None:
        assert msg.meta is not None
        msg.meta["reply"].set_result(msg.value)

    async def predict(self, x: torch.Tensor) -> torch.Tensor:
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await self.requests.send(sf.Message(x, meta={"reply": future}))
        return await future


async def load(
    predict: Callable[[torch.Tensor], Awaitable[torch.Tensor]], clients: int, requests: int
) -> tuple[float, list[float]]:
    """Requests per second and per-request latencies, ``clients`` at once."""
    x = torch.randn(FEATURES)
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            await predict(x)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return clients * requests / (time.perf_counter() - t0), latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=100, help="per client")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    torch.set_num_threads(1)  # every contender computes on one core; the loop has the other
    model = make_model()

    async def on_loop(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.unsqueeze(0))[0]  # type: ignore[no-any-return]

    async def in_thread(x: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(on_loop_sync, x)

    def on_loop_sync(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.unsqueeze(0))[0]  # type: ignore[no-any-return]

    server = Batched(model, args.batch)
    results: dict[str, list[tuple[float, list[float]]]] = {"a": [], "b": [], "c": []}
    async with server.flow.start() as running:
        for _ in range(args.repeats):
            results["a"].append(await load(on_loop, args.clients, args.requests))
            results["b"].append(await load(in_thread, args.clients, args.requests))
            results["c"].append(await load(server.predict, args.clients, args.requests))
        batch = running.metrics()["batch"]
        await running.stop()
    names = {
        "a": "(a) model(x) per request, on the loop",
        "b": "(b) model(x) per request, asyncio.to_thread",
        "c": f"(c) streamflow, batch({args.batch}, 2 ms) on cpu:0",
    }
    base = statistics.median(r for r, _ in results["a"])
    rows = []
    for key, runs in results.items():
        rate, latencies = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        ordered = sorted(latencies)
        p50 = ordered[len(ordered) // 2] * 1e3
        p99 = ordered[int(0.99 * (len(ordered) - 1))] * 1e3
        rows.append((names[key], rate, p50, p99, rate / base))
    print(
        f"{args.clients} clients x {args.requests} requests, median of {args.repeats} "
        f"interleaved rounds; streamflow's mean batch: "
        f"{batch.items_in / max(batch.items_out, 1):.1f}"
    )
    print(table(["contender", "requests/s", "p50 ms", "p99 ms", "x (a)"], rows))
    print("(a)'s latency leaves out the time requests wait while it blocks the event loop")


if __name__ == "__main__":
    asyncio.run(main())
