"""aiostream interop (optional extra ``streamflow[aiostream]``; aiostream is GPL-3.0-or-later).

The core never imports this module. Two bridges:

- :func:`source` turns an aiostream stream into a flow source.
- :func:`each` turns ``item -> aiostream stream`` into a ``flat_map`` function, so aiostream
  operators run inside a stage; the outputs share the input item's ack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from aiostream import pipe
from aiostream.core import Stream, Streamer

__all__ = ["each", "source"]

T = TypeVar("T")


class _StreamSource(Generic[T]):
    """A source over one aiostream stream, iterated inside the stream's own context."""

    def __init__(self, xs: Stream[T]) -> None:
        self._xs = xs
        self._streamer: Streamer[T] | None = None

    async def __aenter__(self) -> _StreamSource[T]:
        self._streamer = self._xs.stream()
        await self._streamer.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        streamer, self._streamer = self._streamer, None
        if streamer is not None:
            await streamer.__aexit__(et, e, tb)

    def __aiter__(self) -> AsyncIterator[T]:
        if self._streamer is None:
            raise RuntimeError("an aiostream source is iterated by a running flow only")
        return self._streamer


def source(xs: Stream[T]) -> _StreamSource[T]:
    """A flow source over the aiostream stream ``xs``: ``flow.source("x", source(xs))``."""
    if not isinstance(xs, Stream):
        raise TypeError(f"expected an aiostream stream, got {xs!r}")
    return _StreamSource(xs)


def each(fn: Callable[[Any], Stream[T]]) -> Callable[[Any], Any]:
    """A ``flat_map`` function that runs the aiostream pipeline ``fn(item)`` to its end and
    emits what it yields: ``stream.flat_map("words", each(lambda s: stream.iterate(s.split())
    | pipe.map(str.upper)))``."""

    async def run(item: Any) -> list[T]:
        xs = fn(item)
        if not isinstance(xs, Stream):
            raise TypeError(f"each(): the function must return an aiostream stream, got {xs!r}")
        result: list[T] = await (xs | pipe.list())
        return result

    run.__qualname__ = f"each({getattr(fn, '__qualname__', fn)})"
    return run
