"""The task behind each stage: receive, call, apply the error policy, emit."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio

from ._calls import Invoker, is_async
from ._channel import _EMPTY, _TIMEOUT, Channel
from ._errors import ChannelClosed, ChannelFull, StageError, describe_item
from ._io import _AsyncIter, iterate
from ._logging import get_logger
from ._message import (
    DEAD_LETTERED,
    DELIVERED,
    FILTERED,
    SKIPPED,
    Message,
    _Ack,
    _AckGroup,
)
from ._metrics import _Counters
from ._policy import DeadLetter, FailedItem, PartialFailure, Retry
from ._stage import Stage

if TYPE_CHECKING:
    from ._cuda import CudaPlacement
    from ._graph import _Node
    from ._runtime import RunningFlow

__all__ = ["Runner", "make_runner"]

log = get_logger("streamflow")
_perf = time.perf_counter
_CHECKPOINT = 255  # yield to the loop at least every 256 items a loop handles without waiting


class Runner:
    """Base: one stage's task. Subclasses implement ``_body``."""

    def __init__(self, rt: RunningFlow, node: _Node, inbox: Channel[Message[Any]] | None) -> None:
        self.rt = rt
        self.node = node
        self.name = node.name
        self.inbox = inbox
        self.outboxes: list[Channel[Message[Any]]] = []
        self.out_names: list[str] = []
        self.c = _Counters()

    async def run(self) -> None:
        try:
            await self._body()
        except StageError as exc:
            self.rt.fail(exc)
        except Exception as exc:  # a bug or a failing context manager: still name the stage
            self.rt.fail(StageError(self.name, None, exc, flow=self.rt.name, phase="run"))
        finally:
            for out in self.outboxes:
                out._writer_done()
            self.c.stopped = _perf()
            self.rt.runner_done(self)

    async def _body(self) -> None:
        raise NotImplementedError

    def _fast_put(self) -> Callable[[Message[Any]], bool]:
        """``put(msg)``: send without a coroutine when there is one outbox, open, with room.
        When it returns False the caller awaits ``_emit(msg)`` (waits, drops or fails)."""
        outs = self.outboxes
        return outs[0]._put if len(outs) == 1 else _refuse

    async def _emit(self, msg: Message[Any]) -> None:
        outs = self.outboxes
        try:
            if len(outs) == 1:
                await outs[0].send(msg)
                return
            copies = [msg._derive(msg.value) for _ in outs[1:]]
            await outs[0].send(msg)
            for out, copy in zip(outs[1:], copies, strict=True):
                await out.send(copy)
        except ChannelFull as exc:
            stage = self.out_names[next(i for i, o in enumerate(outs) if len(o) >= o.capacity)]
            raise StageError(stage, msg.value, exc, flow=self.rt.name, meta=msg.meta) from None


def _refuse(msg: Message[Any]) -> bool:
    return False


class SourceRunner(Runner):
    """Pulls items from a source, wraps them in envelopes and feeds the graph."""

    def __init__(self, rt: RunningFlow, node: _Node) -> None:
        super().__init__(rt, node, None)
        self._stopping = False
        self._scope: anyio.CancelScope | None = None

    def stop(self) -> None:
        """Stop pulling. An item already pulled is still sent (nothing taken is lost)."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def _wrap(self, item: Any) -> Message[Any]:
        if type(item) is Message:
            msg = item
            if msg._ack is None:
                msg._ack = _Ack(None)
        else:
            msg = Message.__new__(Message)
            msg.value = item
            msg.meta = None
            msg._ack = _Ack(None)
        msg._ack.counter = self.c.count_outcome
        msg._born = _perf()
        self.c.items_out += 1
        return msg

    async def _body(self) -> None:
        source = self.node.fn
        async with AsyncExitStack() as stack:
            if hasattr(source, "__aenter__"):
                await stack.enter_async_context(source)
            try:
                if isinstance(source, iterate) and isinstance(it := aiter(source), _AsyncIter):
                    await self._pull_sync(it._it)
                else:
                    await self._pull(aiter(source), getattr(source, "receive_nowait", None))
            finally:
                for out in self.outboxes:
                    out._writer_done()
                self.outboxes = []
            # keep the source open until every item has been handled, so it can commit
            await self.rt.wait_drained()

    async def _pull_sync(self, it: Any) -> None:
        emit, put, wrap = self._emit, self._fast_put(), self._wrap
        for n, item in enumerate(it, 1):
            msg = wrap(item)
            if not put(msg):
                await emit(msg)
            if self._stopping:
                return
            if n & _CHECKPOINT == 0:
                await asyncio.sleep(0)
                if self._stopping:
                    return

    async def _pull(self, it: AsyncIterator[Any], receive_nowait: Callable[[], Any] | None) -> None:
        """Pull until the source ends or the flow stops it. A source with ``receive_nowait()``
        (an item it already holds, or ``asyncio.QueueEmpty``) is read without a cancel scope
        per item; ``__anext__`` is awaited, cancellably, only when it has nothing."""
        emit, put, wrap = self._emit, self._fast_put(), self._wrap
        n = 0
        try:
            while not self._stopping:
                if receive_nowait is not None:
                    try:
                        item = receive_nowait()
                    except asyncio.QueueEmpty:
                        pass
                    except (StopAsyncIteration, ChannelClosed):
                        return
                    else:
                        msg = wrap(item)
                        if not put(msg):
                            await emit(msg)
                        n += 1
                        if n & _CHECKPOINT == 0:
                            await asyncio.sleep(0)
                        continue
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    try:
                        item = await it.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        self._scope = None
                if scope.cancelled_caught:
                    return
                await emit(wrap(item))
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class FunctionRunner(Runner):
    """map, filter, flat_map and sink: a function per item, with the stage's error policy."""

    def __init__(self, rt: RunningFlow, node: _Node, inbox: Channel[Message[Any]]) -> None:
        super().__init__(rt, node, inbox)
        fn = node.fn
        self.stage: Stage[Any, Any] | None = fn if isinstance(fn, Stage) else None
        if self.stage is not None:
            fn = self.stage.process
        elif node.kind == "sink" and not callable(fn):
            fn = fn.send
        device = node.device
        self.cuda: CudaPlacement | None = None
        self.worker_key = device or ""  # the pool's name for this stage's worker thread
        if device is not None and device.startswith("cuda"):
            from ._cuda import CudaPlacement  # needs torch: only for stages on a GPU

            self.cuda = CudaPlacement(device)
            # a thread per GPU stage: it waits for its stage's event, and a thread shared by
            # two stages would keep their streams from ever working at the same time
            self.worker_key = f"{device}/{node.name}"
        elif device == "cpu":  # the flow's own threads, as many as the stage runs at once
            self.worker_key = f"cpu/{node.name}"
        self.invoke = Invoker(
            fn,
            worker=rt.pool.get(self.worker_key, threads=node.concurrency) if device else None,
            materialize=node.kind == "flat_map",
            wrap=self.cuda.wrap if self.cuda is not None else None,
        )
        self.envelope = node.envelope
        self.produce = {
            "map": self._produce_map,
            "filter": self._produce_filter,
            "flat_map": self._produce_flat,
            "sink": self._produce_sink,
        }[node.kind]

    async def _body(self) -> None:
        async with AsyncExitStack() as stack:
            await self._open(stack)
            if self.node.concurrency > 1 and self._windowed():
                await self._run_windowed()
            elif self.node.concurrency > 1:
                await self._run_concurrent()
            elif self.node.kind in ("map", "sink") and not self.envelope and self._on_loop():
                await self._run_map_fast()
            else:
                await self._run_sequential()

    async def _open(self, stack: AsyncExitStack) -> None:
        """Enter what the stage holds: a Stage's life cycle, a sink's and dead-letter's context."""
        node = self.node
        if self.cuda is not None:  # the GPU is there and current on the worker thread
            await self._lifecycle(self.cuda.prepare, "setup")
        if self.stage is not None:
            stage = self.stage
            stage.device = node.device
            stage._workers = self.rt.pool
            await self._lifecycle(stage.setup, "setup")
            stack.push_async_callback(self._teardown)
        if node.kind == "sink" and hasattr(node.fn, "__aenter__"):
            await stack.enter_async_context(node.fn)
        policy = node.errors.then if isinstance(node.errors, Retry) else node.errors
        if isinstance(policy, DeadLetter) and hasattr(policy.sink, "__aenter__"):
            await stack.enter_async_context(policy.sink)

    async def _lifecycle(self, method: Any, what: str) -> None:
        device = self.node.device
        try:
            if is_async(method):
                await method()
            elif device is not None:
                await self.rt.pool.get(self.worker_key).run(method)
            else:
                method()
        except Exception as exc:
            raise StageError(self.name, None, exc, flow=self.rt.name, phase=what) from None

    async def _teardown(self) -> None:
        assert self.stage is not None
        with anyio.CancelScope(shield=True):
            await self._lifecycle(self.stage.teardown, "teardown")

    # -- loops -------------------------------------------------------------------------

    def _on_loop(self) -> bool:
        """The function runs on the event loop (async, or plain with no device)."""
        return self.invoke.is_async or (
            self.node.device is None and not inspect.isasyncgenfunction(self.invoke.fn)
        )

    async def _run_map_fast(self) -> None:
        """The hot path: a map or sink function on the loop, no envelope, one at a time."""
        assert self.inbox is not None
        take, receive, emit, put = (
            self.inbox._take,
            self.inbox.receive,
            self._emit,
            self._fast_put(),
        )
        fn, c = self.invoke.fn, self.c
        record, is_async, awaitable = c.record, self.invoke.is_async, inspect.isawaitable
        sink = self.node.kind == "sink"
        plain: set[type] = set()  # result types known not to be awaitable
        n = 0
        while True:
            msg = take()
            if msg is _EMPTY:
                try:
                    msg = await receive()
                except ChannelClosed:
                    return
            c.items_in += 1
            t0 = _perf()
            try:
                if is_async:
                    value = await fn(msg.value)
                else:
                    value = fn(msg.value)
                    if type(value) not in plain:
                        if awaitable(value):
                            value = await value
                        else:
                            plain.add(type(value))
            except Exception as exc:
                record(_perf() - t0)
                ok, value = await self._recover(msg, exc)
                if not ok:
                    continue
                t1 = _perf()
            else:
                t1 = _perf()
                record(t1 - t0)
            c.items_out += 1
            if sink:
                c.record_e2e(t1 - msg._born)
                msg._done(DELIVERED)
            else:
                msg.value = value
                if not put(msg):
                    await emit(msg)
            n += 1
            if n & _CHECKPOINT == 0:
                await asyncio.sleep(0)

    async def _run_sequential(self) -> None:
        assert self.inbox is not None
        receive, emit, produce, c = self.inbox.receive, self._emit, self.produce, self.c
        n = 0
        while True:
            try:
                msg = await receive()
            except ChannelClosed:
                return
            c.items_in += 1
            for out in await produce(msg):
                await emit(out)
            n += 1
            if n & _CHECKPOINT == 0:
                await asyncio.sleep(0)

    def _windowed(self) -> bool:
        """A plain function on the loop that starts work and returns a future: no task per
        item is needed to keep ``concurrency`` items in flight."""
        node = self.node
        return (
            node.kind == "map"
            and node.ordered
            and node.device is None
            and not self.invoke.is_async
            and not self.envelope
        )

    async def _run_windowed(self) -> None:
        """Call ``fn`` for up to ``concurrency`` items ahead, await the results in order.
        Items are taken and emitted without a coroutine, and a result that is already there
        is read without awaiting, so a full window costs the loop no task switch per item."""
        assert self.inbox is not None
        inbox, fn, c, k = self.inbox, self.invoke.fn, self.c, self.node.concurrency
        take, put, emit, future_type = inbox._take, self._fast_put(), self._emit, asyncio.Future
        window: deque[tuple[Message[Any], Any, float]] = deque()
        closed = False
        while True:
            while not closed and len(window) < k:
                msg = take()
                if msg is _EMPTY:
                    if window:  # never wait for input while results are due
                        break
                    try:
                        msg = await inbox.receive()
                    except ChannelClosed:
                        closed = True
                        break
                c.items_in += 1
                t0 = _perf()
                try:
                    pending: Any = fn(msg.value)
                except Exception as exc:
                    pending = _Raised(exc)
                window.append((msg, pending, t0))
            if not window:
                return
            head = window[0][1]
            is_future = isinstance(head, future_type)
            if (
                is_future
                and not closed
                and len(window) < k
                and not head.done()
                and await _first_of(head, inbox)
            ):
                continue  # an item arrived first: start it now, do not wait for the head
            msg, pending, t0 = window.popleft()
            try:
                if is_future and pending.done():
                    value = pending.result()
                elif isinstance(pending, _Raised):
                    raise pending.error
                else:
                    value = await pending if inspect.isawaitable(pending) else pending
            except Exception as exc:
                c.record(_perf() - t0)
                ok, value = await self._recover(msg, exc)
                if not ok:
                    continue
            else:
                c.record(_perf() - t0)
            msg.value = value
            c.items_out += 1
            if not put(msg):
                await emit(msg)

    async def _run_concurrent(self) -> None:
        """Up to ``concurrency`` items at once, one task each; emit in input order unless
        ``ordered=False`` (then as they complete). A new item starts as soon as it arrives
        and there is room; a failure surfaces when it is the item's turn to be emitted."""
        assert self.inbox is not None
        inbox, emit, produce, c = self.inbox, self._emit, self.produce, self.c
        k, ordered = self.node.concurrency, self.node.ordered
        loop = asyncio.get_running_loop()
        window: deque[asyncio.Task[list[Message[Any]]]] = deque()
        closed = False
        try:
            while True:
                while not closed and len(window) < k and (not window or len(inbox)):
                    try:
                        msg = await inbox.receive()
                    except ChannelClosed:
                        closed = True
                        break
                    c.items_in += 1
                    window.append(loop.create_task(produce(msg)))
                if not window:
                    return
                if ordered:
                    ready = [window[0]] if window[0].done() else []
                else:
                    ready = [t for t in window if t.done()]
                if not ready:
                    watch = [window[0]] if ordered else list(window)
                    room = not closed and len(window) < k
                    await _wait_first(watch, inbox if room else None)
                    continue
                for task in ready:
                    window.remove(task)
                    for out in task.result():
                        await emit(out)
        finally:
            for task in window:
                task.cancel()
            if window:
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*window, return_exceptions=True)

    # -- per kind ----------------------------------------------------------------------

    async def _call(self, msg: Message[Any]) -> tuple[bool, Any]:
        t0 = _perf()
        try:
            result = await self.invoke(msg if self.envelope else msg.value)
        except Exception as exc:
            self.c.record(_perf() - t0)
            return await self._recover(msg, exc)
        self.c.record(_perf() - t0)
        return True, result

    async def _produce_map(self, msg: Message[Any]) -> list[Message[Any]]:
        ok, value = await self._call(msg)
        if not ok:
            return []
        msg.value = value
        self.c.items_out += 1
        return [msg]

    async def _produce_filter(self, msg: Message[Any]) -> list[Message[Any]]:
        ok, keep = await self._call(msg)
        if not ok:
            return []
        if keep:
            self.c.items_out += 1
            return [msg]
        msg._done(FILTERED)
        return []

    async def _produce_flat(self, msg: Message[Any]) -> list[Message[Any]]:
        ok, values = await self._call(msg)
        if not ok:
            return []
        if not values:
            msg._done(FILTERED)
            return []
        children = [msg._derive(v) for v in values]
        msg._done(0)  # the children hold the ack now
        self.c.items_out += len(children)
        return children

    async def _produce_sink(self, msg: Message[Any]) -> list[Message[Any]]:
        ok, _ = await self._call(msg)
        if ok:
            self.c.items_out += 1
            self.c.record_e2e(_perf() - msg._born)
            msg._done(DELIVERED)
        return []

    # -- errors ------------------------------------------------------------------------

    async def _recover(self, msg: Message[Any], exc: Exception) -> tuple[bool, Any]:
        """Apply the error policy: ``(True, value)`` if a retry worked, ``(False, None)`` if
        the item was skipped or dead-lettered; raise :class:`StageError` to fail the flow."""
        if isinstance(exc, PartialFailure):
            return await self._recover_elements(msg, exc)
        c = self.c
        c.errors += 1
        policy = self.node.errors
        attempts = 1
        if isinstance(policy, Retry):
            while attempts < policy.attempts and isinstance(exc, policy.on):
                delay = policy.delay(attempts)
                log.info(
                    "stage.retry",
                    flow=self.rt.name,
                    stage=self.name,
                    attempt=attempts,
                    delay_s=delay,
                    item=describe_item(msg.value),
                    error=repr(exc),
                )
                await anyio.sleep(delay)
                attempts += 1
                c.retries += 1
                t0 = _perf()
                try:
                    result = await self.invoke(msg if self.envelope else msg.value)
                except Exception as again:
                    c.record(_perf() - t0)
                    c.errors += 1
                    exc = again
                    continue
                c.record(_perf() - t0)
                return True, result
            policy = policy.then
        if policy == "skip":
            c.skipped += 1
            self._handled("skip", msg, attempts, exc)
            msg._done(SKIPPED)
            return False, None
        if isinstance(policy, DeadLetter):
            failed = FailedItem(self.rt.name, self.name, msg.value, msg.meta, exc, attempts)
            await policy.deliver(failed)
            self._handled("dead_letter", msg, attempts, exc)
            msg._done(DEAD_LETTERED)
            return False, None
        raise StageError(self.name, msg.value, exc, flow=self.rt.name, meta=msg.meta) from exc

    async def _recover_elements(self, msg: Message[Any], exc: PartialFailure) -> tuple[bool, Any]:
        """Apply the error policy to each failed element of a list item, then go on with the
        results of the others. A member of a ``batch`` is acknowledged on its own."""
        items, kind = msg.value, self.node.kind
        misuse: Exception | None = None
        if kind == "filter" or not isinstance(items, list | tuple):
            why = (
                "a filter"
                if kind == "filter"
                else f"an item of type {type(items).__name__}, not a list"
            )
            misuse = TypeError(f"PartialFailure was raised by {why}: it is for stages on lists")
        elif bad := [i for i in exc.errors if not (isinstance(i, int) and 0 <= i < len(items))]:
            misuse = IndexError(f"PartialFailure names {bad!r}, the list has {len(items)} elements")
        if misuse is not None:
            raise StageError(self.name, items, misuse, flow=self.rt.name, meta=msg.meta) from exc
        policy = self.node.errors
        if isinstance(policy, Retry):
            policy = policy.then
        group = msg._ack
        members = (
            group.members
            if isinstance(group, _AckGroup)
            and group.pending == 1
            and len(group.members) == len(items)
            else None
        )
        c, outcome = self.c, 0
        for index in sorted(exc.errors):
            error, item = exc.errors[index], items[index]
            meta = members[index].meta if members is not None else msg.meta
            c.errors += 1
            if policy == "fail":
                raise StageError(self.name, item, error, flow=self.rt.name, meta=meta) from error
            if policy == "skip":
                c.skipped += 1
                done, name = SKIPPED, "skip"
            else:
                assert isinstance(policy, DeadLetter)
                failed = FailedItem(self.rt.name, self.name, item, meta, error, 1)
                await policy.deliver(failed)
                done, name = DEAD_LETTERED, "dead_letter"
            self._log_handled(name, item, meta, 1, error, index=index)
            if members is not None:
                members[index]._done(done)
            outcome |= done
        if members is not None:
            assert isinstance(group, _AckGroup)
            group.members = [m for i, m in enumerate(members) if i not in exc.errors]
        elif group is not None:
            group.outcome |= outcome  # the source item was partly skipped or dead-lettered
        if len(exc.errors) == len(items):  # nothing left to go on with
            msg._done(0)
            return False, None
        return True, exc.results

    def _handled(self, policy: str, msg: Message[Any], attempts: int, exc: Exception) -> None:
        self._log_handled(policy, msg.value, msg.meta, attempts, exc)

    def _log_handled(
        self,
        policy: str,
        item: Any,
        meta: Any,
        attempts: int,
        exc: BaseException,
        **extra: Any,
    ) -> None:
        log.warning(
            "stage.error",
            flow=self.rt.name,
            stage=self.name,
            policy=policy,
            item=describe_item(item),
            meta=meta,
            attempts=attempts,
            error=repr(exc),
            **extra,
        )


async def _first_of(head: asyncio.Future[Any], inbox: Channel[Any]) -> bool:
    """Wait until ``head`` is done or ``inbox`` has an item (or closes); True for the inbox."""
    await _wait_first([head], inbox)
    return not head.done()


async def _wait_first(futures: Sequence[asyncio.Future[Any]], inbox: Channel[Any] | None) -> None:
    """Wait until one of ``futures`` is done, or ``inbox`` (if given) has an item or closes."""
    wake: asyncio.Future[None] = futures[0].get_loop().create_future()

    def done(_: object) -> None:
        if not wake.done():
            wake.set_result(None)

    for future in futures:
        future.add_done_callback(done)
    if inbox is not None:
        inbox._receivers.append(wake)
    try:
        await wake
    finally:
        for future in futures:
            future.remove_done_callback(done)
        if inbox is not None and wake in inbox._receivers:
            inbox._receivers.remove(wake)


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class BatchRunner(Runner):
    """Groups items: emit at ``max_size`` items or when the oldest waited ``max_wait`` s."""

    async def _body(self) -> None:
        assert self.inbox is not None
        inbox, c = self.inbox, self.c
        take, put, emit = inbox._take, self._fast_put(), self._emit
        max_size = self.node.options["max_size"]
        max_wait = self.node.options["max_wait"]
        loop = asyncio.get_running_loop()
        while True:
            first = take()
            if first is _EMPTY:
                try:
                    first = await inbox.receive()
                except ChannelClosed:
                    return
            members = [first]
            deadline = loop.time() + max_wait
            while len(members) < max_size:
                item = take()  # what is already there is taken without a coroutine
                if item is _EMPTY:
                    try:
                        item = await inbox._receive_by(deadline)
                    except ChannelClosed:
                        break
                    if item is _TIMEOUT:
                        break
                members.append(item)
            c.items_in += len(members)
            batch: Message[Any] = Message.__new__(Message)
            batch.value = [m.value for m in members]
            batch.meta = None
            batch._ack = _AckGroup(members)
            batch._born = first._born
            c.items_out += 1
            if not put(batch):
                await emit(batch)


class UnbatchRunner(Runner):
    """Splits lists into items; restores each item's own envelope when it can."""

    async def _body(self) -> None:
        assert self.inbox is not None
        take, receive, c = self.inbox._take, self.inbox.receive, self.c
        put, emit = self._fast_put(), self._emit
        while True:
            msg = take()
            if msg is _EMPTY:
                try:
                    msg = await receive()
                except ChannelClosed:
                    return
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
                outs = group.members
                for out, value in zip(outs, values, strict=True):
                    out.value = value
                msg._ack = None
            elif not values:
                msg._done(FILTERED)
                continue
            else:
                outs = [msg._derive(v) for v in values]
                msg._done(0)
            c.items_out += len(outs)
            for out in outs:
                if not put(out):
                    await emit(out)


def make_runner(rt: RunningFlow, node: _Node, inbox: Channel[Message[Any]] | None) -> Runner:
    if node.kind == "source":
        return SourceRunner(rt, node)
    assert inbox is not None
    if node.kind == "batch":
        return BatchRunner(rt, node, inbox)
    if node.kind == "unbatch":
        return UnbatchRunner(rt, node, inbox)
    return FunctionRunner(rt, node, inbox)
