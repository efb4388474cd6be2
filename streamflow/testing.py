"""Helpers for testing flows: an acking in-memory source, a recording sink, fault injection.

These ship with the package so users can test their own flows the way we test ours.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import anyio

from ._message import Message, Outcome

__all__ = ["Flaky", "LoopLag", "MemorySink", "MemorySource", "loop_lag"]

T = TypeVar("T")


class MemorySource(Generic[T]):
    """A source over ``items`` that records how each item was acknowledged, the way a broker
    connector would: ``acked[offset]`` is the :class:`~streamflow.Outcome` of item ``offset``.

    ``taken`` counts the items the flow has pulled. With ``forever=True`` the items repeat
    until the flow stops the source.
    """

    def __init__(self, items: Iterable[T], *, forever: bool = False, delay: float = 0.0) -> None:
        self.items = list(items)
        self.forever = forever
        self.delay = delay
        self.taken = 0
        self._start = 0
        self.acked: dict[int, Outcome] = {}
        self.ack_calls = 0

    def __aiter__(self) -> AsyncIterator[Message[T]]:
        return self._generate()

    def snapshot(self) -> int:
        """Its position, for a checkpoint: the offset of the next item it hands out."""
        return self.taken

    def restore(self, position: int | None) -> None:
        """Start at offset ``position`` (a checkpoint's), as a broker would after a crash."""
        self.taken = self._start = position or 0

    async def _generate(self) -> AsyncIterator[Message[T]]:
        offset, n = self._start, len(self.items)
        while n and (self.forever or offset < n):
            item = self.items[offset % n]
            if self.delay:
                await anyio.sleep(self.delay)
            self.taken += 1
            yield Message(item, meta={"offset": offset}, on_ack=self._acker(offset))
            offset += 1

    def _acker(self, offset: int) -> Callable[[Outcome], None]:
        def ack(outcome: Outcome) -> None:
            self.ack_calls += 1
            self.acked[offset] = outcome

        return ack

    @property
    def unacked(self) -> list[int]:
        """Offsets taken by the flow and not acknowledged yet, or acknowledged ``ABORTED``:
        what a broker would deliver again."""
        return [
            o for o in range(self.taken) if o not in self.acked or self.acked[o] & Outcome.ABORTED
        ]


class MemorySink(Generic[T]):
    """A sink that records every item; ``delay`` makes it slow, ``fail_on`` makes it raise."""

    def __init__(self, *, delay: float = 0.0, fail_on: Callable[[T], bool] | None = None) -> None:
        self.items: list[T] = []
        self.delay = delay
        self.fail_on = fail_on

    async def send(self, item: T) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on(item):
            raise ValueError(f"MemorySink refused {item!r}")
        self.items.append(item)


class Flaky(Generic[T]):
    """Wrap a function so that it raises ``error`` the first ``failures`` times it sees each
    item (items are told apart by ``key``, default the item itself)."""

    def __init__(
        self,
        fn: Callable[[T], Any],
        failures: int,
        *,
        error: type[Exception] = RuntimeError,
        key: Callable[[T], Any] = lambda item: item,
    ) -> None:
        self.fn = fn
        self.failures = failures
        self.error = error
        self.key = key
        self.calls: dict[Any, int] = {}

    def __call__(self, item: T) -> Any:
        k = self.key(item)
        n = self.calls[k] = self.calls.get(k, 0) + 1
        if n <= self.failures:
            raise self.error(f"injected failure {n} of {self.failures} for {item!r}")
        return self.fn(item)


class LoopLag:
    """What :func:`loop_lag` measured: how late the event loop woke a task that asked to be
    woken every ``interval`` seconds. ``worst`` is the longest stall (seconds)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.worst = 0.0
        self.samples = 0

    def __repr__(self) -> str:
        return f"LoopLag(worst={self.worst * 1e3:.1f} ms, samples={self.samples})"


@asynccontextmanager
async def loop_lag(interval: float = 0.005) -> AsyncIterator[LoopLag]:
    """Measure, while the block runs, how long the event loop was held: a probe task sleeps
    ``interval`` s at a time and records how much later than asked it woke up.

    Use it to check that nothing in a flow blocks the loop::

        async with sf.testing.loop_lag() as lag:
            await flow.run()
        assert lag.worst < 0.05
    """
    lag = LoopLag(interval)

    async def probe() -> None:
        clock = time.perf_counter
        while True:
            before = clock()
            await anyio.sleep(interval)
            late = clock() - before - interval
            lag.samples += 1
            if late > lag.worst:
                lag.worst = late

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        try:
            yield lag
        finally:
            tg.cancel_scope.cancel()
