"""The proof of checkpoints: an online learner on a Kafka topic of 20,000 labelled records,
killed with SIGKILL at several moments (midway, in the middle of a checkpoint write, while
starting up) and restarted until the topic is learned, ends with exactly the weights and
prequential counters of an uninterrupted run: every record was learned exactly once."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import streamflow as sf

from ._kafka import committed, create_topic, produce
from ._learner import flow, records, trainer
from ._wait import until
from .conftest import ROOT

pytestmark = pytest.mark.asyncio

N = 20_000


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _writing(where: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in where.glob("writing-*"))


async def _uninterrupted(schedule: str, data: list[bytes], tmp: Path) -> sf.OnlineTrainer:
    learner = trainer(schedule)
    await flow(learner, sf.iterate(data), tmp / "reference.jsonl", None).run()
    return learner


async def _child(kafka: str, topic: str, where: Path, schedule: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.connectors._learner_child", kafka, topic, topic, str(where),
        schedule, str(N), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _kill_when(child: asyncio.subprocess.Process, ready: object, within: float) -> None:
    try:
        await until(lambda: ready() or child.returncode is not None, within=within)  # type: ignore[operator]
    finally:
        if child.returncode is None:
            child.kill()
        _, err = await child.communicate()
    assert child.returncode == -9, f"the child ended before it was killed: {err.decode()[-2000:]}"


@pytest.mark.parametrize("schedule", ["sequential", "sync"])
async def test_a_learner_killed_with_sigkill_learns_every_record_exactly_once(
    kafka: str, name: str, tmp_path: Path, schedule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = records(N)
    await create_topic(kafka, name)
    await produce(kafka, name, data)
    reference = await _uninterrupted(schedule, data, tmp_path)
    where = tmp_path / "run"
    where.mkdir()
    predictions = where / "predictions.jsonl"
    moments = []

    # 1: midway through the topic, whatever is happening then
    child = await _child(kafka, name, where, schedule)
    await _kill_when(child, lambda: _lines(predictions) >= N // 4, within=60)
    moments.append(f"midway ({_lines(predictions)} predictions written)")

    # 2: in the middle of a checkpoint write (after its snapshot, before it is durable)
    before = _writing(where)
    child = await _child(kafka, name, where, schedule)
    await _kill_when(
        child, lambda: len(_writing(where)) >= len(before) + 3, within=60
    )  # the third write of this run: past start-up, items flowing
    moments.append(f"during checkpoint write {max(_writing(where))}")

    # 3: just after restoring, as the first records of the run flow
    written = _lines(predictions)
    child = await _child(kafka, name, where, schedule)
    await _kill_when(child, lambda: _lines(predictions) > written, within=60)
    moments.append("right after restoring")

    # then it runs to the end
    child = await _child(kafka, name, where, schedule)
    _, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()[-3000:]

    weights = load_file(where / "final.safetensors")
    final = json.loads((where / "final.json").read_text())
    want = reference.state_dict()
    for key, value in want["model"].items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0)
    assert final["metrics"] == json.loads(json.dumps(want["metrics"]))
    assert final["versions"] == want["versions"]
    assert final["metrics"]["samples"] == N
    # the group's offset is what the last checkpoint committed: the end of the topic
    assert (await committed(kafka, name, name))[0] == N
    # the JSON Lines sink is cut back to its checkpointed length on restore: exactly once
    assert _lines(predictions) == N
    assert (where / "predictions.jsonl").read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    with capsys.disabled():
        print(
            f"\n[kill test {schedule}] {N} records, SIGKILL {', '.join(moments)}: final "
            "weights and counters equal an uninterrupted run's; the predictions file equals "
            "the uninterrupted run's (no line lost or twice)"
        )
