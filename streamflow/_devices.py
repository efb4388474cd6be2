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
    """Dedicated threads (one by default) that run jobs; results come back to the event loop.

    With one thread jobs run in order; with ``threads=n`` up to ``n`` run at once (threads
    are started as jobs need them). ``await worker.run(fn, *args)`` never blocks the loop. If
    the awaiting task is cancelled, the job still finishes on its thread (Python threads
    cannot be interrupted) and its result is discarded; :meth:`aclose` waits for it, so no
    thread outlives its owner.
    """

    def __init__(
        self, name: str, initializer: Callable[[], Any] | None = None, *, threads: int = 1
    ) -> None:
        if threads < 1:
            raise ValueError(f"a worker needs at least one thread, got {threads}")
        self.name = name
        self.threads = threads
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._initializer = initializer
        self._running: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job that no queued job has claimed
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Claim a thread for the next job: an idle one, else a new one while fewer than
        ``threads`` run (else the job waits in the queue for the first thread free)."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                return
            if len(self._running) >= self.threads:
                return
            n = len(self._running)
            suffix = f"-{n}" if self.threads > 1 else ""
            thread = threading.Thread(
                target=self._main, name=f"streamflow-{self.name}{suffix}", daemon=True
            )
            self._running.append(thread)
        thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this worker's thread and return its result.

        A job that had already failed when the awaiting task was cancelled raises its error
        rather than the cancellation, so a failure that came first is never lost.
        """
        if self._closed:
            raise RuntimeError(f"worker {self.name!r} is closed")
        self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, future, loop))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            raise

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
        """Finish the queued jobs, stop the threads and wait for them (shielded from cancel)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            running = list(self._running)
        if not running:
            return
        loop = asyncio.get_running_loop()
        stops: list[asyncio.Future[None]] = []
        for _ in running:
            stops.append(loop.create_future())
            self._jobs.put((_STOP, (), stops[-1], loop))
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*stops)
        for thread in running:
            thread.join()

    def _main(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            fn, args, future, loop = self._jobs.get()
            result = error = None
            if fn is _STOP:
                loop.call_soon_threadsafe(resolve_future, future, None, None)
                return
            if loop is None:  # submit(): the callback runs here, on this thread
                try:
                    result, error = fn(*args), None
                except BaseException as exc:
                    result, error = None, exc
                future(result, error)
            elif not future.cancelled():
                try:
                    result, error = fn(*args), None
                except BaseException as exc:
                    result, error = None, exc
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                    loop.call_soon_threadsafe(resolve_future, future, result, error)
            del fn, args, future, result, error
            with self._lock:
                self._idle += 1


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

    def get(self, device: str, *, threads: int = 1) -> Worker:
        """The worker named ``device``, created with ``threads`` threads on first use."""
        worker = self._workers.get(device)
        if worker is None:
            worker = Worker(device, self._initializers.get(device), threads=threads)
            self._workers[device] = worker
        return worker

    async def aclose(self) -> None:
        for worker in self._workers.values():
            await worker.aclose()
        self._workers.clear()
