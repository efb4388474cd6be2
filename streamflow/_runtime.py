"""A running flow: wires channels between runners, supervises them, drains and stops."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._channel import Channel, ReceiveEnd
from ._checkpointer import Checkpointer, CheckpointStats
from ._devices import WorkerPool
from ._errors import ChannelClosed, StageError
from ._flowstate import FlowState
from ._logging import get_logger
from ._loops import LOOP_RUNNERS
from ._message import DROPPED, Message, _Ack, _Notifying
from ._metrics import StageMetrics
from ._runners import BatchRunner, FunctionRunner, Runner, UnbatchRunner
from ._signals import Interrupted, wait_stopping_on_signals
from ._source_runner import SourceRunner
from ._spec import FlowSpec, StageSpec
from ._stage import Stage
from ._window_runner import FusedRunner, WindowRunner

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["RunOwner", "RunningFlow"]

log = get_logger("streamflow")


class RunOwner(Protocol):
    """Who started a run (the :class:`~streamflow.Flow`): the one hand-off between a run and
    the builder. ``run_starting`` raises if the owner has a run going already;
    ``run_ended`` gets the run's last metrics."""

    def run_starting(self) -> None: ...

    def run_ended(self, metrics: dict[str, StageMetrics]) -> None: ...


class RunningFlow:
    """A started flow (from ``flow.start()``): stop it, wait for it, read its metrics and
    its :attr:`state`.

    Use it as an async context manager; leaving the block drains the flow. When the flow
    fails or is stopped without draining, every item still inside it is acked at once with
    :attr:`~streamflow.Outcome.ABORTED` (so a request waiting on its ``on_ack`` fails, never
    hangs), and its ``Channel`` sources are closed: sending into them raises
    :class:`~streamflow.ChannelClosed` saying why.
    """

    def __init__(self, spec: FlowSpec, owner: RunOwner | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._owner = owner
        self.pool = WorkerPool()
        self._runners: list[Runner] = []
        self._by_name: dict[str, Runner] = {}
        self._sources: list[SourceRunner] = []
        self._inboxes: dict[str, Channel[Message[Any]]] = {}
        self._failure: StageError | None = None
        self._pending = 0
        self._pending_workers = 0
        self._finished = anyio.Event()
        self._drained = anyio.Event()
        self._tg: TaskGroup | None = None
        self._started_at = 0.0
        self._stop_reason = "completed"
        self._state = FlowState.STARTING
        self._live: set[_Ack] = set()  # acks with an on_ack, not fired yet
        self.checkpointer: Checkpointer | None = None

    @property
    def state(self) -> FlowState:
        """Where the flow is: starting, running, draining, stopped or failed (see
        :class:`~streamflow.FlowState`); what a health check reads."""
        return self._state

    @property
    def checkpoints(self) -> CheckpointStats | None:
        """What checkpointing did in this run (``None`` without ``checkpoints=``)."""
        return None if self.checkpointer is None else self.checkpointer.stats

    @property
    def error(self) -> StageError | None:
        """The failure that stopped the flow (state ``failed``), else ``None``."""
        return self._failure

    # -- life cycle --------------------------------------------------------------------

    async def __aenter__(self) -> RunningFlow:
        if self._owner is not None:
            self._owner.run_starting()
        try:
            self._wire(self.spec)
        except BaseException:
            self._hand_back({})
            raise
        self._started_at = time.perf_counter()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.checkpointer is not None:
            self._tg.start_soon(self.checkpointer.run, name=f"streamflow:{self.name}:checkpoints")
        for runner in self._runners:
            self._tg.start_soon(runner.run, name=f"streamflow:{self.name}:{runner.name}")
        self._state = FlowState.RUNNING
        log.info("flow.start", flow=self.name, stages=[r.name for r in self._runners])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        tg = self._tg
        if exc_type is None:
            try:
                await self.stop(drain=True)
            except BaseException as caught:  # cancelled: a stage failed or our caller was
                exc_type, exc, tb = type(caught), caught, caught.__traceback__
        if exc is not None:  # not drained: nothing still inside may wait for the teardown
            self._abort(f"flow {self.name!r} was stopped")
        if isinstance(exc, anyio.get_cancelled_exc_class()) and self._failure is None:
            self._stop_reason = "cancelled"
        swallowed = False
        try:
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                # an error in the user's block: stop without draining, re-raise it unchanged
                if not isinstance(exc, Interrupted):
                    self._stop_reason = "error"
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
            else:
                swallowed = bool(await tg.__aexit__(exc_type, exc, tb))
        finally:
            with anyio.CancelScope(shield=True):
                await self.pool.aclose()
            self._finish()
        if self._failure is not None:
            raise self._failure
        if exc is None:
            return False
        if swallowed:
            return True
        raise exc.with_traceback(tb)

    def _hand_back(self, metrics: dict[str, StageMetrics]) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.run_ended(metrics)

    def _finish(self) -> None:
        if self._state != FlowState.FAILED:
            self._state = FlowState.STOPPED
        self._abort(f"flow {self.name!r} has stopped")  # nothing may wait on a finished flow
        metrics = self.metrics()
        self._hand_back(metrics)
        if self._failure is not None:
            self._stop_reason = "failed"
        elif self._stop_reason == "completed" and not self._finished.is_set():
            self._stop_reason = "cancelled"
        totals = {name: m.items_out for name, m in metrics.items() if m.kind == "sink"}
        log.info(
            "flow.stop",
            flow=self.name,
            reason=self._stop_reason,
            duration_s=round(time.perf_counter() - self._started_at, 6),
            delivered=totals,
            error=None if self._failure is None else str(self._failure),
        )

    async def stop(self, drain: bool = True) -> None:
        """Stop the flow and wait until it has stopped.

        ``drain=True``: sources stop pulling, every item already taken reaches the sinks (and
        is acked), then stages tear down; a ``Channel`` source is closed (sending into it
        raises :class:`~streamflow.ChannelClosed`) and what it holds is still handled.
        ``drain=False``: cancel at once; every item still inside is acked ``ABORTED``, which
        at-least-once connectors do not commit, so they deliver it again.
        """
        if not drain:
            self._stop_at_once("cancelled")
            await self._finished.wait()
            return
        if self._stop_reason == "completed" and not self._finished.is_set():
            self._stop_reason = "stopped"
        if self._state == FlowState.RUNNING:
            self._state = FlowState.DRAINING
        for source in self._sources:
            if isinstance(source.spec.fn, Channel):
                # ends once what it holds is taken: items already sent are not lost
                source.spec.fn.close(f"flow {self.name!r} is draining: it takes no more items")
            else:
                source.stop()
        await self._finished.wait()

    def _stop_at_once(self, reason: str) -> None:
        """Begin a stop without draining, and ack what is inside ``ABORTED`` (no waiting)."""
        if self._stop_reason == "completed" and not self._finished.is_set():
            self._stop_reason = reason
        if self._state in (FlowState.STARTING, FlowState.RUNNING, FlowState.DRAINING):
            self._state = FlowState.STOPPED
        for source in self._sources:
            source.stop()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._abort(f"flow {self.name!r} was stopped")

    def _abort(self, why: str) -> None:
        """Close the ``Channel`` sources (senders get ``why``) and ack ``ABORTED`` what they
        hold and every item still inside the flow. Idempotent."""
        if self._failure is not None:
            why = f"flow {self.name!r} failed: {self._failure}"
        for source in self._sources:
            channel = source.spec.fn
            if isinstance(channel, Channel):
                channel.close(why)
                while True:
                    try:
                        item = channel.receive_nowait()
                    except (asyncio.QueueEmpty, ChannelClosed):
                        break
                    if isinstance(item, Message) and item._ack is not None:
                        self._abort_ack(item._ack)
        while self._live:
            self._abort_ack(self._live.pop())

    def _abort_ack(self, ack: _Ack) -> None:
        if isinstance(ack, _Notifying):
            ack.live = None
        try:
            ack.abort()
        except Exception as exc:  # one bad on_ack must not keep the others from failing
            log.error("ack.error", flow=self.name, outcome="aborted", error=repr(exc))

    async def wait(self, *, stop_on_signals: bool = False, drain_timeout: float = 30.0) -> None:
        """Wait until every source is exhausted and every item has been handled.

        ``stop_on_signals=True`` (main thread only): while waiting, the first SIGINT or
        SIGTERM stops the sources and drains the flow, and ``wait`` returns normally once it
        has drained; a second signal, or ``drain_timeout`` seconds without the drain
        finishing, stops it at once. The previous handlers are restored afterwards.

        :raises Interrupted: stopped at once by a second signal or the drain timeout.
        """
        if stop_on_signals:
            await wait_stopping_on_signals(self, drain_timeout)
        else:
            await self._finished.wait()

    def metrics(self) -> dict[str, StageMetrics]:
        """Per-stage counters, queue depth, busy fraction and latency, by stage name."""
        result = {}
        for runner in self._runners:
            inbox = self._inboxes.get(runner.name)
            depth, capacity = (len(inbox), inbox.capacity) if inbox is not None else (0, 0)
            result[runner.name] = runner.c.snapshot(runner.name, runner.spec.kind, depth, capacity)
            stage = runner.spec.fn
            if isinstance(stage, Stage):
                result.update(stage.sub_metrics())
        return result

    # -- called by runners -------------------------------------------------------------

    def fail(self, error: StageError) -> None:
        """Record a stage failure and cancel the whole flow. The first failure is what the
        flow raises; one that comes while the flow is stopping is logged and attached to it
        (``also``), so two stages failing at once are both reported."""
        log.error(
            "stage.error",
            flow=self.name,
            stage=error.stage,
            policy="fail",
            item=error.item,
            phase=error.phase,
            meta=error.meta,
            error=repr(error.cause),
            first=self._failure is None,
        )
        if self._failure is None:
            self._failure = error
            self._state = FlowState.FAILED
        elif error is not self._failure:
            self._failure.attach(error)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._abort(f"flow {self.name!r} failed: {self._failure}")

    def _checkpoint_failed(self, exc: BaseException) -> None:
        stage = getattr(exc, "stage", None) or "checkpoints"
        self.fail(StageError(stage, None, exc, flow=self.name, phase="checkpoint"))

    def runner_done(self, runner: Runner) -> None:
        self._pending -= 1
        if not isinstance(runner, SourceRunner):
            self._pending_workers -= 1
            if self._pending_workers == 0:
                self._drained.set()
        if self._pending == 0:
            if self._state != FlowState.FAILED:
                self._state = FlowState.STOPPED
            self._finished.set()

    async def wait_drained(self) -> None:
        await self._drained.wait()

    # -- wiring ------------------------------------------------------------------------

    def _wire(self, spec: FlowSpec) -> None:
        stages = [s for s in spec.stages if s.kind != "merge"]
        fused = {  # window stage -> the key_by fused into it
            s.name: key[0] for s in stages if (key := (s.options or {}).get("key")) is not None
        }
        deepest = {key_by: spec[window].capacity for window, key_by in fused.items()}
        for stage in stages:
            if stage.has_inbox and stage.name not in fused:  # a fused window reads its key_by's
                self._inboxes[stage.name] = Channel(
                    max(stage.capacity, deepest.get(stage.name, 0)),
                    stage.overflow,
                    on_drop=self._dropper(stage.name),
                )
        made: dict[str, Runner] = {}
        for stage in stages:
            if stage.loop == "fused":  # runs inside the window stage it feeds
                runner: Runner = FusedRunner(self, stage, None)
            elif stage.name in fused:
                key_by = made[fused[stage.name]]
                shared = self._inboxes[key_by.name]
                runner = WindowRunner(self, stage, shared.receiver(), key_by=key_by)
            else:
                inbox = self._inboxes.get(stage.name)
                runner = self._runner(stage, inbox.receiver() if inbox is not None else None)
            if stage.loop != "fused":
                for reader in stage.outputs:
                    runner.connect(self._inboxes[reader].sender(), reader)
            made[stage.name] = runner
            self._runners.append(runner)
            if isinstance(runner, SourceRunner):
                runner.live = self._live
                self._sources.append(runner)
        self._by_name = {runner.name: runner for runner in self._runners}
        if spec.checkpoints is not None:
            self.checkpointer = Checkpointer(
                spec.checkpoints,
                self.name,
                {s.name: s.kind for s in spec.stages},
                self._sources,
                self._runners,
                self._checkpoint_failed,
            )
        self._pending = len(self._runners)
        self._pending_workers = len(self._runners) - len(self._sources)

    def _runner(self, spec: StageSpec, recv: ReceiveEnd[Message[Any]] | None) -> Runner:
        if spec.kind == "source":
            return SourceRunner(self, spec)
        assert recv is not None
        if spec.kind == "batch":
            return BatchRunner(self, spec, recv)
        if spec.kind == "unbatch":
            return UnbatchRunner(self, spec, recv)
        if spec.kind == "window":
            return WindowRunner(self, spec, recv)
        return FunctionRunner(self, spec, recv, LOOP_RUNNERS[spec.loop])

    def _dropper(self, stage: str) -> Any:
        def dropped(msg: Message[Any]) -> None:
            self._by_name[stage].c.dropped += 1
            msg._done(DROPPED)

        return dropped
