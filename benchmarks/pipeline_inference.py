"""Pipelined inference on two CPU workers against sequential PyTorch and hand-written threads.

Streams single samples (batch 1) and prints, in one run, throughput, latency p50/p99 and
ratios for: (a) best sequential (1 or 2 intra-op threads), (b) a hand-written two-thread
queue.Queue pipeline, (c) the parallel bound (each half alone in its own thread on ready
inputs, both at once, no handoff), (d) streamflow on ["cpu:0", "cpu:1"] with the auto plan.
Models: MLP width 1024 x 8 layers, MLP width 256 x 8 layers, a small CNN on 64x64 images.
Where there is a GPU (or with --device), a second section compares, on that one device,
(a) sequential with (e) streamflow with one stage and (f) two stages, each part on its own
CUDA stream, with and without CUDA graphs.
Run: .venv/bin/python benchmarks/pipeline_inference.py [--samples N] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import queue
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import table
from _models import cnn, mlp
from torch import nn

import streamflow as sf


class Result:
    def __init__(self, name: str, seconds: float, n: int, latencies: Sequence[float]) -> None:
        self.name, self.throughput = name, n / seconds
        ordered = sorted(latencies)
        self.p50 = ordered[len(ordered) // 2] if ordered else float("nan")
        self.p99 = ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("nan")


def sequential(model: nn.Module, frames: list[torch.Tensor], threads: int) -> Result:
    torch.set_num_threads(threads)
    lat = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in frames:
            s = time.perf_counter()
            model(x)
            lat.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - t0
    torch.set_num_threads(2)
    return Result(f"(a) sequential, {threads} thread(s)", elapsed, len(frames), lat)


def _halves(model: nn.Sequential, cut: int) -> tuple[nn.Module, nn.Module]:
    layers = list(sf.parallel.split_layers(model))
    return nn.Sequential(*layers[:cut]), nn.Sequential(*layers[cut:])


def queue_pipeline(first: nn.Module, second: nn.Module, frames: list[torch.Tensor]) -> Result:
    q1: queue.Queue[Any] = queue.Queue(maxsize=2)
    born: list[float] = []
    lat: list[float] = []

    def stage(module: nn.Module, q_in: Callable[[], Any], q_out: Callable[[Any], None]) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            while (item := q_in()) is not None:
                i, x = item
                q_out((i, module(x)))
            q_out(None)

    results: list[Any] = []

    def collect(item: Any) -> None:
        if item is not None:
            lat.append(time.perf_counter() - born[item[0]])
            results.append(item)

    feed: queue.Queue[Any] = queue.Queue(maxsize=2)
    a = threading.Thread(target=stage, args=(first, feed.get, q1.put))
    b = threading.Thread(target=stage, args=(second, q1.get, collect))
    t0 = time.perf_counter()
    a.start()
    b.start()
    for i, x in enumerate(frames):
        born.append(time.perf_counter())
        feed.put((i, x))
    feed.put(None)
    a.join()
    b.join()
    elapsed = time.perf_counter() - t0
    assert len(results) == len(frames)
    return Result("(b) queue.Queue threads", elapsed, len(frames), lat)


def parallel_bound(first: nn.Module, second: nn.Module, frames: list[torch.Tensor]) -> Result:
    with torch.inference_mode():
        mids = [first(x) for x in frames]
    times: dict[str, float] = {}
    barrier = threading.Barrier(2)

    def alone(name: str, module: nn.Module, inputs: list[torch.Tensor]) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            barrier.wait()
            t0 = time.perf_counter()
            for x in inputs:
                module(x)
            times[name] = time.perf_counter() - t0

    threads = [
        threading.Thread(target=alone, args=("a", first, frames)),
        threading.Thread(target=alone, args=("b", second, mids)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Result("(c) parallel bound", max(times.values()), len(frames), [])


async def streamflow_run(pipe: Any, frames: list[torch.Tensor]) -> tuple[Result, list[Any]]:
    outputs: list[torch.Tensor] = []
    flow = sf.Flow("infer")
    flow.source("frames", sf.iterate(frames)).map("model", pipe).sink("out", sf.collect(outputs))
    t0 = time.perf_counter()
    await flow.run()
    elapsed = time.perf_counter() - t0
    m = flow.metrics()["out"]
    res = Result("(d) streamflow cpu:0,cpu:1", elapsed, len(frames), [])
    res.p50, res.p99 = m.end_to_end_p50_s or 0.0, m.end_to_end_p99_s or 0.0
    return res, outputs


def _rounds(contenders: dict[str, Callable[[], Result]], repeats: int) -> dict[str, list[Result]]:
    """Run every contender once per round. Rounds interleave, so drift hits every contender
    alike, and each round starts one contender later, so none always runs first or always
    runs right after the same neighbour."""
    names = list(contenders)
    rounds: dict[str, list[Result]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rounds[name].append(contenders[name]())
    return rounds


def _paired(ours: list[Result], theirs: list[Result]) -> str:
    """Our throughput over theirs in each round (they ran back to back): the median, a 95%
    bootstrap interval of that median, and every round's ratio."""
    ratios = [a.throughput / b.throughput for a, b in zip(ours, theirs, strict=True)]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(2000))
    low, high = medians[50], medians[1949]
    rounds = " ".join(f"{r:.2f}" for r in ratios)
    return f"{statistics.median(ratios):.3f} [{low:.3f}-{high:.3f}] ({rounds})"


def _median(results: list[Result]) -> Result:
    """The round with the median throughput (its latencies come with it)."""
    return sorted(results, key=lambda r: r.throughput)[len(results) // 2]


def bench(title: str, model: nn.Sequential, example: torch.Tensor, n: int, repeats: int) -> None:
    model.eval()
    frames = [torch.randn_like(example) for _ in range(n)]
    pipe = sf.pipeline(model, devices=["cpu:0", "cpu:1"], example=example)
    cut = (
        pipe.plan.partition[0]
        if len(pipe.plan.stages) > 1
        else len(sf.parallel.split_layers(model)) // 2
    )
    first, second = _halves(model, cut)
    outputs: list[Any] = []

    def ours() -> Result:
        result, outputs[:] = asyncio.run(streamflow_run(pipe, frames))
        return result

    contenders: dict[str, Callable[[], Result]] = {
        "seq": lambda: max(
            (sequential(model, frames, t) for t in (1, 2)), key=lambda r: r.throughput
        ),
        "queue": lambda: queue_pipeline(first, second, frames),
        "bound": lambda: parallel_bound(first, second, frames),
        "sf": ours,
    }
    rounds = _rounds(contenders, repeats)
    seq, qp, bound, sfr = (_median(rounds[k]) for k in ("seq", "queue", "bound", "sf"))
    with torch.inference_mode():
        assert all(
            torch.allclose(model(x), y, atol=1e-5)
            for x, y in zip(frames[:50], outputs[:50], strict=True)
        )
    print(
        f"\n## {title}: {n} samples, median of {repeats} rotated rounds, "
        f"plan {pipe.plan.partition} on "
        f"{pipe.plan.devices}, predicted {pipe.plan.predicted_throughput:,.0f}/s"
    )
    for key, note in pipe.plan.provenance:  # how the inputs were measured, the plan chosen
        print(f"  {key}: {note}")
    rows = [
        (
            r.name,
            r.throughput,
            r.p50 * 1e3,
            r.p99 * 1e3,
            r.throughput / seq.throughput,
            r.throughput / bound.throughput,
        )
        for r in (seq, qp, bound, sfr)
    ]
    print(table(["contender", "samples/s", "p50 ms", "p99 ms", "x seq", "x bound"], rows))
    print(
        "latency: (b) from the moment the feeding thread offers a sample to its 2-slot queue; "
        "(d) from the moment the source produced it, so with a source always ahead it includes "
        f"the 16 items queued in front of the model and the {1 if pipe.inline else pipe.in_flight}"
        " samples in flight "
        "(see docs/PARALLEL.md, Latency)"
    )
    print(
        f"streamflow / queue.Queue: {sfr.throughput / qp.throughput:.2f}x; "
        f"predicted / measured: {pipe.plan.predicted_throughput / sfr.throughput:.2f}; "
        f"median of the per-round ratios [95% interval of that median] (each round's "
        f"contenders ran back to back): "
        f"(d)/(b) {_paired(rounds['sf'], rounds['queue'])}, "
        f"(d)/(c) {_paired(rounds['sf'], rounds['bound'])}"
    )


def sequential_on(model: nn.Module, frames: list[torch.Tensor], device: str) -> Result:
    """``model(x)`` per sample on ``device``, waiting for each result (what a loop that
    serves one sample at a time does)."""
    cuda = device.startswith("cuda")
    lat = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in frames:
            s = time.perf_counter()
            model(x.to(device, non_blocking=True))
            if cuda:
                torch.cuda.synchronize(device)
            lat.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - t0
    return Result(f"(a) sequential on {device}", elapsed, len(frames), lat)


def device_bench(
    title: str, model: nn.Sequential, example: torch.Tensor, n: int, repeats: int, device: str
) -> None:
    """One device (a GPU): sequential against sf.pipeline with one and two stages on it, each
    part on its own CUDA stream, with and without CUDA graphs (graphs on CUDA only)."""
    cuda = device.startswith("cuda")
    model.eval().to(device)
    frames = [torch.randn_like(example) for _ in range(n)]
    if cuda:
        frames = [x.pin_memory() for x in frames]
    layers = len(sf.parallel.split_layers(model))
    half = layers // 2
    pipes: dict[str, Any] = {}
    for graphs in (False, True) if cuda else (False,):
        tag = " + CUDA graphs" if graphs else ""
        pipes[f"(e) streamflow, 1 stage{tag}"] = sf.pipeline(
            model, [device], example, partition=[layers], cuda_graphs=graphs, inline_below=0
        )
        pipes[f"(f) streamflow, 2 stages{tag}"] = sf.pipeline(
            model, [device, device], example, partition=[half, layers - half], cuda_graphs=graphs
        )
    outputs: dict[str, list[Any]] = {}

    def ours(name: str, pipe: Any) -> Result:
        result, outputs[name] = asyncio.run(streamflow_run(pipe, frames))
        result.name = name
        return result

    contenders: dict[str, Callable[[], Result]] = {
        "seq": lambda: sequential_on(model, frames, device),
        **{name: functools.partial(ours, name, pipe) for name, pipe in pipes.items()},
    }
    rounds = _rounds(contenders, repeats)
    with torch.inference_mode():
        expected = [model(x.to(device)) for x in frames[:50]]
    for name, got in outputs.items():  # TF32 convolutions on GPUs: a looser tolerance
        assert all(
            torch.allclose(e, y.to(device), atol=1e-3, rtol=1e-3)
            for e, y in zip(expected, got[:50], strict=True)
        ), name
    seq = _median(rounds["seq"])
    print(f"\n## {title} on {device}: {n} samples, median of {repeats} rotated rounds")
    rows = [
        (r.name, r.throughput, r.p50 * 1e3, r.p99 * 1e3, r.throughput / seq.throughput)
        for r in (seq, *(_median(rounds[name]) for name in pipes))
    ]
    print(table(["contender", "samples/s", "p50 ms", "p99 ms", "x seq"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["mlp1024", "mlp256", "cnn"], default=None)
    parser.add_argument(
        "--device",
        default="cuda:0" if torch.cuda.is_available() else None,
        help="also run the one-device section here (default: cuda:0 when there is a GPU)",
    )
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    torch.manual_seed(0)
    cases = {
        "mlp1024": ("MLP 8 x 1024", mlp(1024), torch.randn(1, 1024)),
        "mlp256": ("MLP 8 x 256", mlp(256), torch.randn(1, 256)),
        "cnn": ("CNN 64x64", cnn(), torch.randn(1, 3, 64, 64)),
    }
    for key, (title, model, example) in cases.items():
        if args.only in (None, key):
            bench(title, model, example, args.samples, args.repeats)
    if args.device:
        for key, (title, model, example) in cases.items():
            if args.only in (None, key):
                device_bench(title, model, example, args.samples, args.repeats, args.device)


if __name__ == "__main__":
    main()
