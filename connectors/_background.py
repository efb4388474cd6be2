"""The background tasks of a connector source: a client's poll loop, a commit loop.

Every source that a background client fills starts its tasks, guards them and stops them
the same way; this is that one way. A task that fails for good becomes the source's error
(a :class:`~streamflow.connectors.ConnectorError` naming the connector, logged as
``connector.failed``), which the flow sees at its next item; stopping cancels every task
and joins it, shielded, so nothing outlives the source.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from streamflow._logging import get_logger

from ._errors import ConnectorError

__all__ = ["Background"]

log = get_logger("streamflow")


class Background:
    """The tasks of one connector run. ``fail(error)`` is told when one fails for good."""

    def __init__(self, what: str, fail: Callable[[BaseException], None]) -> None:
        self.what = what
        self._fail = fail
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self, body: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``body`` as a background task of this connector."""
        task = asyncio.get_running_loop().create_task(self._guard(body), name=name)
        self._tasks.append(task)

    async def _guard(self, body: Coroutine[Any, Any, None]) -> None:
        try:
            await body
        except asyncio.CancelledError:
            raise
        except ConnectorError as exc:
            self._failed(exc)
        except Exception as exc:
            error = ConnectorError(f"{self.what} failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            self._failed(error)

    def _failed(self, error: BaseException) -> None:
        log.error("connector.failed", connector=self.what, error=str(error))
        self._fail(error)

    async def stop(self) -> None:
        """Cancel every task and wait for it (shielded from the caller's cancellation)."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
