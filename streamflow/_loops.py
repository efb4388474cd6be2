"""The loop strategies of function stages, each written once (see ``_spec.LOOPS``).

Every loop moves items in runs: it takes every item waiting in the stage's inbox at once,
calls the function per item in a tight loop, settles the results by the stage's kind and
emits them to the next channel in one go, paying clocks, counters and wake-ups once per run.
A trickling source still sees each item go through at once (a run of one). Order, acks and
error policies are per item, exactly as for one item at a time. A run's latency sample is
its mean time per item.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

import anyio

from ._calls import _listing, _to_list
from ._channel import ReceiveEnd
from ._errors import StageError
from ._message import Message
from ._runners import FunctionRunner

__all__ = ["LOOP_RUNNERS"]

_perf = time.perf_counter


class _Raised:
    """A call that raised (kept in place of its result until the item's turn)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


async def inline(r: FunctionRunner) -> None:
    """The function on the event loop, over each run of queued items.

    A run's results go on together when the run is done, or sooner: if the stage's task
    suspends in the middle of a run (an ``await`` that really waits, a retry's back-off),
    what is finished so far goes on meanwhile (:class:`_Run`), so an item that waits never
    holds back the ones before it."""
    kind, fn = r.spec.kind, r.fn
    if kind == "flat_map" or inspect.isasyncgenfunction(fn):
        call: Callable[[Any], Any] = r.invoke  # the invoker turns results into lists
        awaited = True
    else:
        call, awaited = fn, r.invoke.is_async
    recv, settle, c, emit, put = r.recv, r.settle, r.c, r.emit, r.put
    assert recv is not None
    take, park, envelope = recv.take_run, recv.park, r.spec.envelope
    flusher = _flusher(asyncio.get_running_loop())
    plain: set[type] = set()  # result types of a plain function known not to be awaitable
    awaitable = inspect.isawaitable
    while True:
        run = take()
        if not run:  # recv.next_run, inline: await the channel's future itself
            waiter = park()
            if waiter is None:
                return
            try:
                await waiter
            except BaseException:
                recv.unpark(waiter)
                raise
            recv.idle = False
            continue
        t0 = _perf()
        results: list[Any] = []
        state: _Run | None = None
        try:
            if awaited:  # a coroutine per item: each may suspend the task, so watch the run
                if len(run) == 1:
                    msg = run[0]
                    results.append(await call(msg if envelope else msg.value))
                else:
                    state = _Run(r, run, results, flusher)
                    for msg in run:
                        results.append(await call(msg if envelope else msg.value))
                        if not state.armed:
                            state.arm()  # it flushed while we waited: watch the next wait
            else:  # only an awaitable result can suspend it: watch the run once one turns up
                for msg in run:
                    value = call(msg if envelope else msg.value)
                    if type(value) not in plain:
                        if awaitable(value):
                            if state is None and len(run) > 1:
                                state = _Run(r, run, results, flusher)
                            value = await value
                        else:
                            plain.add(type(value))
                    results.append(value)
                    if state is not None and not state.armed:
                        state.arm()
            ok = run
        except Exception as exc:
            ok = await _finish_run(r, run, results, exc, state)
        t1 = _perf()
        c.record_run(t1 - t0, len(run))
        out = settle(ok, results, c, t1) if state is None else state.rest(ok, t1)
        if out and not put(out):
            await emit(out)


class _Flusher:
    """The one callback that sends on what suspended runs have finished, shared by every
    inline loop on an event loop: scheduled at most once per turn of the loop, and only
    when a run asks. When it runs, every run that asked is suspended or over (the loop
    runs one thing at a time), so each flushes what it has finished; a run asks again
    once it has finished another item after that."""

    __slots__ = ("runs", "scheduled")

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.scheduled = False

    def watch(self, run: _Run) -> None:
        self.runs.append(run)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        runs, self.runs = self.runs, []
        for run in runs:
            try:
                run.flush()
            except Exception as exc:  # as a callback of its own would: to the loop's handler
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"stage {run.r.name!r}: sending a partial run", "exception": exc}
                )


_FLUSHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary()
)


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _FLUSHERS.get(loop)
    if flusher is None:
        flusher = _FLUSHERS[loop] = _Flusher()
    return flusher


class _Run:
    """A run in progress on the loop: its results, and how many of them went on already.

    The loop's :class:`_Flusher` is asked to flush when the run starts: it only gets to
    run while the stage's task is suspended (or once the run is over, when there is
    nothing left to do), and then settles and sends what is finished, if the outputs have
    room."""

    __slots__ = ("armed", "flusher", "ok", "r", "results", "settled", "unsent")

    def __init__(
        self,
        r: FunctionRunner,
        run: list[Message[Any]],
        results: list[Any],
        flusher: _Flusher,
    ) -> None:
        self.r = r
        self.flusher = flusher
        self.ok = run  # the messages that succeeded (the run itself until one fails)
        self.results = results  # theirs, in order (the loop appends to this list)
        self.settled = 0
        self.unsent: list[Message[Any]] | None = None
        self.armed = True
        flusher.watch(self)

    def arm(self) -> None:
        self.armed = True
        self.flusher.watch(self)

    def flush(self) -> None:
        self.armed = False
        n, start = len(self.results), self.settled
        if n > start and self.unsent is None:
            r = self.r
            out = r.settle(self.ok[start:n], self.results[start:n], r.c, _perf())
            self.settled = n
            if out and not r.put(out):
                self.unsent = out  # no room: the task sends it, before the rest

    def rest(self, ok: list[Message[Any]], now: float) -> list[Message[Any]]:
        """What is left to send when the run is over (``ok``: the messages that went on)."""
        self.ok = ok
        self.armed = True  # a flush still scheduled finds nothing to do
        start, n = self.settled, len(self.results)
        r = self.r
        out = r.settle(ok[start:n], self.results[start:n], r.c, now) if n > start else []
        self.settled = n
        if self.unsent is not None:
            out = self.unsent + out
            self.unsent = None
        return out


async def _finish_run(
    r: FunctionRunner,
    run: list[Message[Any]],
    results: list[Any],
    exc: Exception,
    state: _Run | None,
) -> list[Message[Any]]:
    """A call of the run raised: the items before it succeeded (their ``results``), this
    one goes to the error policy, and the rest are called one by one with theirs. Returns
    the messages that go on (aligned with ``results``)."""
    done = len(results)
    ok = run[:done]
    if state is not None:
        state.ok = ok  # what a flush settles from now on
    good, value = await r.recover(run[done], exc)
    if good:
        ok.append(run[done])
        results.append(value)
    envelope = r.spec.envelope
    for msg in run[done + 1 :]:
        try:
            value = await r.invoke(msg if envelope else msg.value)
        except Exception as again:
            good, value = await r.recover(msg, again)
            if not good:
                continue
        ok.append(msg)
        results.append(value)
        if state is not None and not state.armed:
            state.arm()
    return ok


async def worker(r: FunctionRunner) -> None:
    """A plain function on the stage's worker thread: each run of queued items is one job
    there (one thread hop per run). The job stops at the first item that raises; that item
    goes to the error policy on the loop and the rest of the run is called item by item."""
    recv, c = r.recv, r.c
    assert recv is not None and r.worker is not None
    next_run, envelope = recv.next_run, r.spec.envelope
    flat = r.spec.kind == "flat_map"
    target = _listing(r.fn) if flat else r.fn
    if r.cuda is not None:
        target = r.cuda.wrap(target)
    run_job = r.worker.run

    def apply(args: list[Any]) -> list[Any]:  # on the worker thread
        out: list[Any] = []
        try:
            for arg in args:
                out.append(target(arg))  # noqa: PERF401 - the results so far count on a raise
        except Exception as exc:
            raise _Stopped(out, exc) from None
        return out

    while run := await next_run():
        t0 = _perf()
        ok = run
        try:
            results = await run_job(apply, run if envelope else [m.value for m in run])
        except _Stopped as stopped:
            results = stopped.results
            ok = await _finish_run(r, run, results, stopped.error, None)
        if flat:
            results = [await _to_list(v) if isinstance(v, AsyncIterable) else v for v in results]
        t1 = _perf()
        c.record_run(t1 - t0, len(run))
        await r.pass_on(ok, results, t1)


class _Stopped(Exception):
    """A worker job stopped at an item that raised: the results before it, and the error."""

    def __init__(self, results: list[Any], error: Exception) -> None:
        super().__init__(error)
        self.results = results
        self.error = error


async def window(r: FunctionRunner) -> None:
    """A plain function on the loop that starts work and returns a future (a pipelined
    model): up to ``concurrency`` calls ahead, results settled in input order. Results that
    are already there are read without awaiting, and settled and emitted as one run."""
    recv, recover, c, fn = r.recv, r.recover, r.c, r.fn
    assert recv is not None
    k = r.spec.concurrency
    future_type = asyncio.Future
    pending: deque[tuple[Message[Any], Any, float]] = deque()
    closed = False
    while True:
        while not closed and len(pending) < k:
            run = recv.take_up_to(k - len(pending))
            if not run:
                if recv.exhausted or (not pending and not await recv.wait()):
                    closed = True
                elif not pending:
                    continue
                break
            c.items_in += len(run)
            for msg in run:
                t0 = _perf()
                try:
                    started: Any = fn(msg.value)
                except Exception as exc:
                    started = _Raised(exc)
                pending.append((msg, started, t0))
        if not pending:
            return
        head = pending[0][1]
        if isinstance(head, future_type) and not head.done() and not closed and len(pending) < k:
            await recv.wait_any([head], input=True)
            if not head.done():
                continue  # an item arrived first: start it now, do not wait for the head
        ok: list[Message[Any]] = []
        results: list[Any] = []
        while pending:
            msg, started, t0 = pending[0]
            is_future = isinstance(started, future_type)
            if ok and is_future and not started.done():
                break  # settle what is ready; the rest next time round
            pending.popleft()
            try:
                if is_future and started.done():
                    value = started.result()
                elif type(started) is _Raised:
                    raise started.error
                else:
                    value = await started if inspect.isawaitable(started) else started
            except Exception as exc:
                c.record(_perf() - t0)
                good, value = await recover(msg, exc)
                if not good:
                    continue
            else:
                c.record(_perf() - t0)
            ok.append(msg)
            results.append(value)
        if ok:
            await r.pass_on(ok, results, _perf())


async def tasks(r: FunctionRunner) -> None:
    """Up to ``concurrency`` items at once, one task each; emitted in input order unless
    ``ordered=False`` (then as they complete). A new item starts as soon as it arrives and
    there is room; a failure surfaces when it is the item's turn to be emitted. On a keyed
    stream an item starts only once its key's previous item is done, so each key's items
    run, and complete, in order."""
    recv, c = r.recv, r.c
    assert recv is not None
    k, ordered, keyed = r.spec.concurrency, r.spec.ordered, r.spec.keyed
    loop = asyncio.get_running_loop()
    running: deque[asyncio.Task[tuple[Message[Any], bool, Any]]] = deque()
    closed = False

    direct = r.invoke.is_async and r.spec.kind != "flat_map"
    call, envelope, recover = r.fn if direct else r.invoke, r.spec.envelope, r.recover

    async def one(msg: Message[Any]) -> tuple[Message[Any], bool, Any]:
        t0 = _perf()
        try:  # one coroutine layer per item: the function's own (or the invoker's)
            ok, value = True, await call(msg if envelope else msg.value)
        except Exception as exc:
            ok, value = await recover(msg, exc)
        c.record(_perf() - t0)
        return msg, ok, value

    # a keyed stream: an item starts once the one before it of the same key is done
    latest: dict[Any, asyncio.Task[tuple[Message[Any], bool, Any]]] = {}

    async def after(
        before: asyncio.Task[tuple[Message[Any], bool, Any]], msg: Message[Any]
    ) -> tuple[Message[Any], bool, Any]:
        if not before.done():
            await asyncio.wait((before,))
        return await one(msg)

    def start(msg: Message[Any]) -> asyncio.Task[tuple[Message[Any], bool, Any]]:
        if not keyed:
            return loop.create_task(one(msg))
        key = msg.key
        before = latest.get(key)
        task = loop.create_task(one(msg) if before is None else after(before, msg))
        latest[key] = task
        task.add_done_callback(lambda t: latest.pop(key) if latest.get(key) is t else None)
        return task

    try:
        while True:
            while not closed and len(running) < k and (not running or len(recv)):
                run = await _intake(recv, k - len(running), busy=bool(running))
                if not run:
                    closed = run is None
                    break
                c.items_in += len(run)
                running.extend(start(msg) for msg in run)
            if not running:
                return
            if ordered:
                ready = []
                for task in running:
                    if not task.done():
                        break
                    ready.append(task)
            else:
                ready = [t for t in running if t.done()]
            if not ready:
                watch = [running[0]] if ordered else list(running)
                closed = closed or recv.exhausted
                await recv.wait_any(watch, input=not closed and len(running) < k)
                continue
            ok: list[Message[Any]] = []
            results: list[Any] = []
            for task in ready:
                running.remove(task)
                msg, good, value = task.result()
                if good:
                    ok.append(msg)
                    results.append(value)
            if ok:
                await r.pass_on(ok, results, _perf())
    finally:
        await _cancel(list(running))


async def runs(r: FunctionRunner) -> None:
    """A sink that takes runs (``send_run``): each run of queued items is one call, in a
    task, with up to ``concurrency`` items in flight over all the runs; items are settled
    in input order as their runs complete, each failed item by the error policy."""
    recv, c, recover = r.recv, r.c, r.recover
    assert recv is not None
    k = r.spec.concurrency
    send_run = r.spec.fn.send_run
    loop = asyncio.get_running_loop()
    running: deque[tuple[asyncio.Task[list[BaseException | None]], list[Message[Any]]]] = deque()
    inflight = 0
    closed = False

    async def one(msgs: list[Message[Any]]) -> list[BaseException | None]:
        t0 = _perf()
        try:
            outcomes = list(await send_run([m.value for m in msgs]))
        except Exception as exc:  # the whole call failed: so did each of its items
            outcomes = [exc] * len(msgs)
        c.record_run(_perf() - t0, len(msgs))
        if len(outcomes) != len(msgs):
            raise StageError(
                r.name,
                msgs[0].value,
                TypeError(f"send_run returned {len(outcomes)} outcomes for {len(msgs)} items"),
                flow=r.rt.name,
                meta=msgs[0].meta,
            )
        return outcomes

    try:
        while True:
            while not closed and inflight < k and (not running or len(recv)):
                run = await _intake(recv, k - inflight, busy=bool(running))
                if not run:
                    closed = run is None
                    break
                inflight += len(run)
                running.append((loop.create_task(one(run)), run))
            if not running:
                return
            if not running[0][0].done():
                closed = closed or recv.exhausted
                await recv.wait_any([running[0][0]], input=not closed and inflight < k)
                continue
            ok: list[Message[Any]] = []
            results: list[Any] = []
            while running and running[0][0].done():
                task, msgs = running.popleft()
                inflight -= len(msgs)
                for msg, error in zip(msgs, task.result(), strict=True):
                    if error is None:
                        ok.append(msg)
                        results.append(None)
                        continue
                    if not isinstance(error, Exception):
                        raise error
                    good, value = await recover(msg, error)
                    if good:
                        ok.append(msg)
                        results.append(value)
            if ok:
                await r.pass_on(ok, results, _perf())
    finally:
        await _cancel([task for task, _ in running])


async def _intake(
    recv: ReceiveEnd[Message[Any]], room: int, *, busy: bool
) -> list[Message[Any]] | None:
    """Up to ``room`` of the items buffered now; when none is and nothing is ``busy``, wait
    for some. ``[]``: none now (go on with what is busy); ``None``: the stream ended."""
    while True:
        run = recv.take_up_to(room)
        if run:
            return run
        if recv.exhausted:
            return None
        if busy:
            return []
        if not await recv.wait():
            return None


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them (shielded: the stage is ending)."""
    for task in tasks:
        task.cancel()
    if tasks:
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


LOOP_RUNNERS: dict[str, Callable[[FunctionRunner], Awaitable[None]]] = {
    "inline": inline,
    "worker": worker,
    "window": window,
    "tasks": tasks,
    "runs": runs,
}
"""The loop of each strategy name a function stage's spec can carry."""
