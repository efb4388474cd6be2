"""The live view: drawn into a real rich console while real flows run, without holding the
event loop."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.console import Console

import streamflow as sf
from streamflow.testing import LoopLag, MemorySink, loop_lag

pytestmark = pytest.mark.asyncio

STAGES = 20


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140, color_system=None), out


def last_frame(text: str) -> str:
    """What the screen shows at the end: the text after the last cursor movement."""
    return re.split(r"\x1b\[[0-9;?]*[A-Za-z]", text.rstrip())[-1] or text


async def paced(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0.001)
        yield i


def inc(x: int) -> int:
    return x + 1


def wide_flow(source: Any, name: str = "wide") -> sf.Flow:
    flow = sf.Flow(name)
    stream = flow.source("numbers", source)
    for i in range(STAGES - 2):
        stream = stream.map(f"m{i}", inc)
    stream.sink("out", MemorySink[int]())
    return flow


async def test_every_stage_is_shown_with_a_progress_bar_for_a_known_length() -> None:
    screen, out = console()
    flow = wide_flow(sf.iterate(list(range(3000))))
    async with (
        flow.start() as running,
        sf.LiveView(running, console=screen, refresh_per_second=50) as view,
    ):
        await running.wait()
        await asyncio.sleep(0.05)
    assert view.frames >= 2
    frame = last_frame(out.getvalue())
    for column in ("stage", "items/s", "queue", "busy", "p50", "p99", "errors", "dropped"):
        assert column in frame
    rows = {line.split()[0]: line.split() for line in frame.splitlines() if line.strip()}
    assert {"numbers", "out", *(f"m{i}" for i in range(STAGES - 2))} <= set(rows)
    assert rows["m0"][1:5] == ["map", rows["m0"][2], "3,000", "3,000"]
    assert rows["m0"][5] == "0/16"  # queue depth against capacity
    assert "3,000/3,000 (100%)" in frame  # the source's progress: every item acknowledged
    assert "━" in frame
    assert "stopped" in frame  # the flow's state in the header


async def test_a_source_of_unknown_length_has_no_progress_bar() -> None:
    screen, out = console()
    flow = wide_flow(sf.iterate(paced(20)), name="unknown")
    async with flow.start() as running, sf.LiveView(running, console=screen):
        await running.wait()
    frame = last_frame(out.getvalue())
    assert "━" not in frame and "numbers" in frame


async def test_drawing_20_stages_does_not_hold_the_event_loop() -> None:
    """Frames are read and drawn on a worker thread: the loop's worst stall stays far below
    what one frame takes to draw (about 10 ms for 20 stages on a 2-core test machine)."""

    async def run() -> LoopLag:
        screen, _ = console()
        flow = wide_flow(sf.iterate(paced(400)), name="lag")
        async with (
            flow.start() as running,
            loop_lag(0.002) as lag,
            sf.LiveView(running, console=screen, refresh_per_second=50) as view,
        ):
            await running.wait()
        assert view.frames >= 10
        return lag

    best = min([await run() for _ in range(3)], key=lambda lag: lag.worst)
    assert best.samples > 50
    assert best.worst < 0.01, best


async def test_an_online_trainer_shows_its_loss_and_prequential_accuracy() -> None:
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
    xs = torch.randn(200, 4)
    pairs = [(x[None], (x[:1] > 0).long()) for x in xs]
    flow = sf.Flow("learning")
    flow.source("pairs", sf.iterate(pairs)).map("learn", trainer).sink("out", MemorySink[Any]())
    screen, out = console()
    async with flow.start() as running, sf.LiveView(running, console=screen):
        await running.wait()
    frame = last_frame(out.getvalue())
    metrics = trainer.metrics()
    assert metrics.loss is not None and metrics.accuracy is not None
    rows = [row for row in frame.splitlines() if row.startswith("learn ")]
    line = rows[-1]  # its stage's row, then its trainer's
    assert line.split() == [
        "learn",
        "partime",
        "200",
        f"{metrics.loss:.4f}",
        f"{metrics.accuracy:.3f}",
        f"{metrics.recent_accuracy:.3f}",
    ]
    assert "learn[0]" in frame  # the trainer's part, under its stage
    assert "200/200 (100%)" in frame


async def test_a_failed_flow_shows_its_error() -> None:
    def boom(x: int) -> int:
        raise RuntimeError("the model broke")

    flow = sf.Flow("failing")
    flow.source("numbers", sf.iterate(range(5))).map("boom", boom).sink("out", MemorySink[int]())
    screen, out = console()
    running = flow.start()
    with pytest.raises(sf.StageError):
        async with running, sf.LiveView(running, console=screen):
            await running.wait()
    frame = last_frame(out.getvalue())
    assert "failed" in frame and "the model broke" in frame
