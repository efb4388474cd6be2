"""Checkpoints in the runtime: a flow stopped at once (what a crash leaves) and started
again from its checkpoint directory continues with what it had learned, consistent with
its sources' positions. Real stages, real files, the public API."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
import structlog

import streamflow as sf
from streamflow.testing import MemorySource


def _newest(path: Path) -> Path:
    return sorted(p for p in path.iterdir() if p.name.startswith("ckpt-"))[-1]


def _read(path: Path) -> str:
    return path.read_text()


def _tear(checkpoint: Path) -> None:
    state_file = next(checkpoint.glob("state-*.json"))
    state_file.write_bytes(state_file.read_bytes()[:-3])  # a torn write


async def _crash_after(flow: sf.Flow, seconds: float) -> sf.RunningFlow:
    """Run ``flow`` for ``seconds``, then stop it without draining (like a crash: what is
    inside is abandoned, nothing after the last checkpoint is kept by it)."""
    async with flow.start() as running:
        await asyncio.sleep(seconds)
        await running.stop(drain=False)
    return running


def _sum_by_key(state: int | None, r: dict[str, int]) -> tuple[int, tuple[int, int, int]]:
    total = (state or 0) + r["v"]
    return total, (r["k"], r["i"], total)


def _summing_flow(path: Path, src: MemorySource[Any], out: list[Any], every: float) -> sf.Flow:
    flow = sf.Flow("sums", checkpoints=sf.Checkpoints(path, every=every))
    (
        flow.source("src", src)
        .key_by("by_k", lambda r: r["k"])
        .stateful_map("sum", _sum_by_key)
        .sink("out", sf.collect(out))
    )
    return flow


READINGS = [{"k": i % 5, "v": i, "i": i} for i in range(300)]


@pytest.mark.asyncio
async def test_keyed_state_survives_a_crash_consistent_with_the_position(tmp_path: Path) -> None:
    out: list[tuple[int, int, int]] = []
    first = await _crash_after(
        _summing_flow(tmp_path, MemorySource(READINGS, delay=0.001), out, 0.03), 0.15
    )
    assert first.checkpoints is not None and first.checkpoints.taken >= 2
    before = len(out)
    assert 0 < before < len(READINGS)

    again = _summing_flow(tmp_path, MemorySource(READINGS), out, 0.03)
    async with again.start() as running:
        await running.wait()
    stats = running.checkpoints
    assert stats is not None and stats.restored == first.checkpoints.last

    # every reading reached the sink (at least once), and each key's final total is exactly
    # the uninterrupted one: no reading was added twice or lost from the state
    assert {i for _, i, _ in out} == set(range(len(READINGS)))
    final = {k: total for k, _, total in out}
    assert final == {k: sum(r["v"] for r in READINGS if r["k"] == k) for k in range(5)}
    # duplicates only of readings after the restored checkpoint's position
    seen: dict[int, int] = {}
    for _, i, total in out:
        if i in seen:
            assert seen[i] == total  # the same output again, not another state
        seen[i] = total
    assert len(out) - len(READINGS) <= before


@pytest.mark.asyncio
async def test_a_drained_flow_takes_a_last_checkpoint_and_a_rerun_adds_nothing(
    tmp_path: Path,
) -> None:
    out: list[Any] = []
    flow = _summing_flow(tmp_path, MemorySource(READINGS), out, 10.0)
    async with flow.start() as running:
        await running.wait()
    stats = running.checkpoints
    assert stats is not None and stats.taken == 2  # checkpoint 0 at the start, the last one
    assert len(out) == len(READINGS)

    rerun = _summing_flow(tmp_path, MemorySource(READINGS), out, 10.0)
    async with rerun.start() as running:
        await running.wait()
    assert len(out) == len(READINGS)  # the position was at the end: nothing again
    assert running.checkpoints is not None and running.checkpoints.restored == stats.last


WINDOWS = {
    "tumbling": (sf.Tumbling(1.0), None),
    "tumbling aggregate": (sf.Tumbling(1.0), (lambda: 0, lambda n, e: n + 1)),
    "sliding": (sf.Sliding(1.0, every=0.5), None),
    "session": (sf.Session(gap=0.3), None),
    "count": (sf.Count(7), None),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", list(WINDOWS))
async def test_open_windows_survive_a_crash(tmp_path: Path, shape: str) -> None:
    rng = random.Random(7)
    events = [
        {"k": f"s{rng.randrange(4)}", "ts": i * 0.05 + rng.random() * 0.2, "i": i}
        for i in range(400)
    ]
    windower, aggregate = WINDOWS[shape]

    def summary(w: sf.Window[Any]) -> tuple[Any, ...]:
        content = w.value if aggregate is not None else tuple(e["i"] for e in w.items)
        return (w.key, round(w.start, 9), round(w.end, 9), content)

    def build(src: MemorySource[Any], out: list[Any], path: Path | None) -> sf.Flow:
        flow = sf.Flow("windows", checkpoints=sf.Checkpoints(path, every=0.03) if path else None)
        (
            flow.source("src", src)
            .key_by("by_k", lambda e: e["k"])
            .window("w", windower, time=lambda e: e["ts"], lateness=0.5, aggregate=aggregate)
            .map("summary", summary)
            .sink("out", sf.collect(out))
        )
        return flow

    reference: list[Any] = []
    await build(MemorySource(events), reference, None).run()

    emitted: list[Any] = []
    first = MemorySource(events, delay=0.0005)
    await _crash_after(build(first, emitted, tmp_path), 0.12)
    assert len(emitted) > 0 and first.taken < len(events)  # it crashed midway
    async with build(MemorySource(events), emitted, tmp_path).start() as running:
        await running.wait()
    assert running.checkpoints is not None and running.checkpoints.restored is not None

    # together, before and after the crash, the windows equal the uninterrupted run's; a
    # window emitted before the crash and after the checkpoint comes again, the same
    assert sorted(set(emitted)) == sorted(reference)
    assert len(set(reference)) == len(reference)


class SequentialLearner(sf.Stage[tuple[float, float], float]):
    """A one-weight model trained by plain SGD per item: state in a user Stage."""

    def __init__(self) -> None:
        self.w = 0.0
        self.seen = 0

    def process(self, item: tuple[float, float]) -> float:
        x, y = item
        pred = self.w * x
        self.w -= 0.01 * (pred - y) * x
        self.seen += 1
        return pred

    def snapshot(self) -> dict[str, Any]:
        return {"w": self.w, "seen": self.seen}

    def restore(self, state: dict[str, Any]) -> None:
        self.w, self.seen = state["w"], state["seen"]


@pytest.mark.asyncio
async def test_a_user_stage_with_snapshot_learns_each_item_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(3)
    pairs = [(x, 3.0 * x) for x in (rng.uniform(-1, 1) for _ in range(500))]

    def build(src: MemorySource[Any], learner: SequentialLearner) -> sf.Flow:
        flow = sf.Flow("learn", checkpoints=sf.Checkpoints(tmp_path, every=0.02))
        flow.source("src", src).map("learn", learner).sink("out", sf.collect([]))
        return flow

    reference = SequentialLearner()
    for pair in pairs:
        reference.process(pair)

    first = MemorySource(pairs, delay=0.0005)
    await _crash_after(build(first, SequentialLearner()), 0.1)
    assert 0 < first.taken < len(pairs)
    learner = SequentialLearner()  # a fresh process: nothing learned in memory
    async with build(MemorySource(pairs), learner).start() as running:
        await running.wait()
    assert learner.seen == len(pairs)
    assert learner.w == pytest.approx(reference.w, abs=1e-12)


@pytest.mark.asyncio
async def test_a_restart_with_concurrency_and_batches_keeps_the_state_exact(tmp_path: Path) -> None:
    """Items in flight in a concurrent stage and in a half-full batch are part of no
    checkpoint: the checkpoint waits until they are through."""
    out: list[Any] = []

    async def slow(r: dict[str, int]) -> dict[str, int]:
        await asyncio.sleep(random.random() * 0.002)
        return r

    def build(src: MemorySource[Any]) -> sf.Flow:
        flow = sf.Flow("busy", checkpoints=sf.Checkpoints(tmp_path, every=0.02))
        (
            flow.source("src", src)
            .map("slow", slow, concurrency=8)
            .batch("b", 7, max_wait=0.01)
            .unbatch("u")
            .key_by("by_k", lambda r: r["k"])
            .stateful_map("sum", _sum_by_key)
            .sink("out", sf.collect(out))
        )
        return flow

    first = MemorySource(READINGS, delay=0.0005)
    await _crash_after(build(first), 0.1)
    assert 0 < first.taken < len(READINGS)
    async with build(MemorySource(READINGS)).start() as running:
        await running.wait()
    final = {k: total for k, _, total in out}
    assert final == {k: sum(r["v"] for r in READINGS if r["k"] == k) for k in range(5)}


@pytest.mark.asyncio
async def test_an_iterate_source_resumes_after_what_it_handed_out(tmp_path: Path) -> None:
    totals: list[Any] = []

    def build() -> sf.Flow:
        flow = sf.Flow("it", checkpoints=sf.Checkpoints(tmp_path, every=10.0))
        (
            flow.source("nums", [{"k": 0, "v": i, "i": i} for i in range(50)])
            .key_by("by_k", lambda r: r["k"])
            .stateful_map("sum", _sum_by_key)
            .sink("out", sf.collect(totals))
        )
        return flow

    await build().run()
    await build().run()  # restored at the end of the list: nothing again
    assert len(totals) == 50 and totals[-1][2] == sum(range(50))


@pytest.mark.asyncio
async def test_a_checkpoint_of_another_graph_is_refused_naming_the_difference(
    tmp_path: Path,
) -> None:
    await _summing_flow(tmp_path, MemorySource(READINGS[:10]), [], 10.0).run()

    renamed = sf.Flow("sums", checkpoints=sf.Checkpoints(tmp_path))
    renamed.source("src", MemorySource(READINGS[:10])).key_by(
        "by_k", lambda r: r["k"]
    ).stateful_map("total", _sum_by_key).sink("out", sf.collect([]))
    with pytest.raises(sf.StageError, match=r"stage\(s\) \['sum'\].*does not have") as caught:
        await renamed.run()
    assert isinstance(caught.value.cause, sf.CheckpointError)
    assert caught.value.phase == "checkpoint"

    stateless = sf.Flow("sums", checkpoints=sf.Checkpoints(tmp_path))
    stateless.source("src", MemorySource(READINGS[:10])).key_by("by_k", lambda r: r["k"]).map(
        "sum", lambda r: r
    ).sink("out", sf.collect([]))
    with pytest.raises(sf.StageError, match="state for stage 'sum', which keeps no state"):
        await stateless.run()

    rekinded = sf.Flow("sums", checkpoints=sf.Checkpoints(tmp_path))
    rekinded.source("src", MemorySource(READINGS[:10])).map("by_k", lambda r: r).key_by(
        "k", lambda r: r["k"]
    ).stateful_map("sum", _sum_by_key).sink("out", sf.collect([]))
    with pytest.raises(sf.StageError, match="'by_k' is a key_by stage; in this flow it is a map"):
        await rekinded.run()


@pytest.mark.asyncio
async def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path) -> None:
    out: list[Any] = []
    await _crash_after(
        _summing_flow(tmp_path, MemorySource(READINGS, delay=0.001), out, 0.02), 0.12
    )
    newest = _newest(tmp_path)
    _tear(newest)

    with structlog.testing.capture_logs() as logs:
        async with _summing_flow(tmp_path, MemorySource(READINGS), out, 10.0).start() as running:
            await running.wait()
    skipped = [e for e in logs if e["event"] == "checkpoint.skipped"]
    assert skipped and str(newest) in skipped[0]["path"]
    assert running.checkpoints is not None
    assert running.checkpoints.restored == int(newest.name.split("-")[1]) - 1
    final = {k: total for k, _, total in out}
    assert final == {k: sum(r["v"] for r in READINGS if r["k"] == k) for k in range(5)}


@pytest.mark.asyncio
async def test_state_a_checkpoint_cannot_store_fails_the_flow_naming_stage_and_type(
    tmp_path: Path,
) -> None:
    class Opaque:
        pass

    flow = sf.Flow("bad", checkpoints=sf.Checkpoints(tmp_path))
    flow.source("src", [1, 2, 3]).key_by("by", lambda x: x % 2).stateful_map(
        "keep", lambda s, x: (Opaque(), x)
    ).sink("out", sf.collect([]))
    with pytest.raises(sf.StageError) as caught:
        await flow.run()
    assert caught.value.stage == "keep"
    assert "Opaque" in str(caught.value) and "'keep'" in str(caught.value)


def test_checkpoints_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every"):
        sf.Checkpoints(tmp_path, every=0)
    with pytest.raises(ValueError, match="keep"):
        sf.Checkpoints(tmp_path, keep=0)
    with pytest.raises(sf.GraphError, match="sf.Checkpoints"):
        sf.Flow("f", checkpoints=str(tmp_path))  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_checkpoints_are_written_off_the_loop_and_their_manifest_names_the_graph(
    tmp_path: Path,
) -> None:
    await _summing_flow(tmp_path, MemorySource(READINGS[:20]), [], 10.0).run()
    manifest = json.loads(_read(_newest(tmp_path) / "manifest.json"))
    assert manifest["graph"] == {
        "src": "source", "by_k": "key_by", "sum": "map", "out": "sink",
    }  # fmt: skip
    assert set(manifest["stages"]) == {"sum"}


def test_describe_says_what_is_checkpointed_and_which_source_cannot_seek(tmp_path: Path) -> None:
    async def numbers() -> Any:  # a plain async generator cannot seek
        yield 1

    flow = sf.Flow("shown", checkpoints=sf.Checkpoints(tmp_path, every=2.0))
    a = flow.source("a", MemorySource([1]))
    b = flow.source("b", numbers())
    sf.merge("both", a, b).key_by("k", lambda x: x).stateful_map("s", _sum_by_key).sink(
        "out", sf.collect([])
    )
    text = str(flow.describe())
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "Checkpoints(" in text.splitlines()[0] and "every=2.0" in text.splitlines()[0]
    assert "position=checkpointed" in lines["a"]
    assert "position=none" in lines["b"]
    assert "state=checkpointed" in lines["s"] and "state=" not in lines["out"]


@pytest.mark.asyncio
async def test_a_quiet_source_that_cannot_seek_does_not_hold_checkpoints_back(
    tmp_path: Path,
) -> None:
    """An async generator waiting for its next item (it has no position to keep) counts as
    paused: checkpoints go on every ``every`` seconds, the other source's too."""
    gate = asyncio.Event()

    async def rarely() -> Any:
        await gate.wait()
        yield {"k": 9, "v": 1, "i": -1}

    out: list[Any] = []
    flow = sf.Flow("quiet", checkpoints=sf.Checkpoints(tmp_path, every=0.02, timeout=5.0))
    busy = flow.source("busy", MemorySource(READINGS, delay=0.001))
    sf.merge("both", busy, flow.source("rare", rarely())).key_by(
        "by_k", lambda r: r["k"]
    ).stateful_map("sum", _sum_by_key).sink("out", sf.collect(out))
    async with flow.start() as running:
        await asyncio.sleep(1.0)
        gate.set()
        await running.wait()
    stats = running.checkpoints
    assert stats is not None and stats.taken >= 10 and stats.skipped == 0
    assert max(stats.pauses_s) < 0.5
    assert {i for _, i, _ in out} == set(range(len(READINGS))) | {-1}


class FlakyStore(sf.DirectoryStore):
    """A store whose second write fails, as a full disk would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes = 0

    def write_encoded(self, checkpoint: int, *args: Any) -> Any:
        self.writes += 1
        if self.writes == 2:
            raise OSError(28, "No space left on device")
        return super().write_encoded(checkpoint, *args)


@pytest.mark.asyncio
async def test_a_failed_write_is_logged_and_the_flow_goes_on(tmp_path: Path) -> None:
    out: list[Any] = []
    flow = sf.Flow("disk", checkpoints=sf.Checkpoints(FlakyStore(tmp_path), every=0.02))
    flow.source("src", MemorySource(READINGS, delay=0.0005)).key_by(
        "by_k", lambda r: r["k"]
    ).stateful_map("sum", _sum_by_key).sink("out", sf.collect(out))
    with structlog.testing.capture_logs() as logs:
        async with flow.start() as running:
            await running.wait()
    stats = running.checkpoints
    assert stats is not None and stats.failed == 1 and stats.taken >= 3
    failed = [e for e in logs if e["event"] == "checkpoint.failed"]
    assert len(failed) == 1 and "No space left" in failed[0]["error"]
    assert len(out) == len(READINGS)
