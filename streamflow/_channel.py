"""A bounded async channel with backpressure and an overflow policy."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from ._errors import ChannelClosed, ChannelFull

__all__ = ["Channel", "ChannelStatistics", "Overflow"]

T = TypeVar("T")

Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
_OVERFLOWS = ("block", "drop_oldest", "drop_newest", "error")
_TIMEOUT: Any = object()
_EMPTY: Any = object()


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
        "_loop",
        "_on_drop",
        "_overflow",
        "_receivers",
        "_senders",
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
        self._senders: deque[asyncio.Future[None]] = deque()
        self._receivers: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._dropped = 0
        self._writers = 0
        self._loop: asyncio.AbstractEventLoop | None = None

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
        return len(self._buffer)

    def statistics(self) -> ChannelStatistics:
        """Current depth, capacity, waiting tasks and dropped count."""
        return ChannelStatistics(
            len(self._buffer),
            self._capacity,
            len(self._senders),
            len(self._receivers),
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
            raise ChannelClosed("send on a closed channel")
        buffer = self._buffer
        if len(buffer) >= self._capacity:
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
        if self._receivers:
            _wake_one(self._receivers)

    def send_nowait(self, item: T) -> None:
        """Put ``item`` in the channel without waiting.

        :raises ChannelFull: the channel is full and its policy is ``"block"`` or ``"error"``.
        :raises ChannelClosed: the channel is closed.
        """
        if self._closed:
            raise ChannelClosed("send on a closed channel")
        if len(self._buffer) >= self._capacity:
            if self._overflow == "drop_oldest":
                self._drop(self._buffer.popleft())
            elif self._overflow == "drop_newest":
                self._drop(item)
                return
            else:
                raise ChannelFull(f"channel full ({self._capacity} items)")
        self._buffer.append(item)
        if self._receivers:
            _wake_one(self._receivers)

    def _put(self, item: T) -> bool:
        """The runners' fast path: append ``item`` if the channel is open with room (and
        return True); otherwise the caller awaits :meth:`send`, which applies the policy."""
        if self._closed or len(self._buffer) >= self._capacity:
            return False
        self._buffer.append(item)
        if self._receivers:
            _wake_one(self._receivers)
        return True

    async def _wait_for_room(self) -> None:
        loop = self._loop or self._bind()
        while len(self._buffer) >= self._capacity:
            waiter = loop.create_future()
            self._senders.append(waiter)
            try:
                await waiter
            except BaseException:
                _forget(self._senders, waiter)
                if waiter.done() and not waiter.cancelled() and len(self._buffer) < self._capacity:
                    _wake_one(self._senders)  # pass the wake-up on
                raise
            if self._closed:
                raise ChannelClosed("channel closed while waiting to send")

    def _drop(self, item: T) -> None:
        self._dropped += 1
        if self._on_drop is not None:
            self._on_drop(item)

    # -- receiving ---------------------------------------------------------------------

    async def receive(self) -> T:
        """Take the oldest item, waiting while the channel is empty.

        :raises ChannelClosed: the channel is closed and empty.
        """
        buffer = self._buffer
        while not buffer:
            if self._closed:
                raise ChannelClosed("channel closed")
            await self._wait_for_item(None)
        item = buffer.popleft()
        if self._senders:
            _wake_one(self._senders)
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
        if self._senders:
            _wake_one(self._senders)
        return item

    def _take(self) -> T:
        """The runners' fast path: the oldest item, or ``_EMPTY`` (then await ``receive``)."""
        buffer = self._buffer
        if not buffer:
            return _EMPTY  # type: ignore[no-any-return]
        item = buffer.popleft()
        if self._senders:
            _wake_one(self._senders)
        return item

    async def _receive_by(self, deadline: float) -> T:
        """Like ``receive`` but return ``_TIMEOUT`` once ``loop.time()`` passes ``deadline``."""
        buffer = self._buffer
        loop = self._loop or self._bind()
        while not buffer:
            if self._closed:
                raise ChannelClosed("channel closed")
            if loop.time() >= deadline:
                return _TIMEOUT  # type: ignore[no-any-return]
            await self._wait_for_item(deadline)
        item = buffer.popleft()
        if self._senders:
            _wake_one(self._senders)
        return item

    async def _wait_for_item(self, deadline: float | None) -> None:
        loop = self._loop or self._bind()
        waiter = loop.create_future()
        self._receivers.append(waiter)
        timer = None if deadline is None else loop.call_at(deadline, _wake, waiter)
        try:
            await waiter
        except BaseException:
            _forget(self._receivers, waiter)
            if waiter.done() and not waiter.cancelled() and self._buffer:
                _wake_one(self._receivers)
            raise
        finally:
            if timer is not None:
                timer.cancel()
                _forget(self._receivers, waiter)

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel: senders fail, receivers drain what is buffered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for waiters in (self._receivers, self._senders):
            while waiters:
                _wake(waiters.popleft())

    def _add_writer(self) -> None:
        self._writers += 1

    def _writer_done(self) -> None:
        """One of several producers is finished; close when it was the last."""
        self._writers -= 1
        if self._writers <= 0:
            self.close()

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def __repr__(self) -> str:
        s = self.statistics()
        state = "closed" if s.closed else "open"
        return f"<Channel {s.current_items}/{s.capacity} {self._overflow} {state}>"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


def _forget(waiters: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
    if waiter in waiters:
        waiters.remove(waiter)
