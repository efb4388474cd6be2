"""The Source and Sink protocols, and the simplest implementations of each."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Generic, Protocol, TypeVar, runtime_checkable

__all__ = ["Sink", "Source", "collect", "iterate"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)


@runtime_checkable
class Source(Protocol[T_co]):
    """Anything that yields items asynchronously: ``async for item in source``.

    Items may be plain values or :class:`~streamflow.Message` envelopes (metadata and an
    ``on_ack`` callback, for at-least-once delivery). A source that is also an async context
    manager is entered when the flow starts and exited after the flow has drained, so it can
    commit what was acked and close its client. The flow stops a source by cancelling its
    ``__anext__``; an item already yielded is never lost.

    Optional fast path: a source with a plain ``receive_nowait()`` method (returning an item it
    already holds, raising ``asyncio.QueueEmpty`` when it has none and ``StopAsyncIteration``
    or :class:`~streamflow.ChannelClosed` at its end) is read through it first, and
    ``__anext__`` is awaited only when nothing is buffered. A :class:`~streamflow.Channel`
    has this shape.
    """

    def __aiter__(self) -> AsyncIterator[T_co]: ...


@runtime_checkable
class Sink(Protocol[T_contra]):
    """Anything with ``async send(item)``; the item counts as delivered when ``send`` returns.

    A sink that is also an async context manager is entered when the flow starts and exited
    after its last item (flush and close there). A plain async callable ``fn(item)`` is a sink
    too. A sink object may also have ``async send_run(items) -> list[BaseException | None]``:
    the stage then hands it each run of queued items in one call (up to the stage's
    ``concurrency`` items in flight, several runs at once), and it returns, per item in
    order, ``None`` when the item was delivered or the exception it failed with (that item
    meets the stage's error policy; a ``Retry`` calls ``send`` for it alone).
    """

    async def send(self, item: T_contra, /) -> None: ...


class iterate(Generic[T]):
    """A source over any iterable or async iterable: ``sf.iterate(range(10))``.

    A plain iterable is consumed on the event loop without a coroutine per item (keep it
    cheap: use a stage for expensive work).
    """

    __slots__ = ("iterable",)

    def __init__(self, iterable: Iterable[T] | AsyncIterable[T]) -> None:
        if not isinstance(iterable, Iterable | AsyncIterable):
            raise TypeError(f"iterate() needs an iterable or async iterable, got {iterable!r}")
        self.iterable = iterable

    def __aiter__(self) -> AsyncIterator[T]:
        if isinstance(self.iterable, AsyncIterable):
            return aiter(self.iterable)
        return _AsyncIter(iter(self.iterable))

    def __repr__(self) -> str:
        return f"iterate({self.iterable!r})"


class _AsyncIter(Generic[T]):
    __slots__ = ("_it",)

    def __init__(self, it: Iterable[T]) -> None:
        self._it = iter(it)

    def __aiter__(self) -> _AsyncIter[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None


class collect(Generic[T]):
    """A sink that appends every item to a list: ``sf.collect(results)``."""

    __slots__ = ("items",)

    def __init__(self, items: list[T] | None = None) -> None:
        self.items: list[T] = [] if items is None else items

    async def send(self, item: T) -> None:
        self.items.append(item)

    def __repr__(self) -> str:
        return f"collect(<{len(self.items)} items>)"
