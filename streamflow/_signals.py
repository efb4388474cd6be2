"""SIGINT and SIGTERM for a flow run by its own process: the first drains, a second (or the
drain timeout) stops at once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import anyio

from ._logging import get_logger

__all__ = ["Interrupted", "SignalCatcher", "wait_stopping_on_signals"]

log = get_logger("streamflow")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The flow was stopped at once, before its drain finished: by a second signal, or
    because draining took longer than ``drain_timeout``. Items still inside were acked
    ``ABORTED``. ``signal`` is the first signal received, ``exit_code`` the conventional
    status for it (128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, reason: Literal["second signal", "drain timeout"]) -> None:
        self.signal = signal.Signals(signum)
        self.reason = reason
        self.exit_code = 128 + int(signum)
        super().__init__(f"stopped at once by {self.signal.name} ({reason}): not drained")


class _Stoppable(Protocol):
    name: str

    async def wait(self) -> None: ...

    async def stop(self, drain: bool = True) -> None: ...

    def _stop_at_once(self, reason: str) -> None: ...


class SignalCatcher:
    """Records SIGINT/SIGTERM while installed (``with catcher.installed():``) and wakes
    whoever waits for the n-th one. Installs on the running asyncio loop (so a signal that
    lands on a worker thread still wakes it) and restores the previous handlers."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._changed = anyio.Event()

    def _got(self, signum: int) -> None:
        self.received.append(signum)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> int:
        """Wait until ``count`` signals have come; the first one's number."""
        while len(self.received) < count:
            await self._changed.wait()
        return self.received[0]

    @contextmanager
    def installed(self) -> Iterator[SignalCatcher]:
        loop = asyncio.get_running_loop()
        previous: dict[int, Any] = {}
        try:
            for sig in SIGNALS:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._got, int(sig))
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            _restore(loop, previous)
            raise RuntimeError(
                "stop_on_signals=True needs the main thread of a process running an asyncio "
                f"loop that supports signal handlers ({exc})"
            ) from None
        try:
            yield self
        finally:
            _restore(loop, previous)


def _restore(loop: asyncio.AbstractEventLoop, previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        loop.remove_signal_handler(sig)
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


async def _first(main: Callable[[], Awaitable[None]], other: Awaitable[int]) -> int | None:
    """Run both; ``None`` when ``main`` finished first, else what ``other`` returned."""
    result: int | None = None
    async with anyio.create_task_group() as tg:

        async def run_main() -> None:
            await main()
            tg.cancel_scope.cancel()

        async def run_other() -> None:
            nonlocal result
            result = await other
            tg.cancel_scope.cancel()

        tg.start_soon(run_main)
        tg.start_soon(run_other)
    return result


async def wait_stopping_on_signals(running: _Stoppable, drain_timeout: float) -> None:
    """``running.wait()``, with SIGINT/SIGTERM stopping the flow (see ``RunningFlow.wait``).

    :raises Interrupted: a second signal, or the drain took longer than ``drain_timeout``.
    """
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0 seconds, got {drain_timeout!r}")
    catcher = SignalCatcher()
    with catcher.installed():
        first = await _first(running.wait, catcher.wait_for(1))
        if first is None:
            return  # the sources ended
        name = signal.Signals(first).name
        log.info(
            "flow.signal", flow=running.name, signal=name, action="drain", timeout_s=drain_timeout
        )
        second: int | None = None
        with anyio.move_on_after(drain_timeout) as deadline:
            second = await _first(lambda: running.stop(drain=True), catcher.wait_for(2))
        if second is None and not deadline.cancelled_caught:
            return  # drained
        reason: Literal["second signal", "drain timeout"] = (
            "drain timeout" if second is None else "second signal"
        )
        log.warning("flow.signal", flow=running.name, signal=name, action="stop", reason=reason)
        running._stop_at_once("interrupted")
        raise Interrupted(first, reason)
