"""Online training on two CPU workers: each schedule against sequential training and the bound.

Streams single labelled samples (batch 1) through an MLP of 8 layers (Linear + ReLU) of
width 1024 and prints, in one run, samples per second (the median of --repeats rounds, the
contenders interleaved in each round) and the peak memory held (saved activations, and
weights, in bytes: streamflow's own accounting for the trainer, saved-tensor hooks for
the sequential loop) for:
(a) sequential online training on one thread (best of 1 or 2 intra-op threads),
(b) the parallel bound: each half of the model trained alone in its own thread at the same
time (forward, backward, SGD step; one intra-op thread each; ready inputs, no handoff),
(c) sf.OnlineTrainer on ["cpu:0", "cpu:1"] with the halves as parts, for each schedule.
Target: partime at least 0.85x the parallel bound. Where there is a GPU (or with --device),
a second section compares sequential training on that one device with each schedule on two
parts placed there.
The benchmark runs with glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ raised (it
starts itself again with them set; --glibc-default-malloc keeps the defaults), so that freed
gradient buffers stay mapped; see docs/TRAINING.md, Performance.
Run: .venv/bin/python benchmarks/pipeline_training.py [--samples N] [--repeats R] [--width W]
     [--device cuda:0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from typing import Any, Literal

import torch
from _common import table
from _models import mlp
from torch import nn

import streamflow as sf

LAYERS = 8
# Keep freed gradient buffers in the process (docs/TRAINING.md, Performance): with glibc's
# defaults each 4 MiB buffer may be unmapped when freed and page-faulted in again next step.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
Schedule = Literal["sync", "partime", "nf1b"]
SCHEDULES: list[tuple[Schedule, int]] = [("sync", 4), ("partime", 1), ("nf1b", 4)]


class Result:
    def __init__(
        self,
        name: str,
        seconds: float,
        n: int,
        activations: int | None = None,
        weights: int | None = None,
        staleness: str = "-",
    ) -> None:
        self.name, self.throughput, self.staleness = name, n / seconds, staleness
        self.activations, self.weights = activations, weights


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3)


def sequential(width: int, pairs: list[Any], threads: int, device: str = "cpu:0") -> Result:
    """Plain PyTorch: the whole model trained on the calling thread, sample by sample."""
    on = torch.device("cpu" if device.startswith("cpu") else device)
    model = mlp(width, LAYERS).to(on).train()
    opt = sgd(list(model.parameters()))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations = _saved_bytes(model, pairs[0][0].to(on))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for x, y in pairs:
        out = model(x.to(on))
        torch.autograd.backward(nn.functional.cross_entropy(out, y.to(on)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(before)
    name = (
        f"(a) sequential on {device}"
        if on.type == "cuda"
        else f"(a) sequential, {threads} thread(s)"
    )
    return Result(name, elapsed, len(pairs), activations, weights, "0")


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for one forward of ``model`` (weights not counted), plus the
    output: what a sequential loop holds between a forward and its backward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            nbytes.append(t.numel() * t.element_size())
        return t

    nbytes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return int(sum(nbytes) + out.numel() * out.element_size())


def parallel_bound(width: int, pairs: list[Any]) -> Result:
    layers = list(mlp(width, LAYERS))
    first, second = nn.Sequential(*layers[: LAYERS // 2]), nn.Sequential(*layers[LAYERS // 2 :])
    with torch.no_grad():
        mids = [first(x) for x, _ in pairs]
    cotangents = [torch.randn_like(m) * 1e-3 for m in mids]
    times: dict[str, float] = {}
    barrier = threading.Barrier(2)

    def alone_first() -> None:
        torch.set_num_threads(1)
        opt = sgd(list(first.parameters()))
        barrier.wait()
        t0 = time.perf_counter()
        for (x, _), g in zip(pairs, cotangents, strict=True):
            torch.autograd.backward(first(x), g)
            opt.step()
            opt.zero_grad(set_to_none=True)
        times["first"] = time.perf_counter() - t0

    def alone_second() -> None:
        torch.set_num_threads(1)
        opt = sgd(list(second.parameters()))
        barrier.wait()
        t0 = time.perf_counter()
        for m, (_, y) in zip(mids, pairs, strict=True):
            x = m.detach().requires_grad_()
            torch.autograd.backward(nn.functional.cross_entropy(second(x), y))
            opt.step()
            opt.zero_grad(set_to_none=True)
        times["second"] = time.perf_counter() - t0

    threads = [threading.Thread(target=alone_first), threading.Thread(target=alone_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Result("(b) parallel bound", max(times.values()), len(pairs))


async def schedule_run(
    width: int,
    pairs: list[Any],
    schedule: Schedule,
    microbatches: int,
    devices: tuple[str, str] = ("cpu:0", "cpu:1"),
) -> Result:
    trainer = sf.OnlineTrainer(
        mlp(width, LAYERS),
        list(devices),
        loss_fn=nn.functional.cross_entropy,
        optimizer=sgd,
        schedule=schedule,
        microbatches=microbatches,
        partition=[LAYERS, LAYERS],  # the same halves as the bound
    )
    flow = sf.Flow("train")
    flow.source("labelled", sf.iterate(pairs)).map("learn", trainer).sink("preds", sf.collect())
    t0 = time.perf_counter()
    await flow.run()
    elapsed = time.perf_counter() - t0
    m = trainer.metrics()
    label = f"(c) {schedule}" + (f", {microbatches} micro-batches" if schedule != "partime" else "")
    weights = sum(m.weight_bytes)
    staleness = ",".join(map(str, m.staleness))
    return Result(label, elapsed, len(pairs), sum(m.activation_bytes), weights, staleness)


def best(results: list[Result]) -> Result:
    return max(results, key=lambda r: r.throughput)


def median_round(results: list[Result]) -> Result:
    """The round with the median throughput: robust to one lucky or unlucky round."""
    return sorted(results, key=lambda r: r.throughput)[len(results) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="keep glibc's default malloc thresholds (see docs/TRAINING.md, Performance)",
    )
    parser.add_argument(
        "--device",
        default="cuda:0" if torch.cuda.is_available() else None,
        help="also run the one-device section here (default: cuda:0 when there is a GPU)",
    )
    args = parser.parse_args()
    if not args.glibc_default_malloc and any(os.environ.get(k) != v for k, v in MALLOC.items()):
        # glibc reads these at start-up: run again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})
    sf.configure_logging(level="warning")
    n, width = args.samples, args.width
    torch.manual_seed(1)
    pairs = [(torch.randn(1, width), torch.randint(0, width, (1,))) for _ in range(n)]
    rounds: dict[str, list[Result]] = {}
    for _ in range(args.repeats):
        contenders = [
            *(sequential(width, pairs, t) for t in (1, 2)),
            parallel_bound(width, pairs),
            *(asyncio.run(schedule_run(width, pairs, s, mb)) for s, mb in SCHEDULES),
        ]
        for r in contenders:
            rounds.setdefault(r.name, []).append(r)
    results = [median_round(rs) for rs in rounds.values()]
    seq = best([r for r in results if r.name.startswith("(a)")])  # best thread count
    bound = median_round(rounds["(b) parallel bound"])
    runs = [r for r in results if r.name.startswith("(c)")]
    malloc = "glibc defaults" if args.glibc_default_malloc else "MALLOC_*_THRESHOLD_ set"
    print(
        f"\n## online training, MLP {LAYERS} x {width}, batch 1, {n} samples, median of "
        f'{args.repeats} interleaved rounds, parts ["cpu:0", "cpu:1"] of {LAYERS // 2} layers each'
        f", malloc: {malloc}"
    )
    rows = [
        (
            r.name,
            r.throughput,
            r.throughput / seq.throughput,
            r.throughput / bound.throughput,
            "-" if r.activations is None else f"{r.activations / 2**10:.1f}",
            "-" if r.weights is None else f"{r.weights / 2**20:.1f}",
            r.staleness,
        )
        for r in (seq, bound, *runs)
    ]
    headers = ["contender", "samples/s", "x seq", "x bound", "activations KiB", "weights MiB"]
    print(table([*headers, "staleness"], rows))
    partime = next(r for r in runs if "partime" in r.name)
    ratio = partime.throughput / bound.throughput
    verdict = "meets" if ratio >= 0.85 else "misses"
    per_round = [
        p.throughput / b.throughput
        for p, b in zip(rounds[partime.name], rounds[bound.name], strict=True)
    ]
    print(
        f"partime / parallel bound: {ratio:.2f}x ({verdict} the 0.85x target); per round "
        f"(both ran back to back): {' '.join(f'{r:.2f}' for r in per_round)}, "
        f"median {statistics.median(per_round):.2f}x"
    )
    if args.device:
        device_section(width, pairs, args.repeats, args.device)


def device_section(width: int, pairs: list[Any], repeats: int, device: str) -> None:
    """One device (a GPU): sequential training against each schedule with two parts on it."""
    rounds: dict[str, list[Result]] = {}
    for _ in range(repeats):
        contenders = [
            sequential(width, pairs, 1, device),
            *(
                asyncio.run(schedule_run(width, pairs, s, mb, (device, device)))
                for s, mb in SCHEDULES
            ),
        ]
        for r in contenders:
            rounds.setdefault(r.name, []).append(r)
    results = [median_round(rs) for rs in rounds.values()]
    seq = results[0]
    print(
        f"\n## online training on {device}, MLP {LAYERS} x {width}, batch 1, {len(pairs)} "
        f"samples, median of {repeats} interleaved rounds, two parts on {device}"
    )
    rows = [(r.name, r.throughput, r.throughput / seq.throughput, r.staleness) for r in results]
    print(table(["contender", "samples/s", "x seq", "staleness"], rows))


if __name__ == "__main__":
    main()
