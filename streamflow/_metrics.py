"""Per-stage counters and latency samples, and the snapshots users read."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ._message import Message, Outcome

__all__ = ["StageMetrics"]

_SAMPLES = 2048  # latency ring buffer per stage (a power of two)


@dataclass(frozen=True, slots=True)
class StageMetrics:
    """A snapshot of one stage's counters.

    ``busy`` is the fraction of the stage's running time spent inside its function.
    Latencies are over the last 2048 samples: ``latency_*`` is the time the stage spent on
    an item (for items handled as one run, the run's mean per item), ``end_to_end_*`` (sinks
    only) the time since the item left its source.
    ``outcomes`` (sources only) counts acknowledged source items by outcome name.
    """

    stage: str
    kind: str
    items_in: int
    items_out: int
    errors: int
    dropped: int
    skipped: int
    retries: int
    queue_depth: int
    capacity: int
    busy: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    end_to_end_p50_s: float | None = None
    end_to_end_p99_s: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)


class Counters:
    """Mutable counters, each written by one thread only: a stage runner's on the event loop,
    a pipeline or trainer part's on its device thread."""

    __slots__ = (
        "busy_s",
        "dropped",
        "e2e",
        "e2e_i",
        "errors",
        "items_in",
        "items_out",
        "lat",
        "lat_i",
        "outcomes",
        "retries",
        "skipped",
        "started",
        "stopped",
    )

    def __init__(self) -> None:
        self.items_in = 0
        self.items_out = 0
        self.errors = 0
        self.dropped = 0
        self.skipped = 0
        self.retries = 0
        self.busy_s = 0.0
        self.lat: list[float] = []
        self.lat_i = 0
        self.e2e: list[float] = []
        self.e2e_i = 0
        self.outcomes: defaultdict[int, int] = defaultdict(int)  # by Outcome value
        self.started = time.perf_counter()
        self.stopped: float | None = None

    def record(self, seconds: float) -> None:
        """One item took ``seconds`` inside the stage's function."""
        self.busy_s += seconds
        lat = self.lat
        if len(lat) < _SAMPLES:
            lat.append(seconds)
        else:
            lat[self.lat_i] = seconds
            self.lat_i = (self.lat_i + 1) & (_SAMPLES - 1)

    def record_run(self, seconds: float, n: int) -> None:
        """A run of ``n`` items came in and took ``seconds`` in all: one latency sample,
        the mean."""
        self.items_in += n
        self.busy_s += seconds
        sample = seconds / n
        lat = self.lat
        if len(lat) < _SAMPLES:
            lat.append(sample)
        else:
            lat[self.lat_i] = sample
            self.lat_i = (self.lat_i + 1) & (_SAMPLES - 1)

    def record_arrivals(self, now: float, msgs: list[Message[Any]]) -> None:
        """A run of messages reached a sink at ``now``: each one's end-to-end latency."""
        e2e, i = self.e2e, self.e2e_i
        for msg in msgs:
            if len(e2e) < _SAMPLES:
                e2e.append(now - msg._born)
            else:
                e2e[i] = now - msg._born
                i = (i + 1) & (_SAMPLES - 1)
        self.e2e_i = i

    def snapshot(self, stage: str, kind: str, depth: int, capacity: int) -> StageMetrics:
        end = self.stopped if self.stopped is not None else time.perf_counter()
        elapsed = max(end - self.started, 1e-9)
        p50, p99 = _quantiles(self.lat)
        e50, e99 = _quantiles(self.e2e)
        return StageMetrics(
            stage=stage,
            kind=kind,
            items_in=self.items_in,
            items_out=self.items_out,
            errors=self.errors,
            dropped=self.dropped,
            skipped=self.skipped,
            retries=self.retries,
            queue_depth=depth,
            capacity=capacity,
            busy=min(1.0, self.busy_s / elapsed),
            latency_p50_s=p50,
            latency_p99_s=p99,
            end_to_end_p50_s=e50,
            end_to_end_p99_s=e99,
            outcomes={_name(Outcome(k)): v for k, v in self.outcomes.items()},
        )


def _quantiles(samples: list[float]) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    ordered = sorted(samples)
    n = len(ordered)
    return ordered[(n - 1) // 2], ordered[min(n - 1, round(0.99 * (n - 1)))]


def _name(outcome: Outcome) -> str:
    return "|".join(sorted(m.name.lower() for m in outcome if m.name)) or "none"
