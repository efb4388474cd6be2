"""The flow's side of a source that a background client fills: a buffer and a wake-up."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

import streamflow as sf

from ._record import Record

__all__ = ["BufferedSource"]

E = TypeVar("E")


class BufferedSource(Generic[E]):
    """Entries land in ``_buffer`` (then ``_ready`` is set); ``_next()`` turns the oldest
    into the message the flow receives. Subclasses say whether they are running; ``_fail``
    (the :class:`~streamflow.connectors._background.Background` tasks' report) ends the stream with an
    error."""

    _buffer: deque[E]
    _ready: asyncio.Event
    _error: BaseException | None

    def _fail(self, error: BaseException) -> None:
        """The client failed for good: the flow gets ``error`` at its next item."""
        self._error = error
        self._ready.set()

    def _running(self) -> bool:
        raise NotImplementedError  # each connector knows what "started" means for it

    def _next(self) -> sf.Message[Record]:
        raise NotImplementedError  # each connector builds its own envelope

    def __aiter__(self) -> BufferedSource[E]:
        return self

    def receive_nowait(self) -> sf.Message[Record]:
        """An entry already received (the flow's fast path); ``asyncio.QueueEmpty`` if none."""
        if not self._buffer:
            raise asyncio.QueueEmpty
        return self._next()

    async def __anext__(self) -> sf.Message[Record]:
        buffer = self._buffer
        while not buffer:
            if self._error is not None:
                raise self._error
            if not self._running():
                raise RuntimeError(f"{self!r} was not started: the flow enters it as a context")
            self._ready.clear()
            await self._ready.wait()
        return self._next()
