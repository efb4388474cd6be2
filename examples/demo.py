"""The main job, end to end: learn a drifting sensor stream online, then serve the model.

A generated vibration sensor reports, per message, a window of 128 readings from each of 8
machines, each in one of four states (normal, imbalance, misalignment, bearing wear). Each state has its own signature
in the spectrum, relative to the machine's speed, and the speed drifts (it ramps up by 60%
and back), so the peaks the model learnt move: the pattern drifts over time. The flow:

    sensor -> spectrum (a map on the loop) -> learn (OnlineTrainer, partime, 2 CPU workers)
           -> check (a sink that sees the envelope: the label is in its metadata)

predicts each window before learning from it (prequential), shown in streamflow's live view
on a terminal (``--no-live``, or output to a pipe: a progress line about every second). Then the trained model serves fresh windows through a pipelined inference stage
(``sf.pipeline`` over the same two CPU workers: the plans are chosen automatically and may
use one worker when that measures faster), and the demo prints its throughput.
No broker is needed. Run: .venv/bin/python examples/demo.py [--samples 10000] (``make demo``)

With ``--checkpoints DIR`` the learning flow checkpoints the trainer and the stream's
position every 2 s: stop it (Ctrl-C drains and takes a last checkpoint; even a kill -9
loses nothing) and run the same command again, and it goes on where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import streamflow as sf

STATES = ("normal", "imbalance", "misalignment", "bearing")
WINDOW = 128  # readings per window
BINS = 64  # spectrum bins the model sees
MACHINES = 8  # windows per message: one per machine of the line
SIGNATURES = [(1.0, 0.5), (1.0, 2.0), (2.0, 2.0), (5.3, 1.5)]  # (x speed, amplitude)


def speed(t: float) -> float:
    """The machine's speed at ``t`` (0 to 1 over the stream): up by 60% and back."""
    return 1.0 + 0.6 * math.sin(math.pi * t) ** 2


def sensor(
    samples: int, seed: int = 0, span: tuple[float, float] = (0.0, 1.0)
) -> Iterator[sf.Message[torch.Tensor]]:
    """``samples`` messages of ``MACHINES`` vibration windows each, over ``span`` of the drift
    cycle; the states are in ``meta`` (in a plant the labels come later, from inspection:
    here the sink reads them to score the predictions)."""
    g = torch.Generator().manual_seed(seed)
    time_axis = torch.arange(WINDOW, dtype=torch.float32) / WINDOW
    a, b = span
    for i in range(samples):
        states = torch.randint(len(STATES), (MACHINES,), generator=g)
        now = speed(a + (b - a) * i / samples)
        phase = 2 * math.pi * torch.rand(MACHINES, 4, 1, generator=g)
        wave = 0.8 * torch.randn(MACHINES, WINDOW, generator=g)
        for k, (harmonic, amp) in enumerate(SIGNATURES):  # the base tone, then each state's
            on = torch.ones(MACHINES) if k == 0 else (states == k).float()
            tone = torch.sin(2 * math.pi * harmonic * 6.0 * now * time_axis + phase[:, k])
            wave += (amp * on)[:, None] * tone
        yield sf.Message(wave, meta={"states": states, "speed": round(now, 3)})


def spectrum(msg: sf.Message[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-magnitude spectrum of a window, paired with its label for the trainer (the
    stage sees the envelope, ``envelope=True``, to read the label in its metadata)."""
    mags = torch.fft.rfft(msg.value).abs()[:, 1 : BINS + 1]
    assert msg.meta is not None
    return torch.log1p(mags) - 2.3, msg.meta["states"]  # about zero mean


def model() -> nn.Sequential:
    torch.manual_seed(0)
    wide = 512
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(BINS if i == 0 else wide, wide), nn.ReLU()) for i in range(3)),
        nn.Linear(wide, len(STATES)),
    )


class Score:
    """The sink: scores each prediction against the labels in the envelope's metadata."""

    def __init__(self) -> None:
        self.hits: list[float] = []  # per message: the fraction of its machines got right
        self.last = ""

    async def __call__(self, msg: sf.Message[torch.Tensor]) -> None:
        assert msg.meta is not None
        guess, truth = msg.value.argmax(-1), msg.meta["states"]
        self.hits.append(float((guess == truth).float().mean()))
        g, t = int(guess[0]), int(truth[0])
        mark = "ok" if g == t else "MISS"
        self.last = f"machine 0: {STATES[g]} (is {STATES[t]}, {mark}), speed {msg.meta['speed']}"


def parts(plan: sf.parallel.Plan) -> str:
    return ", ".join(f"layers {s.layer_start}-{s.layer_end - 1} on {s.device}" for s in plan.stages)


async def progress(running: sf.RunningFlow, trainer: sf.OnlineTrainer, score: Score) -> None:
    """About every second, one line from the trainer's and the flow's metrics."""
    t0 = time.perf_counter()
    while True:
        await asyncio.sleep(1.0)
        m, sensed = trainer.metrics(), running.metrics()["sensor"]
        acc = f"{m.accuracy:.3f}" if m.accuracy is not None else "-"
        recent = f"{m.recent_accuracy:.3f}" if m.recent_accuracy is not None else "-"
        elapsed = time.perf_counter() - t0
        print(
            f"{elapsed:5.1f}s {sensed.items_out:6d} msgs ({sensed.items_out / elapsed:4.0f}/s) "
            f"accuracy {acc}, last 100 msgs {recent} | {score.last}",
            flush=True,
        )


async def predictions(score: Score) -> None:
    """Under the live view (which shows accuracy and loss): the latest prediction."""
    while True:
        await asyncio.sleep(1.0)
        print(f"predicted {score.last}", flush=True)


async def learn(
    samples: int, trainer: sf.OnlineTrainer, live: bool, checkpoints: Path | None
) -> tuple[Score, sf.CheckpointStats | None]:
    score = Score()
    every = sf.Checkpoints(checkpoints, every=2.0) if checkpoints is not None else None
    flow = sf.Flow("learn", checkpoints=every)
    readings: sf.Stream[Any] = flow.source("sensor", sf.iterate(sensor(samples)))
    (
        readings.map("spectrum", spectrum, envelope=True)
        .map("learn", trainer)
        .sink("check", score, envelope=True)
    )
    async with flow.start() as running, contextlib.AsyncExitStack() as stack:
        if live:  # a rich view of every stage, the trainer's loss and accuracy included
            await stack.enter_async_context(sf.LiveView(running, refresh_per_second=2))
        lines = predictions(score) if live else progress(running, trainer, score)
        ticker = asyncio.create_task(lines)
        try:
            await running.wait(stop_on_signals=True)  # Ctrl-C: drain, last checkpoint
        finally:
            ticker.cancel()
    return score, running.checkpoints


def live_view_available() -> bool:
    """The live view draws on a terminal and needs rich (the ``cli`` extra)."""
    try:
        return sys.stdout.isatty() and sf.LiveView is not None
    except (ImportError, AttributeError):
        return False


async def serve(trained: nn.Module, samples: int) -> None:
    """The trained model, pipelined over the two workers, on fresh windows at the speed the
    stream ended with."""
    requests = [spectrum(m) for m in sensor(samples, seed=1, span=(0.95, 1.0))]
    pipe = sf.pipeline(trained.eval(), ["cpu:0", "cpu:1"], example=requests[0][0])
    print(f"serving plan: {parts(pipe.plan)}")
    preds: list[torch.Tensor] = []
    flow = sf.Flow("serve")
    flow.source("requests", sf.iterate([x for x, _ in requests])).map("model", pipe).sink(
        "replies", sf.collect(preds)
    )
    t0 = time.perf_counter()
    await flow.run()
    wall = time.perf_counter() - t0
    right = sum(
        float((p.argmax(-1) == y).float().mean()) for p, (_, y) in zip(preds, requests, strict=True)
    )
    p50 = 1e3 * (flow.metrics()["replies"].end_to_end_p50_s or 0.0)
    print(
        f"served {len(preds)} messages ({len(preds) * MACHINES} windows) in {wall:.2f} s: "
        f"{len(preds) / wall:.0f} msgs/s, end-to-end p50 {p50:.2f} ms, "
        f"accuracy {right / len(preds):.3f}"
    )


async def main(samples: int, live: bool, checkpoints: Path | None = None) -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the spectrum runs on the loop: leave the other core to the workers
    trainer = sf.OnlineTrainer(
        model(),
        devices=["cpu:0", "cpu:1"],
        example=spectrum(next(sensor(1)))[0],
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.5),
        schedule="partime",
    )
    print(f"learning {samples} messages of {MACHINES} windows online, plan: {parts(trainer.plan)}")
    score, saved = await learn(samples, trainer, live, checkpoints)
    learned = trainer.metrics().items
    if saved is not None and saved.restored is not None:
        print(
            f"restored checkpoint {saved.restored}: went on from message {learned - len(score.hits)}"
        )
    if learned < samples:  # stopped by a signal: the last checkpoint has it
        print(f"stopped after {learned} of {samples} messages; run again to go on")
        return
    if len(score.hits) < 2 * max(1, min(200, samples // 10)):
        print("nothing (or little) was left to learn in this run: see the first one")
        return
    k = max(1, min(200, samples // 10))
    first, last = sum(score.hits[:k]) / k, sum(score.hits[-k:]) / k
    m = trainer.metrics()
    print(
        f"prequential accuracy rose from {first:.3f} (first {k} msgs) to {last:.3f} (last {k}); "
        f"overall {m.accuracy:.3f}, updates per part {m.updates}, staleness {m.staleness}"
    )
    assert last > first, "the model did not learn"
    await serve(trainer.model(), max(2000, samples // 2))
    print(f"demo done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10000, help="messages to learn from")
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the live view (default: on when stdout is a terminal), else a line a second",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        metavar="DIR",
        help="checkpoint the learning flow into DIR and go on from there when run again",
    )
    args = parser.parse_args()
    live = live_view_available() if args.live is None else args.live
    asyncio.run(main(args.samples, live, args.checkpoints))
