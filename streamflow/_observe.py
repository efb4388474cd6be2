"""What an observer (the Prometheus collector, the live view) reads from a running flow: its
stage metrics, its trainers' metrics, the length of sources that know it, and its state."""

from __future__ import annotations

import sys
from collections.abc import Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._io import iterate
from ._metrics import StageMetrics

if TYPE_CHECKING:
    from ._checkpointer import CheckpointStats
    from ._runtime import RunningFlow
    from .parallel import TrainerMetrics

__all__ = ["FlowSnapshot", "snapshot"]


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """One look at a running flow. ``stages`` in the flow's order (a pipeline's or trainer's
    parts right after their stage), ``kinds`` and ``devices`` by stage, ``totals`` the
    length of each source that knows it, ``trainers`` the metrics of each OnlineTrainer
    stage, ``state`` the flow's state (``None`` where the runtime does not tell it)."""

    flow: str
    stages: dict[str, StageMetrics]
    devices: dict[str, str | None]
    totals: dict[str, int]
    trainers: dict[str, TrainerMetrics]
    state: str | None
    error: str | None
    checkpoints: CheckpointStats | None = None


def snapshot(running: RunningFlow) -> FlowSnapshot:
    """Read everything once (on the event loop's thread: counters are written there)."""
    trainers: dict[str, TrainerMetrics] = {}
    totals: dict[str, int] = {}
    devices: dict[str, str | None] = {}
    training = _trainer_type()
    for spec in running.spec.stages:
        devices[spec.name] = spec.device
        fn = spec.fn
        if spec.kind == "source":
            total = source_length(fn)
            if total is not None:
                totals[spec.name] = total
        trainer = getattr(fn, "trainer", None)
        if training is not None and isinstance(trainer, training):
            trainers[spec.name] = trainer.metrics()
    state = getattr(running, "state", None)
    error = getattr(running, "error", None)
    return FlowSnapshot(
        flow=running.name,
        stages=running.metrics(),
        devices=devices,
        totals=totals,
        trainers=trainers,
        state=None if state is None else str(getattr(state, "value", state)),
        error=None if error is None else str(error),
        checkpoints=getattr(running, "checkpoints", None),
    )


def source_length(source: Any) -> int | None:
    """How many items a source will yield, when it knows: ``len()`` of what
    :class:`~streamflow.iterate` got, if it has one."""
    if isinstance(source, iterate) and isinstance(source.iterable, Sized):
        try:
            return len(source.iterable)
        except Exception:  # a __len__ that raises: the length is unknown
            return None
    return None


def _trainer_type() -> type[Any] | None:
    # a trainer needs torch: when streamflow.parallel was never imported there is none
    if "streamflow.parallel" not in sys.modules:
        return None
    from .parallel import OnlineTrainer

    return OnlineTrainer
