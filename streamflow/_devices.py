"""Device names and the dedicated worker threads behind ``"cpu:N"`` and ``"cuda:N"``."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

__all__ = ["Worker", "WorkerPool", "parse_device", "resolve_future"]

T = TypeVar("T")
_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")
_STOP: Any = object()


def parse_device(name: object) -> tuple[str, int | None]:
    """Split ``"cpu"``, ``"cpu:N"`` or ``"cuda:N"`` into ``(kind, index)``.

    :raises ValueError: for anything else (the message says what is accepted).
    """
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"bad device {name!r}: expected None, 'cpu', 'cpu:N' or 'cuda:N' (e.g. 'cpu:0')"
        )
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


class Worker:
    """One dedicated thread that runs jobs in order; results come back to the event loop.

    ``await worker.run(fn, *args)`` never blocks the loop. If the awaiting task is cancelled,
    the job still finishes on the thread (Python threads cannot be interrupted) and its result
    is discarded; :meth:`aclose` waits for it, so no thread outlives its owner.
    """

    def __init__(self, name: str, initializer: Callable[[], Any] | None = None) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._initializer = initializer
        self._thread = threading.Thread(target=self._main, name=f"streamflow-{name}", daemon=True)
        self._started = False
        self._closed = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this worker's thread and return its result."""
        if self._closed:
            raise RuntimeError(f"worker {self.name!r} is closed")
        self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, future, loop))
        return await future

    def submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """Run ``fn(*args)`` on this worker's thread, then ``done(result, error)`` on that same
        thread. For thread-to-thread hand-offs that must not go through the event loop."""
        if self._closed:
            raise RuntimeError(f"worker {self.name!r} is closed")
        self.start()
        self._jobs.put((fn, args, done, None))

    async def aclose(self) -> None:
        """Finish the queued jobs, stop the thread and wait for it (shielded from cancel)."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._jobs.put((_STOP, (), done, loop))
        with anyio.CancelScope(shield=True):
            await done
        self._thread.join()

    def _main(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            fn, args, future, loop = self._jobs.get()
            if fn is _STOP:
                loop.call_soon_threadsafe(resolve_future, future, None, None)
                return
            if loop is None:  # submit(): the callback runs here, on this thread
                try:
                    result, error = fn(*args), None
                except BaseException as exc:
                    result, error = None, exc
                future(result, error)
                del fn, args, future, result, error
                continue
            if future.cancelled():
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(resolve_future, future, result, error)
            del fn, args, future, result, error


def resolve_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Set ``future``'s result or exception unless it was cancelled (run it on its loop)."""
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WorkerPool:
    """The dedicated workers of one running flow, created on first use by device name."""

    def __init__(self, initializers: dict[str, Callable[[], Any]] | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._initializers = initializers or {}

    def get(self, device: str) -> Worker:
        worker = self._workers.get(device)
        if worker is None:
            worker = Worker(device, self._initializers.get(device))
            self._workers[device] = worker
        return worker

    async def aclose(self) -> None:
        for worker in self._workers.values():
            await worker.aclose()
        self._workers.clear()
