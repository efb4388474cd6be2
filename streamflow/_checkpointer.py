"""The checkpoint coordinator of a running flow: restore on start, checkpoint on a timer.

A checkpoint is taken at a *quiet* point, which the coordinator brings about: it pauses
every source between two runs of items, and waits until no item is inside the graph (every
channel empty, every stage parked on its empty inbox with nothing in flight). The graph's
state is then a consistent cut: every item a source handed out before its position has
been fully applied to every stage's state (held in a window, folded into a model, or
delivered), and no item after it has touched any. This is the aligned-barrier cut of
Chandy-Lamport with the barrier at the sources: nothing follows a barrier until the
snapshot is taken, so no stage needs to align its inputs or buffer items behind one. The
cost is one drain of the graph's in-flight items per checkpoint, reported as the pause.

Then, in order: every participant's ``snapshot()`` (async ones first; then the plain ones
in one pass without awaiting, so no timer runs in between); the states are encoded on a
worker thread and the sources resume; the checkpoint is written on a worker thread; and
once it is durable, participants' ``commit`` runs (sources commit their positions). With a
transactional sink the sources stay paused until its commit returned, so each transaction
holds exactly the output between two checkpoints.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ._checkpoint_store import StoredCheckpoint
from ._checkpoints import CheckpointError, CheckpointInfo, Checkpoints
from ._logging import get_logger
from ._snapshot_codec import StateTypeError, encode_state

if TYPE_CHECKING:
    from ._runners import Runner
    from ._source_runner import SourceRunner

__all__ = ["CheckpointStats", "Checkpointer"]

log = get_logger("streamflow")
_POLL = 0.0005  # seconds between looks while waiting for the flow to become quiet


@dataclass
class CheckpointStats:
    """What checkpointing did in this run (``running.checkpoints``)."""

    taken: int = 0
    """Checkpoints written in this run."""
    skipped: int = 0
    """Checkpoints given up (the flow did not become quiet within the timeout)."""
    failed: int = 0
    """Checkpoints whose write failed (an ``OSError``: disk full, ...); logged as
    ``checkpoint.failed``, the flow goes on and the checkpoint before still holds."""
    restored: int | None = None
    """The number of the checkpoint restored at start, or ``None``."""
    last: int | None = None
    """The number of the newest checkpoint written."""
    last_bytes: int = 0
    """Its size in bytes."""
    largest_bytes: int = 0
    """The size of the largest checkpoint written in this run."""
    pauses_s: list[float] = field(default_factory=list)
    """Per checkpoint, how long the sources were paused (seconds; the last 1024)."""
    writes_s: list[float] = field(default_factory=list)
    """Per checkpoint, how long encoding and writing took (seconds; the last 1024)."""


async def _call(method: Callable[..., Any], *args: Any) -> Any:
    result = method(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class Checkpointer:
    """Restores and takes the checkpoints of one run (see the module)."""

    def __init__(
        self,
        config: Checkpoints,
        flow: str,
        graph: dict[str, str],
        sources: Sequence[SourceRunner],
        runners: Sequence[Runner],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self.flow = flow
        self.graph = graph  # stage name -> kind: what a checkpoint must match
        self.sources = list(sources)
        self.runners = [r for r in runners if r not in self.sources and r.recv is not None]
        self.stages: dict[str, Any] = {}  # name -> participant (non-source)
        for runner in runners:
            part = runner.participant()
            if part is not None and runner not in self.sources:
                self.stages[runner.name] = part
        self.transactional = any(
            getattr(p, "transactional", False) is True for p in self.stages.values()
        )
        if self.transactional and config.keep < 2:
            raise CheckpointError(
                f"flow {flow!r}: a transactional sink needs Checkpoints(keep=2) or more: the "
                "checkpoint before the newest is the one to restore when the newest's "
                "transaction did not commit"
            )
        self.fail = fail
        self.stats = CheckpointStats()
        self.number = 0  # the next checkpoint's number
        self.entered = 0
        self.ended = 0
        self.all_entered = asyncio.Event()  # every source entered its context
        self.released = asyncio.Event()  # restore done: sources may pull
        self.sources_ended = asyncio.Event()
        self.final_done = asyncio.Event()  # the last checkpoint is taken (or given up)
        self.lock = asyncio.Lock()
        self.failure: BaseException | None = None

    # -- start: restore ----------------------------------------------------------------

    async def source_entered(self) -> None:
        """A source entered its context; returns once every participant is restored."""
        self.entered += 1
        if self.entered >= len(self.sources):
            self.all_entered.set()
        await self.released.wait()

    def source_ended(self) -> None:
        """A source handed out its last item (ended, or stopped to drain)."""
        self.ended += 1
        if self.ended >= len(self.sources):
            self.sources_ended.set()

    async def run(self) -> None:
        """The coordinator's task: restore, then checkpoint every ``every`` seconds; once
        every source has ended, the last checkpoint (the participants whose input ended
        wait for it). A failure fails the flow (``fail``)."""
        try:
            if self.sources:
                await self.all_entered.wait()
            for runner in self.runners:
                if runner.name in self.stages:
                    await runner.set_up.wait()
            await self._restore()
            self.released.set()
            while True:
                with anyio.move_on_after(self.config.every):
                    await self.sources_ended.wait()
                if self.sources_ended.is_set():
                    await self.take(final=True)
                    return
                await self.take()
        except Exception as exc:
            self.fail(exc)
        finally:
            self.released.set()
            self.final_done.set()

    async def _restore(self) -> None:
        store = self.config.store
        candidates = await anyio.to_thread.run_sync(
            store.candidates, None if self.transactional else 1
        )
        chosen: StoredCheckpoint | None = None
        for stored in candidates:
            self._check_graph(stored)
            if not self.transactional or await self._committed(stored):
                chosen = stored
                break
            log.warning(
                "checkpoint.uncommitted",
                flow=self.flow,
                checkpoint=stored.id,
                path=str(stored.path),
                why="its transaction did not commit; restoring the one before",
            )
        if candidates and chosen is None:
            raise CheckpointError(
                f"flow {self.flow!r}: no checkpoint in {store.path} matches the positions "
                "its sources' brokers have committed"
            )
        for source in self.sources:
            part = source.participant()
            if part is not None:
                position = None if chosen is None else chosen.positions.get(source.name)
                await self._restore_one(source.name, part, position)
        if chosen is not None:
            for name, part in self.stages.items():
                if name in chosen.states:
                    await self._restore_one(name, part, chosen.states[name])
            self.number = chosen.id + 1
            self.stats.restored = chosen.id
            log.info("checkpoint.restored", flow=self.flow, checkpoint=chosen.id)
        else:
            await self.take()  # checkpoint 0: where this flow began

    async def _restore_one(self, name: str, part: Any, state: Any) -> None:
        try:
            await _call(part.restore, state)
        except Exception as exc:
            raise CheckpointError(
                f"flow {self.flow!r}: stage {name!r} cannot restore its checkpointed state: "
                f"{type(exc).__name__}: {exc}",
                stage=name,
            ) from exc

    def _check_graph(self, stored: StoredCheckpoint) -> None:
        ours, theirs = self.graph, stored.graph
        missing = sorted(set(theirs) - set(ours))
        if missing:
            raise CheckpointError(
                f"flow {self.flow!r}: checkpoint {stored.path} was taken of a flow with "
                f"stage(s) {missing} that this flow does not have (renamed or removed); "
                "restore it with the flow it was taken of, or remove the directory"
            )
        changed = sorted(n for n in theirs if theirs[n] != ours[n])
        if changed:
            n = changed[0]
            raise CheckpointError(
                f"flow {self.flow!r}: in checkpoint {stored.path}, stage {n!r} is a "
                f"{theirs[n]} stage; in this flow it is a {ours[n]} stage"
            )
        for name in stored.states:
            if name not in self.stages and name in ours:
                raise CheckpointError(
                    f"flow {self.flow!r}: checkpoint {stored.path} holds state for stage "
                    f"{name!r}, which keeps no state in this flow"
                )

    async def _committed(self, stored: StoredCheckpoint) -> bool:
        for source in self.sources:
            check = getattr(source.spec.fn, "is_committed", None)
            if check is not None and not await _call(check, stored.positions.get(source.name)):
                return False
        return True

    # -- checkpoints -------------------------------------------------------------------

    async def take(self, *, final: bool = False) -> bool:
        """Take one checkpoint; False when it was skipped (the flow did not get quiet)."""
        async with self.lock:
            if self.failure is not None:
                return False
            t0 = time.perf_counter()
            for source in self.sources:
                source.pause()
            resumed = False
            try:
                captured = await self._quiet_snapshot()
                if captured is None:
                    self.stats.skipped += 1
                    log.warning(
                        "checkpoint.skipped",
                        flow=self.flow,
                        checkpoint=self.number,
                        why=f"the flow was not quiet within {self.config.timeout:g} s",
                    )
                    return False
                positions, states = captured
                number = self.number
                self.number += 1
                encoded = await anyio.to_thread.run_sync(_encode, states)
                if not self.transactional:
                    self._resume(t0)
                    resumed = True
                t1 = time.perf_counter()
                try:
                    path, size = await anyio.to_thread.run_sync(
                        self.config.store.write_encoded, number, self.graph, positions, encoded
                    )
                except OSError as exc:  # nothing was committed: the one before still holds
                    self.stats.failed += 1
                    log.error(
                        "checkpoint.failed", flow=self.flow, checkpoint=number, error=repr(exc)
                    )
                    return False
                await self._commit(number, positions, states)
                self._done(number, size, time.perf_counter() - t1)
                log.info(
                    "checkpoint.taken",
                    flow=self.flow,
                    checkpoint=number,
                    bytes=size,
                    path=str(path),
                    final=final,
                )
                return True
            finally:
                if not resumed:
                    self._resume(t0)

    def _resume(self, t0: float) -> None:
        _keep(self.stats.pauses_s, time.perf_counter() - t0)
        for source in self.sources:
            source.resume()

    def _done(self, number: int, size: int, seconds: float) -> None:
        stats = self.stats
        stats.taken += 1
        stats.last = number
        stats.last_bytes = size
        stats.largest_bytes = max(stats.largest_bytes, size)
        _keep(stats.writes_s, seconds)

    async def _quiet_snapshot(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Wait for a quiet flow and capture there the sources' positions and every
        participant's snapshot; ``None`` when the flow did not get quiet in time."""
        deadline = time.monotonic() + self.config.timeout
        while True:
            while not self._quiet():
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(_POLL)
            seen = self._moved()
            states: dict[str, Any] = {}
            plain: list[tuple[str, Any]] = []
            for name, part in self.stages.items():
                if inspect.iscoroutinefunction(part.snapshot):
                    states[name] = await part.snapshot()
                else:
                    plain.append((name, part))
            if not self._quiet() or self._moved() != seen:
                continue  # something moved while the async snapshots were taken: again
            for name, part in plain:  # no await from here: nothing else runs meanwhile
                states[name] = part.snapshot()
            positions = {}
            for source in self.sources:
                part = source.participant()
                positions[source.name] = None if part is None else part.snapshot()
            return positions, states

    def _quiet(self) -> bool:
        for source in self.sources:
            if not source.held:
                return False
        return all(runner.quiet() for runner in self.runners)

    def _moved(self) -> int:
        return sum(r.c.items_in + r.c.items_out for r in self.runners)

    async def _commit(self, number: int, positions: dict[str, Any], states: dict[str, Any]) -> None:
        """The checkpoint is durable: stages and sinks commit first (a transactional sink
        commits its output with the sources' positions), then the sources."""
        for name, part in self.stages.items():
            commit = getattr(part, "commit", None)
            if commit is not None:
                await self._commit_one(
                    name, commit, CheckpointInfo(number, states.get(name), positions)
                )
        for source in self.sources:
            part = source.participant()
            commit = getattr(part, "commit", None)
            if commit is not None:
                info = CheckpointInfo(number, positions[source.name], positions)
                await self._commit_one(source.name, commit, info)

    async def _commit_one(
        self, name: str, commit: Callable[..., Any], info: CheckpointInfo
    ) -> None:
        try:
            await _call(commit, info)
        except Exception as exc:
            self.failure = exc
            raise CheckpointError(
                f"flow {self.flow!r}: stage {name!r} failed to commit checkpoint "
                f"{info.number}: {type(exc).__name__}: {exc}",
                stage=name,
            ) from exc


def _encode(states: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every stage's state as JSON text and tensors (on a worker thread).

    :raises CheckpointError: a state holds a type a checkpoint cannot store (names the
        stage, the path to the value and its type).
    """
    encoded = {}
    for name, state in states.items():
        try:
            encoded[name] = encode_state(state, f"stage {name!r}")
        except StateTypeError as exc:
            raise CheckpointError(str(exc), stage=name) from exc
    return encoded


def _keep(samples: list[float], value: float) -> None:
    samples.append(value)
    if len(samples) > 1024:
        del samples[:512]
