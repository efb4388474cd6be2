"""The task behind each stage: its life cycle, and how its items leave it.

A runner is built from a :class:`~streamflow._spec.StageSpec` and talks to the running flow
through the narrow :class:`Supervisor` protocol. Function stages (``map``, ``filter``,
``flat_map``, ``sink``) hand their items to the loop strategy their spec names
(:mod:`streamflow._loops`); what a kind does with a result is in :mod:`streamflow._kinds`, the
error policy in :mod:`streamflow._recovery`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._calls import Invoker, is_async
from ._channel import ReceiveEnd, SendEnd
from ._checkpoints import participant_of
from ._devices import Worker, WorkerPool
from ._errors import ChannelFull, StageError
from ._kinds import settle_for
from ._message import FILTERED, Message, _AckGroup
from ._metrics import Counters
from ._policy import DeadLetter, Retry
from ._recovery import Recovery
from ._spec import StageSpec, called
from ._stage import Stage, StageContext
from ._state import StatefulMap

if TYPE_CHECKING:
    from ._cuda import CudaPlacement

__all__ = ["BatchRunner", "FunctionRunner", "Runner", "Supervisor", "UnbatchRunner"]

_perf = time.perf_counter


class CheckpointHooks(Protocol):
    """What a runner needs from the flow's checkpoint coordinator."""

    final_done: asyncio.Event  # the last checkpoint is taken (or given up)
    released: asyncio.Event  # every participant is restored: items may flow

    async def source_entered(self) -> None: ...

    def source_ended(self) -> None: ...


class Supervisor(Protocol):
    """What a runner needs from the running flow."""

    name: str
    pool: WorkerPool

    @property
    def checkpointer(self) -> CheckpointHooks | None: ...

    def fail(self, error: StageError) -> None: ...

    def runner_done(self, runner: Runner) -> None: ...

    async def wait_drained(self) -> None: ...


class Runner:
    """One stage's task. Subclasses implement ``_body``; ``run`` reports how it ended."""

    def __init__(
        self, rt: Supervisor, spec: StageSpec, recv: ReceiveEnd[Message[Any]] | None
    ) -> None:
        self.rt = rt
        self.spec = spec
        self.name = spec.name
        self.recv = recv
        self.sends: list[SendEnd[Message[Any]]] = []
        self.out_names: list[str] = []
        self.c = Counters()
        # put(run): send a run at once if it fits (one output only); False: await emit(run)
        self.put: Callable[[list[Message[Any]]], bool] = _refuse
        self.set_up = asyncio.Event()  # its setup is done (a checkpoint restores it then)
        # not reading its input and holding no item: done with its input and waiting for
        # the flow's last checkpoint, or not started yet
        self.resting = False
        self.finished = False

    def participant(self) -> Any:
        """What takes part in checkpoints for this stage (see ``Snapshotting``), or None."""
        return None

    def quiet(self) -> bool:
        """Whether no item is in this stage's hands or its inbox (a checkpoint waits for a
        quiet flow)."""
        if self.finished or self.resting:
            return True
        recv = self.recv
        return recv is not None and recv.idle and not len(recv.channel)

    async def _wait_last_checkpoint(self) -> None:
        """A participant whose input ended stays open (its outputs too) until the flow's
        last checkpoint is taken, so that checkpoint still holds its state and can commit."""
        checkpointer = self.rt.checkpointer
        if checkpointer is not None and self.participant() is not None:
            self.resting = True
            await checkpointer.final_done.wait()

    def connect(self, send: SendEnd[Message[Any]], reader: str) -> None:
        """Add an output channel, read by the stage named ``reader``."""
        self.sends.append(send)
        self.out_names.append(reader)
        self.put = self.sends[0].put_run if len(self.sends) == 1 else _refuse

    async def run(self) -> None:
        try:
            await self._body()
        except StageError as exc:
            self.rt.fail(exc)
        except Exception as exc:  # a bug or a failing context manager: still name the stage
            self.rt.fail(StageError(self.name, None, exc, flow=self.rt.name, phase="run"))
        finally:
            self.finished = True
            self.set_up.set()
            self.close_outputs()
            self.c.stopped = _perf()
            self.rt.runner_done(self)

    def close_outputs(self) -> None:
        for send in self.sends:
            send.close()

    async def _body(self) -> None:
        raise NotImplementedError

    async def emit(self, msgs: list[Message[Any]]) -> None:
        """Send a run of messages to every output, in order (a copy for each extra one).

        :raises StageError: an output with ``overflow="error"`` was full (names its stage).
        """
        sends = self.sends
        if len(sends) == 1:
            if not sends[0].put_run(msgs):
                await self._send(0, msgs)
            return
        runs = [msgs] + [[m._derive(m.value) for m in msgs] for _ in sends[1:]]
        for i, (send, run) in enumerate(zip(sends, runs, strict=True)):
            if not send.put_run(run):
                await self._send(i, run)

    async def _send(self, i: int, msgs: Sequence[Message[Any]]) -> None:
        try:
            await self.sends[i].send_run(msgs)
        except ChannelFull as exc:
            stage, item = self.out_names[i], msgs[-1]
            raise StageError(stage, item.value, exc, flow=self.rt.name, meta=item.meta) from None


def _refuse(msgs: list[Message[Any]]) -> bool:
    return False


class FunctionRunner(Runner):
    """map, filter, flat_map and sink: a function per item, the stage's error policy, and
    the loop strategy its spec names."""

    def __init__(
        self,
        rt: Supervisor,
        spec: StageSpec,
        recv: ReceiveEnd[Message[Any]],
        loop: Callable[[FunctionRunner], Awaitable[None]],
    ) -> None:
        super().__init__(rt, spec, recv)
        self.loop = loop  # the strategy spec.loop names (see _loops)
        self.stage: Stage[Any, Any] | None = spec.fn if isinstance(spec.fn, Stage) else None
        self.fn = called(spec.kind, spec.fn)
        device = spec.device
        self.cuda: CudaPlacement | None = None
        self.worker: Worker | None = None
        if device is not None:
            key = device
            if device.startswith("cuda"):
                from ._cuda import CudaPlacement  # needs torch: only for stages on a GPU

                self.cuda = CudaPlacement(device)
                # a thread per GPU stage: it waits for its stage's event, and a thread shared
                # by two stages would keep their streams from ever working at the same time
                key = f"{device}/{spec.name}"
            elif device == "cpu":  # the flow's own threads, as many as the stage runs at once
                key = f"cpu/{spec.name}"
            self.worker = rt.pool.get(key, threads=spec.concurrency)
        self.invoke = Invoker(
            self.fn,
            worker=self.worker,
            materialize=spec.kind == "flat_map",
            wrap=self.cuda.wrap if self.cuda is not None else None,
        )
        self.settle = settle_for(spec.kind)
        if isinstance(spec.fn, StatefulMap):
            self.c.state = spec.fn.counts  # its metrics report the keys it holds
        self.recover = Recovery(
            rt.name, spec.name, spec.kind, spec.errors, self.invoke, self.c, envelope=spec.envelope
        )

    def participant(self) -> Any:
        return participant_of(self.spec.fn)

    async def _body(self) -> None:
        async with AsyncExitStack() as stack:
            await self._open(stack)
            self.set_up.set()
            await self.loop(self)
            await self._wait_last_checkpoint()

    async def pass_on(self, ok: list[Message[Any]], results: list[Any], now: float) -> None:
        """Settle the items whose call succeeded (``results``, in order) and send on what
        goes on: the end of every loop but the inline one's hot path."""
        out = self.settle(ok, results, self.c, now)
        if out and not self.put(out):
            await self.emit(out)

    async def _open(self, stack: AsyncExitStack) -> None:
        """Enter what the stage holds: a Stage's life cycle, a sink's and dead-letter's context."""
        spec = self.spec
        if self.cuda is not None:  # the GPU is there and current on the worker thread
            await self._lifecycle(self.cuda.prepare, "setup")
        if self.stage is not None:
            context = StageContext(self.rt.name, spec.name, spec.device, self.rt.pool)
            setup = self.stage.setup
            takes_context = _takes_argument(setup)
            await self._lifecycle(setup, "setup", context if takes_context else _NO_ARG)
            stack.push_async_callback(self._teardown)
        if spec.kind == "sink" and hasattr(spec.fn, "__aenter__"):
            await stack.enter_async_context(spec.fn)
        policy = spec.errors.then if isinstance(spec.errors, Retry) else spec.errors
        if isinstance(policy, DeadLetter) and hasattr(policy.sink, "__aenter__"):
            await stack.enter_async_context(policy.sink)

    async def _lifecycle(self, method: Any, what: str, arg: Any = None) -> None:
        args = () if arg is _NO_ARG or arg is None else (arg,)
        try:
            if is_async(method):
                await method(*args)
            elif self.worker is not None:
                await self.worker.run(method, *args)
            else:
                method(*args)
        except Exception as exc:
            raise StageError(self.name, None, exc, flow=self.rt.name, phase=what) from None

    async def _teardown(self) -> None:
        assert self.stage is not None
        with anyio.CancelScope(shield=True):
            await self._lifecycle(self.stage.teardown, "teardown")


_NO_ARG: Any = object()


def _takes_argument(method: Callable[..., Any]) -> bool:
    """Whether a ``setup`` method accepts the stage context (older stages take none)."""
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(None)
    except TypeError:
        return False
    return True


class BatchRunner(Runner):
    """Groups items: emit at ``max_size`` items or when the oldest waited ``max_wait`` s."""

    async def _body(self) -> None:
        recv = self.recv
        assert recv is not None and self.spec.options is not None
        max_size = self.spec.options["max_size"]
        max_wait = self.spec.options["max_wait"]
        clock = asyncio.get_running_loop().time
        while True:
            if not await recv.wait():
                return
            members = recv.take_up_to(max_size)
            deadline = clock() + max_wait
            while len(members) < max_size:
                more = recv.take_up_to(max_size - len(members))
                if more:
                    members.extend(more)
                elif clock() >= deadline or not await recv.wait(deadline, idle=False):
                    break  # the oldest waited long enough, or the stream ended
            await self._emit_batch(members)

    async def _emit_batch(self, members: list[Message[Any]]) -> None:
        c = self.c
        c.items_in += len(members)
        batch: Message[Any] = Message.__new__(Message)
        batch.value = [m.value for m in members]
        batch.meta = None
        batch.key = None  # a batch mixes keys: its stream is not keyed
        batch._ack = _AckGroup(members)
        batch._born = members[0]._born
        batch._origin = members[0]._origin
        c.items_out += 1
        await self.emit([batch])


class UnbatchRunner(Runner):
    """Splits lists into items; restores each item's own envelope when it can."""

    async def _body(self) -> None:
        recv, c = self.recv, self.c
        assert recv is not None
        while True:
            run = recv.take_run()
            if not run:
                if not await recv.wait():
                    return
                continue
            out: list[Message[Any]] = []
            for msg in run:
                c.items_in += 1
                try:
                    values = list(msg.value)
                except TypeError as exc:
                    raise StageError(
                        self.name, msg.value, exc, flow=self.rt.name, meta=msg.meta
                    ) from None
                group = msg._ack
                if (
                    isinstance(group, _AckGroup)
                    and group.pending == 1
                    and len(group.members) == len(values)
                ):
                    for member, value in zip(group.members, values, strict=True):
                        member.value = value
                    out.extend(group.members)
                    msg._ack = None
                elif not values:
                    msg._done(FILTERED)
                else:
                    out.extend(msg._derive(v) for v in values)
                    msg._done(0)
            c.items_out += len(out)
            if out:
                await self.emit(out)
