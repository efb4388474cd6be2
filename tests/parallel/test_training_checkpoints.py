"""An OnlineTrainer in a checkpointed flow, stopped at once midway (what a crash leaves)
and restarted with a fresh trainer: sync learns exactly what an uninterrupted run learns;
partime and nf1b learn every item exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import streamflow as sf
from streamflow.testing import MemorySource

N = 400
_gen = torch.Generator().manual_seed(0)
DATA = [(torch.randn(8, generator=_gen), torch.tensor(float(i % 2))) for i in range(N)]


def _trainer(schedule: str) -> sf.OnlineTrainer:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Flatten(0))
    return sf.OnlineTrainer(
        model,
        ["cpu:0", "cpu:1"],
        partition=[2, 2],
        loss_fn=lambda out, y: ((out - y) ** 2).mean(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        schedule=schedule,  # type: ignore[arg-type]
        microbatches=4,
    )


def _flow(trainer: sf.OnlineTrainer, src: MemorySource[Any], path: Path | None) -> sf.Flow:
    checkpoints = sf.Checkpoints(path, every=0.03) if path is not None else None
    flow = sf.Flow("learner", checkpoints=checkpoints)
    flow.source("src", src).map("learn", trainer).sink("out", sf.collect([]))
    return flow


async def _crashed_then_resumed(schedule: str, path: Path, crash_after: float) -> sf.OnlineTrainer:
    first = MemorySource(DATA, delay=0.0005)
    async with _flow(_trainer(schedule), first, path).start() as running:
        await asyncio.sleep(crash_after)
        await running.stop(drain=False)  # what a SIGKILL leaves: no drain, no last checkpoint
    assert 0 < first.taken < N
    trainer = _trainer(schedule)  # a new process: nothing learned in memory
    async with _flow(trainer, MemorySource(DATA), path).start() as running:
        await running.wait()
    assert running.checkpoints is not None and running.checkpoints.restored is not None
    return trainer


@pytest.mark.asyncio
@pytest.mark.parametrize("crash_after", [0.06, 0.17])
async def test_sync_after_a_crash_equals_an_uninterrupted_run(
    tmp_path: Path, crash_after: float
) -> None:
    reference = _trainer("sync")
    await _flow(reference, MemorySource(DATA), None).run()
    resumed = await _crashed_then_resumed("sync", tmp_path, crash_after)

    want, got = reference.state_dict(), resumed.state_dict()
    for name, weight in want["model"].items():
        torch.testing.assert_close(got["model"][name], weight, atol=1e-6, rtol=0)
    assert got["versions"] == want["versions"]
    assert got["metrics"] == want["metrics"]  # the prequential counters too
    assert resumed.metrics().samples == N


@pytest.mark.asyncio
@pytest.mark.parametrize("schedule", ["partime", "nf1b"])
async def test_pipelined_schedules_learn_each_item_exactly_once_across_a_crash(
    tmp_path: Path, schedule: str
) -> None:
    resumed = await _crashed_then_resumed(schedule, tmp_path, 0.1)
    metrics = resumed.metrics()
    assert metrics.samples == N and metrics.items == N
    # every part applied one update per item (partime) or per mini-batch (nf1b)
    per_part = N if schedule == "partime" else N // 4
    assert all(v == per_part for v in metrics.updates), metrics.updates


@pytest.mark.asyncio
async def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_stage(
    tmp_path: Path,
) -> None:
    await _flow(_trainer("sync"), MemorySource(DATA[:40]), tmp_path).run()

    torch.manual_seed(1)
    wider = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))
    other = sf.OnlineTrainer(
        wider,
        ["cpu:0", "cpu:1"],
        partition=[2, 2],
        loss_fn=lambda out, y: ((out - y) ** 2).mean(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        schedule="sync",
        microbatches=4,
    )
    with pytest.raises(sf.StageError, match="stage 'learn' cannot restore") as caught:
        await _flow(other, MemorySource(DATA[:40]), tmp_path).run()
    assert caught.value.stage == "learn" and caught.value.phase == "checkpoint"
    assert "size mismatch" in str(caught.value)
