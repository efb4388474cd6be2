"""The bad-record log, rate-limited: a flood of malformed input must not flood the logs.

Per source (``Record.source``), the first :data:`FULL` malformed records are logged in full
as ``connector.bad_record``; after that they are counted, and a ``connector.bad_records``
line (how many since the last line, the total, the last one's position and reason) is logged
at most once per :data:`EVERY_S` seconds, when the next bad record comes. A source with no
bad record for :data:`QUIET_S` seconds starts over with full lines. The error policy still
sees every bad record (``errors="skip"`` counts each one in the stage's metrics).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from streamflow._logging import get_logger

__all__ = ["EVERY_S", "FULL", "QUIET_S", "BadRecordLog"]

FULL = 10
EVERY_S = 10.0
QUIET_S = 60.0
_SOURCES = 4096  # sources tracked at most (then the oldest are forgotten)

log = get_logger("streamflow")


class _Tally:
    __slots__ = ("last_bad", "last_line", "since_line", "total")

    def __init__(self, now: float) -> None:
        self.total = 0
        self.since_line = 0
        self.last_line = now
        self.last_bad = now


class BadRecordLog:
    """Logs malformed records per source as the module docstring says (thread-safe: a decode
    stage may run on a worker thread). ``clock`` is for tests."""

    def __init__(
        self,
        full: int = FULL,
        every_s: float = EVERY_S,
        quiet_s: float = QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.full, self.every_s, self.quiet_s, self.clock = full, every_s, quiet_s, clock
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    def __call__(self, source: str, position: Mapping[str, Any], **fields: Any) -> None:
        """One malformed record from ``source`` at ``position``; ``fields``: codec, size,
        reason."""
        now = self.clock()
        with self._lock:
            tally = self._tallies.get(source)
            if tally is None or now - tally.last_bad >= self.quiet_s:
                if len(self._tallies) >= _SOURCES:
                    del self._tallies[next(iter(self._tallies))]
                tally = self._tallies[source] = _Tally(now)
            tally.last_bad = now
            tally.total += 1
            tally.since_line += 1
            if tally.total <= self.full:
                full, summary = True, 0
            elif now - tally.last_line >= self.every_s:
                full, summary = False, tally.since_line
            else:
                return
            tally.since_line, tally.last_line, total = 0, now, tally.total
        if full:
            log.warning("connector.bad_record", source=source, **position, **fields)
            if total == self.full:
                log.warning(
                    "connector.bad_records_limited",
                    source=source,
                    logged=self.full,
                    every_s=self.every_s,
                )
        else:
            log.warning(
                "connector.bad_records",
                source=source,
                count=summary,
                total=total,
                last=dict(position),
                reason=fields.get("reason"),
            )


bad_record = BadRecordLog()
"""The process's bad-record log, used by :func:`streamflow.connectors.decode`."""
