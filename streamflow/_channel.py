"""A bounded async channel with backpressure and an overflow policy.

Everything about waiting lives here: :class:`_Waiters` is the one primitive tasks park on
(trio's parking lot), and the runtime moves items only through a channel's internal ends,
:class:`SendEnd` (one per writing stage; the channel closes when the last one is done) and
:class:`ReceiveEnd` (the reading stage's), which move whole runs of items at once. So every
invariant of the channel (bounded buffer, FIFO order, nothing lost on cancel or close) is
kept in this one file.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from ._errors import ChannelClosed, ChannelFull

__all__ = ["Channel", "ChannelStatistics", "Overflow", "ReceiveEnd", "SendEnd"]

T = TypeVar("T")

Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
_OVERFLOWS = ("block", "drop_oldest", "drop_newest", "error")


class _Waiters:
    """Tasks parked until someone wakes them: the channel's one waiting primitive.

    ``park`` waits until :meth:`wake_one` / :meth:`wake_all` (or ``deadline``, or one of
    ``also`` finishing); a waiter that is cancelled after it was woken passes the wake-up
    on, so a wake-up is never lost.
    """

    __slots__ = ("_futures", "_loop")

    def __init__(self) -> None:
        self._futures: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._futures)

    async def park(
        self,
        deadline: float | None = None,
        also: Sequence[asyncio.Future[Any]] = (),
        still_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Wait to be woken (or until ``loop.time()`` passes ``deadline``, or one of
        ``also`` is done). ``still_wanted()`` says, for a waiter cancelled after its wake-up,
        whether the wake-up must go to the next waiter."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._futures.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _wake, waiter)
        callback = _waker(waiter) if also else None
        for future in also:
            future.add_done_callback(callback)  # type: ignore[arg-type]
        try:
            await waiter
        except BaseException:
            self._forget(waiter)
            woken = waiter.done() and not waiter.cancelled()
            if woken and (still_wanted is None or still_wanted()):
                self.wake_one()  # pass the wake-up on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if callback is not None:
                for future in also:
                    future.remove_done_callback(callback)
            if also or timer is not None:
                self._forget(waiter)

    def wake_one(self) -> None:
        futures = self._futures
        while futures:
            waiter = futures.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all(self) -> None:
        futures = self._futures
        while futures:
            _wake(futures.popleft())

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        if waiter in self._futures:
            self._futures.remove(waiter)


def _loop(waiters: _Waiters) -> asyncio.AbstractEventLoop:
    waiters._loop = asyncio.get_running_loop()
    return waiters._loop


def _waker(waiter: asyncio.Future[None]) -> Callable[[asyncio.Future[Any]], None]:
    def done(_: asyncio.Future[Any]) -> None:
        _wake(waiter)

    return done


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ChannelStatistics(NamedTuple):
    """A snapshot of a channel's gauges."""

    current_items: int
    capacity: int
    waiting_senders: int
    waiting_receivers: int
    dropped: int
    closed: bool


class Channel(Generic[T]):
    """A FIFO channel holding at most ``capacity`` items.

    ``send`` waits while the channel is full (``overflow="block"``), or drops the oldest
    buffered item (``"drop_oldest"``), or drops the item being sent (``"drop_newest"``), or
    raises :class:`ChannelFull` (``"error"``). Dropped items are counted in
    :meth:`statistics` and passed to ``on_drop`` when given.

    ``close()`` ends the channel: ``send`` then raises :class:`ChannelClosed`, while receivers
    still get the buffered items and then see the end (``receive`` raises
    :class:`ChannelClosed`; ``async for`` stops). Nothing buffered is lost on close.

    Cancelling a waiting ``send`` or ``receive`` loses nothing: the item is either in the
    channel or still with the caller. The channel is bound to the event loop it is first
    used on; it is not thread-safe.
    """

    __slots__ = (
        "_buffer",
        "_capacity",
        "_closed",
        "_dropped",
        "_held",
        "_items",
        "_on_drop",
        "_overflow",
        "_reason",
        "_room",
        "_writers",
    )

    def __init__(
        self,
        capacity: int = 16,
        overflow: Overflow = "block",
        *,
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if overflow not in _OVERFLOWS:
            raise ValueError(f"overflow must be one of {_OVERFLOWS}, got {overflow!r}")
        self._capacity = capacity
        self._overflow = overflow
        self._on_drop = on_drop
        self._buffer: deque[T] = deque()
        self._room = _Waiters()  # senders waiting for room
        self._items = _Waiters()  # receivers waiting for an item
        self._closed = False
        self._reason: str | None = None  # why it was closed, for senders (see close)
        self._dropped = 0
        self._held = 0  # taken by the reading stage and still in its hands ("block" only)
        self._writers = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def overflow(self) -> Overflow:
        return self._overflow

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Items in the channel (for a stage's inbox, its run in hand included)."""
        return len(self._buffer) + self._held

    def statistics(self) -> ChannelStatistics:
        """Current depth, capacity, waiting tasks and dropped count."""
        return ChannelStatistics(
            len(self),
            self._capacity,
            len(self._room),
            len(self._items),
            self._dropped,
            self._closed,
        )

    # -- sending -----------------------------------------------------------------------

    async def send(self, item: T) -> None:
        """Put ``item`` in the channel, applying the overflow policy when it is full.

        :raises ChannelClosed: the channel is closed (the item was not sent).
        :raises ChannelFull: the channel is full and ``overflow="error"``.
        """
        if self._closed:
            raise ChannelClosed(self._reason or "send on a closed channel")
        buffer = self._buffer
        if len(buffer) + self._held >= self._capacity:
            overflow = self._overflow
            if overflow == "block":
                await self._wait_for_room()
            elif overflow == "drop_oldest":
                self._drop(buffer.popleft())
            elif overflow == "drop_newest":
                self._drop(item)
                return
            else:
                raise ChannelFull(f"channel full ({self._capacity} items)")
        buffer.append(item)
        if self._items._futures:
            self._items.wake_one()

    def send_nowait(self, item: T) -> None:
        """Put ``item`` in the channel without waiting.

        :raises ChannelFull: the channel is full and its policy is ``"block"`` or ``"error"``.
        :raises ChannelClosed: the channel is closed.
        """
        if self._closed:
            raise ChannelClosed(self._reason or "send on a closed channel")
        if len(self._buffer) + self._held >= self._capacity:
            if self._overflow == "drop_oldest":
                self._drop(self._buffer.popleft())
            elif self._overflow == "drop_newest":
                self._drop(item)
                return
            else:
                raise ChannelFull(f"channel full ({self._capacity} items)")
        self._buffer.append(item)
        if self._items._futures:
            self._items.wake_one()

    async def _wait_for_room(self) -> None:
        while len(self._buffer) + self._held >= self._capacity:
            await self._room.park(still_wanted=self._has_room)
            if self._closed:
                raise ChannelClosed(self._reason or "channel closed while waiting to send")

    def _has_room(self) -> bool:
        return len(self._buffer) + self._held < self._capacity

    def room(self) -> int:
        """How many items can be sent now without waiting or dropping."""
        return max(0, self._capacity - len(self._buffer) - self._held)

    def _has_items(self) -> bool:
        return bool(self._buffer)

    def _drop(self, item: T) -> None:
        self._dropped += 1
        if self._on_drop is not None:
            self._on_drop(item)

    def _taken(self) -> None:
        """Items left the buffer: let waiting senders try again."""
        if self._room._futures:
            self._room.wake_all()

    # -- receiving ---------------------------------------------------------------------

    async def receive(self) -> T:
        """Take the oldest item, waiting while the channel is empty.

        :raises ChannelClosed: the channel is closed and empty.
        """
        buffer = self._buffer
        while not buffer:
            if self._closed:
                raise ChannelClosed("channel closed")
            await self._items.park(still_wanted=self._has_items)
        item = buffer.popleft()
        self._taken()
        return item

    def receive_nowait(self) -> T:
        """Take the oldest item without waiting.

        :raises asyncio.QueueEmpty: the channel is empty but open.
        :raises ChannelClosed: the channel is closed and empty.
        """
        if not self._buffer:
            if self._closed:
                raise ChannelClosed("channel closed")
            raise asyncio.QueueEmpty
        item = self._buffer.popleft()
        self._taken()
        return item

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    # -- closing -----------------------------------------------------------------------

    def close(self, reason: str | None = None) -> None:
        """Close the channel: senders fail, receivers drain what is buffered. Idempotent.

        ``reason`` becomes the message of the :class:`ChannelClosed` senders get (a flow
        closes its ``Channel`` sources this way when it stops: "flow 'x' failed: ...")."""
        if self._closed:
            return
        self._reason = reason
        self._closed = True
        self._items.wake_all()
        self._room.wake_all()

    # -- the runtime's ends ------------------------------------------------------------

    def sender(self) -> SendEnd[T]:
        """A new writer's end: the channel closes when every writer's end is closed."""
        self._writers += 1
        return SendEnd(self)

    def receiver(self) -> ReceiveEnd[T]:
        """The reading stage's end."""
        return ReceiveEnd(self)

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if s.closed else "open"
        return f"<Channel {s.current_items}/{s.capacity} {self._overflow} {state}>"


class SendEnd(Generic[T]):
    """One writer of a channel: sends runs of items, and closes its share of the channel.

    ``put_run`` appends what fits without waiting; ``send_run`` sends a whole run in order,
    applying the overflow policy item by item where the channel is full (waiting for room
    with ``"block"``). Neither loses an item when cancelled: each one is either in the
    channel or, not yet sent, with the caller.
    """

    __slots__ = ("_channel", "_done")

    def __init__(self, channel: Channel[T]) -> None:
        self._channel = channel
        self._done = False

    @property
    def channel(self) -> Channel[T]:
        return self._channel

    def put_run(self, items: list[T]) -> bool:
        """Append every item of ``items`` if they all fit and the channel is open (True);
        else append nothing and return False (then await :meth:`send_run`)."""
        ch = self._channel
        buffer = ch._buffer
        if ch._closed or len(buffer) + ch._held + len(items) > ch._capacity:
            return False
        buffer.extend(items)
        waiting = ch._items._futures
        while waiting:  # wake the reader
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        return True

    async def send_run(self, items: Sequence[T]) -> None:
        """Send ``items`` in order: what fits goes at once, the rest by the overflow policy.

        :raises ChannelClosed: the channel was closed (the items not yet sent are not).
        :raises ChannelFull: ``overflow="error"`` and the channel was full.
        """
        ch = self._channel
        buffer, capacity = ch._buffer, ch._capacity
        i, n = 0, len(items)
        while i < n:
            if ch._closed:
                raise ChannelClosed("send on a closed channel")
            room = capacity - len(buffer) - ch._held
            if room > 0:
                end = min(n, i + room)
                buffer.extend(items[i:end] if i or end < n else items)
                i = end
                if ch._items._futures:
                    ch._items.wake_one()
                continue
            overflow = ch._overflow
            if overflow == "block":
                await ch._wait_for_room()
            elif overflow == "drop_oldest":
                ch._drop(buffer.popleft())
            elif overflow == "drop_newest":
                ch._drop(items[i])
                i += 1
            else:
                raise ChannelFull(f"channel full ({capacity} items)")

    def close(self) -> None:
        """This writer is done; the channel closes when it was the last. Idempotent."""
        if self._done:
            return
        self._done = True
        ch = self._channel
        ch._writers -= 1
        if ch._writers <= 0:
            ch.close()


class ReceiveEnd(Generic[T]):
    """The reading stage's end: takes whole runs of items and waits for more.

    With ``overflow="block"`` the items of a run stay counted against the channel's
    capacity until the reader comes back for more (takes or waits again): a stage's items
    in hand are inside its channel's bound, so backpressure reaches the sender as soon as
    the stage is busy, exactly as with one item at a time.
    """

    __slots__ = ("_channel", "_held", "_reserve", "idle")

    def __init__(self, channel: Channel[T]) -> None:
        self._channel = channel
        self._reserve = channel._overflow == "block"
        self._held = 0
        # parked waiting for input with nothing in hand (what a checkpoint waits for)
        self.idle = False

    @property
    def channel(self) -> Channel[T]:
        return self._channel

    def __len__(self) -> int:
        return len(self._channel._buffer)

    def _release(self) -> None:
        """The run in hand is done: its room goes back to the senders."""
        ch = self._channel
        ch._held -= self._held
        self._held = 0
        ch._taken()

    def take_run(self) -> list[T]:
        """Every item buffered now, oldest first (``[]`` when there is none)."""
        ch = self._channel
        if self._held:
            ch._held -= self._held
            self._held = 0
            if ch._room._futures:
                ch._room.wake_all()
        buffer = ch._buffer
        if not buffer:
            return []
        if len(buffer) == 1:
            run = [buffer.popleft()]
        else:
            run = list(buffer)
            buffer.clear()
        if self._reserve:
            self._held = len(run)
            ch._held += self._held
        elif ch._room._futures:
            ch._room.wake_all()
        return run

    def park(self) -> asyncio.Future[None] | None:
        """After :meth:`take_run` found nothing: a future done when an item may be there
        (then take again), for the reader to await directly (the hot path: no coroutine
        between the reader and its wake-up); ``None`` once the channel is closed and empty.
        A reader cancelled while awaiting it must call :meth:`unpark`."""
        ch = self._channel
        if ch._closed:
            return None
        waiters = ch._items
        waiter = (waiters._loop or _loop(waiters)).create_future()
        waiters._futures.append(waiter)
        self.idle = True
        return waiter

    def unpark(self, waiter: asyncio.Future[None]) -> None:
        """The reader awaiting ``waiter`` (from :meth:`park`) was cancelled: forget it, and
        pass a wake-up it got on to the next reader."""
        self.idle = False
        waiters = self._channel._items
        waiters._forget(waiter)
        if waiter.done() and not waiter.cancelled() and self._channel._buffer:
            waiters.wake_one()

    async def next_run(self) -> list[T]:
        """The next run: every item buffered, oldest first, waiting while there is none;
        ``[]`` once the channel is closed and empty."""
        while not (run := self.take_run()):
            waiter = self.park()
            if waiter is None:
                return []
            try:
                await waiter
            except BaseException:
                self.unpark(waiter)
                raise
            self.idle = False
        return run

    def take_up_to(self, limit: int) -> list[T]:
        """At most ``limit`` of the items buffered now, oldest first."""
        ch = self._channel
        if len(ch._buffer) <= limit:
            return self.take_run()
        if self._held:
            self._release()
        pop = ch._buffer.popleft
        run = [pop() for _ in range(limit)]
        self._hold(limit)
        return run

    def _hold(self, n: int) -> None:
        if self._reserve:
            self._held = n
            self._channel._held += n
        else:
            self._channel._taken()

    async def wait(self, deadline: float | None = None, *, idle: bool = True) -> bool:
        """Until an item is buffered (True), the channel is closed and empty (False), or
        ``loop.time()`` passes ``deadline`` (True: look again). ``idle=False``: the reader
        still has items in hand while it waits (a checkpoint waits for it)."""
        if self._held:
            self._release()
        ch = self._channel
        if ch._buffer:
            return True
        if ch._closed:
            return False
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            return True
        self.idle = idle
        try:
            await ch._items.park(deadline, still_wanted=ch._has_items)
        finally:
            self.idle = False
        return bool(ch._buffer) or not ch._closed

    async def wait_any(self, futures: Sequence[asyncio.Future[Any]], *, input: bool) -> None:
        """Until one of ``futures`` is done, or (with ``input``) an item is buffered or the
        channel closes."""
        if self._held:
            self._release()
        ch = self._channel
        if input and (ch._buffer or ch._closed):
            return
        if any(f.done() for f in futures):
            return
        if input:
            await ch._items.park(also=futures, still_wanted=ch._has_items)
        else:
            await _Waiters().park(also=futures)

    @property
    def exhausted(self) -> bool:
        """Closed with nothing left to take."""
        return self._channel._closed and not self._channel._buffer
