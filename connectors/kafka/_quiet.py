"""Keep aiokafka's expected, transient complaints off the user's console.

When a producer writes to (or a consumer subscribes to) a topic the broker creates on first
use, aiokafka's metadata update logs ``Topic ... not found in cluster metadata`` (ERROR) and
``Topic ... is not available during auto-create initialization`` (WARNING) until the topic
exists: normal operation, not a fault. So is ``Heartbeat failed for group ... because it is
rebalancing`` (WARNING), logged by every member each time a consumer joins or leaves its
group. A filter on those loggers lowers these records to DEBUG (it never drops a record), so
they show only where the application asked for aiokafka's debug logs. A topic that never
appears still fails the connector (a producer's send times out, and that error is raised),
and a rebalance that fails still raises in the source.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_auto_create"]

_TRANSIENT = (
    "Topic %s not found in cluster metadata",
    "Topic %s is not available during auto-create initialization",
    "Heartbeat failed for group %s because it is rebalancing",
)
_LOGGERS = ("aiokafka.cluster", "aiokafka.consumer.group_coordinator")


class _AutoCreateNoise(logging.Filter):
    """Lowers aiokafka's auto-create and rebalancing records to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _TRANSIENT or record.levelno <= logging.DEBUG:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # the logger let the record through at its original level: decide again at DEBUG
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_filter = _AutoCreateNoise()


def quiet_auto_create() -> None:
    """Install the filter on aiokafka's cluster and group loggers (once per process)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
