"""The task behind a source: pull items, wrap them in envelopes, feed the graph."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from itertools import islice
from typing import Any

import anyio

from ._checkpoints import participant_of
from ._errors import ChannelClosed
from ._io import _AsyncIter, iterate
from ._message import Message, _Ack, _Notifying
from ._runners import Runner, Supervisor
from ._spec import StageSpec

__all__ = ["SourceRunner"]

_perf = time.perf_counter
_CHECKPOINT = 256  # yield to the loop at least this often when the source never waits


class SourceRunner(Runner):
    """Pulls items from a source in runs (as many as the outputs have room for when the
    source already holds them), wraps them in envelopes and feeds the graph."""

    def __init__(self, rt: Supervisor, spec: StageSpec) -> None:
        super().__init__(rt, spec, None)
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        # the flow's acks with an on_ack, not fired yet (aborted if the flow fails)
        self.live: set[_Ack] | None = None
        # checkpoints: pause between runs; ``_resting`` while not pulling (paused, not yet
        # started or ended), so the position the source reports is where it stands
        self._resting = True
        self._waiting = False  # in a pull that cannot be interrupted
        self._pausing = False
        self._go = asyncio.Event()
        self._go.set()
        self._cancel_safe = False  # a waiting pull may be interrupted to pause
        self._counted = _Counted()  # an ``iterate`` source's position: items handed out
        self._blind = False

    def participant(self) -> Any:
        source = self.spec.fn
        if isinstance(source, iterate):
            return self._counted
        return participant_of(source)

    @property
    def held(self) -> bool:
        """Whether the source hands out nothing now (a checkpoint waits for every source
        to be held). A source without a position is held while it waits for its next
        item, which is then kept back until the checkpoint is taken; one with a position
        counts that item in it, so it is sent on first."""
        return self._resting or (self._waiting and self._blind)

    def stop(self) -> None:
        """Stop pulling. An item already pulled is still sent (nothing taken is lost)."""
        self._stopping = True
        self._go.set()
        if self._scope is not None:
            self._scope.cancel()

    def pause(self) -> None:
        """Stop pulling after the run in hand is sent, until :meth:`resume`. A pull that
        waits for the source is interrupted when the source allows it (one that has
        ``receive_nowait``: nothing is lost); otherwise the pause starts after its item."""
        self._pausing = True
        self._go.clear()
        if self._scope is not None and self._cancel_safe:
            self._scope.cancel()

    def resume(self) -> None:
        self._pausing = False
        self._go.set()

    async def _paused(self) -> None:
        self._resting = True
        try:
            await self._go.wait()
        finally:
            self._resting = False

    def _wrap(self, items: list[Any], born: float) -> list[Message[Any]]:
        counter, origin = self.c.outcomes, self.name
        new_msg, new_ack = Message.__new__, _Ack.__new__
        msgs = []
        self._counted.handed += len(items)
        for item in items:
            if type(item) is Message:
                msg = item
                ack = msg._ack
                if ack is None:
                    msg._ack = _Ack(counter)
                else:
                    ack.counter = counter
                    if self.live is not None and isinstance(ack, _Notifying):
                        ack.live = self.live
                        self.live.add(ack)
            else:
                msg = new_msg(Message)
                msg.value = item
                msg.meta = None
                msg.key = None
                msg._ack = ack = new_ack(_Ack)  # _Ack(counter), without the call
                ack.counter = counter
                ack.pending = 1
                ack.outcome = 0
            msg._born = born
            msg._origin = origin
            msgs.append(msg)
        self.c.items_out += len(msgs)
        return msgs

    def _room(self) -> int:
        """How many items every output can take now (at least 1: then the send waits)."""
        return max(min(s.channel.room() for s in self.sends), 1)

    async def _body(self) -> None:
        source = self.spec.fn
        checkpointer = self.rt.checkpointer
        async with AsyncExitStack() as stack:
            if hasattr(source, "__aenter__"):
                await stack.enter_async_context(source)
            if checkpointer is not None:
                await checkpointer.source_entered()  # restored: its position is set
            self._resting = False
            try:
                skip = self._counted.handed
                if isinstance(source, iterate) and isinstance(it := aiter(source), _AsyncIter):
                    await self._pull_sync(_skipped(it._it, skip))
                else:
                    it = aiter(source)
                    for _ in range(skip):  # an ``iterate`` source restored: skip what it gave
                        try:
                            await it.__anext__()
                        except StopAsyncIteration:
                            break
                    await self._pull(it, getattr(source, "receive_nowait", None))
            finally:
                self._resting = True
                if checkpointer is not None:
                    checkpointer.source_ended()
                self.close_outputs()
            # keep the source open until every item has been handled, so it can commit
            await self.rt.wait_drained()

    async def _pull_sync(self, it: Iterator[Any]) -> None:
        emit, since = self.emit, 0
        while not self._stopping:
            if self._pausing:
                await self._paused()
                continue
            items = list(islice(it, self._room()))
            if not items:
                return
            await emit(self._wrap(items, _perf()))
            since += len(items)
            if since >= _CHECKPOINT:
                since = 0
                await asyncio.sleep(0)

    async def _pull(self, it: AsyncIterator[Any], receive_nowait: Callable[[], Any] | None) -> None:
        """Pull until the source ends or the flow stops it. A source with ``receive_nowait()``
        (an item it already holds, or ``asyncio.QueueEmpty``) is read in runs without
        awaiting; ``__anext__`` is awaited, cancellably, only when it has nothing.

        ``stop()`` cancels only a waiting ``__anext__``: one cancel scope covers the pulls
        and the sends that fit at once, and a send that has to wait for room happens
        outside it, so an item already pulled is never lost."""
        emit, put, since = self.emit, self.put, 0
        self._cancel_safe = receive_nowait is not None
        self._blind = self.participant() is None  # no position to keep consistent
        try:
            while not self._stopping:
                if self._pausing:
                    await self._paused()
                    continue
                if receive_nowait is not None:
                    items, ended = _held(receive_nowait, self._room())
                    if items:
                        msgs = self._wrap(items, _perf())
                        if not put(msgs):
                            await emit(msgs)
                        since += len(items)
                        if since >= _CHECKPOINT:
                            since = 0
                            await asyncio.sleep(0)
                    if ended:
                        return
                    if items:
                        continue
                blocked: list[Message[Any]] | None = None
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    try:
                        while not self._stopping and not self._pausing:
                            self._waiting = True
                            try:
                                item = await it.__anext__()
                            finally:
                                self._waiting = False
                            msgs = self._wrap([item], _perf())
                            if (self._pausing and self._blind) or not put(msgs):
                                blocked = msgs  # kept back until the checkpoint is taken
                                break
                            if receive_nowait is not None:
                                break  # it may hold more now: read them in a run
                    except StopAsyncIteration:
                        return
                    finally:
                        self._scope = None
                if scope.cancelled_caught and self._stopping:
                    return
                if blocked is not None:
                    if self._pausing and self._blind:
                        await self._paused()
                    await emit(blocked)
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class _Counted:
    """The position of an ``iterate`` source: how many items it handed out. Restoring it
    skips that many, so it assumes the iterable gives the same items again (a list, a
    file read the same way)."""

    def __init__(self) -> None:
        self.handed = 0

    def snapshot(self) -> int:
        return self.handed

    def restore(self, position: int | None) -> None:
        self.handed = position or 0


def _skipped(it: Iterator[Any], n: int) -> Iterator[Any]:
    if n:
        next(islice(it, n, n), None)
    return it


def _held(receive_nowait: Callable[[], Any], limit: int) -> tuple[list[Any], bool]:
    """Up to ``limit`` items the source holds now, and whether it has ended."""
    items: list[Any] = []
    while len(items) < limit:
        try:
            items.append(receive_nowait())
        except asyncio.QueueEmpty:
            return items, False
        except (StopAsyncIteration, ChannelClosed):
            return items, True
    return items, False
