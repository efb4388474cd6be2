"""Reconnecting with exponential backoff, and giving up after a deadline."""

from __future__ import annotations

import time

import anyio

from streamflow._logging import get_logger

from ._errors import BrokerUnavailable

__all__ = ["Backoff"]

log = get_logger("streamflow")


class Backoff:
    """Waits ``initial * 2**n`` seconds (at most ``maximum``) between attempts.

    ``await wait(error)`` logs ``connector.reconnect`` and sleeps; once the failures have
    lasted longer than ``give_up_after`` seconds (``None``: never) it raises
    :class:`BrokerUnavailable` instead, naming ``what`` and the last error. ``reset()`` after a
    success.
    """

    __slots__ = ("_attempt", "_since", "give_up_after", "initial", "maximum", "what")

    def __init__(
        self,
        what: str,
        *,
        give_up_after: float | None,
        initial: float = 0.1,
        maximum: float = 5.0,
    ) -> None:
        self.what = what
        self.give_up_after = give_up_after
        self.initial = initial
        self.maximum = maximum
        self._attempt = 0
        self._since: float | None = None

    @property
    def failing_for(self) -> float:
        """Seconds since the first failure after the last success (0 when healthy)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    def reset(self) -> None:
        if self._since is not None:
            log.info(
                "connector.reconnected", connector=self.what, after_s=round(self.failing_for, 3)
            )
        self._attempt = 0
        self._since = None

    def check(self, error: BaseException | str) -> None:
        """Raise :class:`BrokerUnavailable` if failing for longer than ``give_up_after``."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        failing = now - self._since
        if self.give_up_after is not None and failing >= self.give_up_after:
            raise BrokerUnavailable(
                f"{self.what}: unreachable for {failing:.1f} s "
                f"(reconnect_timeout={self.give_up_after} s); last error: {_text(error)}"
            ) from (error if isinstance(error, BaseException) else None)

    async def wait(self, error: BaseException | str) -> None:
        """Sleep before the next attempt, or raise :class:`BrokerUnavailable` (see class)."""
        self.check(error)
        delay = min(self.maximum, self.initial * 2**self._attempt)
        if self.give_up_after is not None:
            delay = max(0.0, min(delay, self.give_up_after - self.failing_for + 0.01))
        self._attempt += 1
        log.warning(
            "connector.reconnect",
            connector=self.what,
            attempt=self._attempt,
            delay_s=round(delay, 3),
            failing_s=round(self.failing_for, 3),
            error=_text(error),
        )
        await anyio.sleep(delay)


def _text(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
