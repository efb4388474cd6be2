"""Where a running flow is in its life: what a health check reads."""

from __future__ import annotations

import enum

__all__ = ["FlowState"]


class FlowState(enum.StrEnum):
    """The state of a :class:`~streamflow.RunningFlow` (``running.state``); compares equal to
    its value (``running.state == "failed"``).

    ``STARTING`` -> ``RUNNING`` -> (``DRAINING`` ->) ``STOPPED``, or ``FAILED`` from any of
    them. Only ``RUNNING`` takes new items; ``STOPPED`` and ``FAILED`` are final.
    """

    STARTING = "starting"
    """Built (``flow.start()``) and not entered yet."""
    RUNNING = "running"
    """Entered: stages set up and items flowing."""
    DRAINING = "draining"
    """``stop(drain=True)`` was called (or the block was left): sources have stopped, the
    items already taken are on their way to the sinks; ``Channel`` sources are closed."""
    STOPPED = "stopped"
    """Ended without a stage failing: the sources ended, it drained, or it was stopped
    without draining (then what was still inside was acked ``ABORTED``)."""
    FAILED = "failed"
    """A stage failed with ``errors="fail"`` (``running.error``); every item still inside
    was acked ``ABORTED``."""
