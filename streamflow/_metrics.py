"""Per-stage counters and latency samples, and the snapshots users read."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from ._message import Message, Outcome

__all__ = ["LATENCY_BOUNDS_S", "StageMetrics"]

_SAMPLES = 2048  # latency ring buffer per stage (a power of two)

#: Upper bounds (seconds) of the latency histograms' buckets, 100 us to 10 s; a last bucket
#: (``inf``) takes the rest.
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BOUNDS = LATENCY_BOUNDS_S
_EDGES = (*LATENCY_BOUNDS_S, float("inf"))
_FIRST = LATENCY_BOUNDS_S[0]
_MASK = _SAMPLES - 1
_NAN = float("nan")


@dataclass(frozen=True, slots=True)
class StageMetrics:
    """A snapshot of one stage's counters.

    ``busy`` is the fraction of the stage's running time spent inside its function.
    Latencies are over the last 2048 samples: ``latency_*`` is the time the stage spent on
    an item (for items handled as one run, the run's mean per item), ``end_to_end_*`` (sinks
    only) the time since the item left its source.
    ``outcomes`` (sources only) counts acknowledged source items by outcome name.
    ``latency_buckets`` and ``end_to_end_buckets`` are histograms over the whole run (not
    only the last samples): ``(upper bound in s, items at or under it)`` pairs, cumulative,
    the last bound ``inf``; ``*_sum_s`` is the sum of the latencies counted. An item of a run
    counts the run's mean per item. ``state`` (keyed stages only) is what the stage holds:
    ``keys`` and ``expired`` for ``stateful_map``; ``keys``, ``windows_open``,
    ``items_held`` (an item in three sliding windows counts three times) and ``late`` for
    ``window``.
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
    latency_buckets: tuple[tuple[float, int], ...] = ()
    latency_sum_s: float = 0.0
    end_to_end_buckets: tuple[tuple[float, int], ...] = ()
    end_to_end_sum_s: float = 0.0
    state: dict[str, int] = field(default_factory=dict)


class Counters:
    """Mutable counters, each written by one thread only: a stage runner's on the event loop,
    a pipeline or trainer part's on its device thread."""

    __slots__ = (
        "busy_s",
        "dropped",
        "e2e",
        "e2e_hist",
        "e2e_i",
        "e2e_sum",
        "errors",
        "items_in",
        "items_out",
        "lat",
        "lat_hist",
        "lat_i",
        "outcomes",
        "retries",
        "skipped",
        "started",
        "state",
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
        # rings of the last samples (NaN: not written yet), and where the next one goes
        self.lat = [_NAN] * _SAMPLES
        self.lat_i = 0
        self.e2e = [_NAN] * _SAMPLES
        self.e2e_i = 0
        self.lat_hist = [0] * len(_EDGES)  # per bucket, not cumulative; the sum is busy_s
        self.e2e_hist = [0] * len(_EDGES)
        self.e2e_sum = 0.0
        self.outcomes: defaultdict[int, int] = defaultdict(int)  # by Outcome value
        self.started = time.perf_counter()
        self.stopped: float | None = None
        self.state: dict[str, int] | None = None  # what a keyed stage holds (its own dict)

    def record(self, seconds: float) -> None:
        """One item took ``seconds`` inside the stage's function."""
        self.busy_s += seconds
        if seconds <= _FIRST:  # the common case, without a search
            self.lat_hist[0] += 1
        else:
            self.lat_hist[bisect_left(_BOUNDS, seconds)] += 1
        i = self.lat_i
        self.lat[i] = seconds
        self.lat_i = (i + 1) & _MASK

    def record_run(self, seconds: float, n: int) -> None:
        """A run of ``n`` items came in and took ``seconds`` in all: one latency sample,
        the mean."""
        self.items_in += n
        self.busy_s += seconds
        sample = seconds / n
        if sample <= _FIRST:
            self.lat_hist[0] += n
        else:
            self.lat_hist[bisect_left(_BOUNDS, sample)] += n
        i = self.lat_i
        self.lat[i] = sample
        self.lat_i = (i + 1) & _MASK

    def record_arrivals(self, now: float, msgs: list[Message[Any]]) -> None:
        """A run of messages reached a sink at ``now``: each one's end-to-end latency."""
        e2e, i, hist, total = self.e2e, self.e2e_i, self.e2e_hist, 0.0
        for msg in msgs:
            took = now - msg._born
            total += took
            if took <= _FIRST:
                hist[0] += 1
            else:
                hist[bisect_left(_BOUNDS, took)] += 1
            e2e[i] = took
            i = (i + 1) & _MASK
        self.e2e_i = i
        self.e2e_sum += total

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
            outcomes={_name(Outcome(k)): v for k, v in list(self.outcomes.items())},
            latency_buckets=_cumulative(self.lat_hist),
            latency_sum_s=self.busy_s,
            end_to_end_buckets=_cumulative(self.e2e_hist) if any(self.e2e_hist) else (),
            end_to_end_sum_s=self.e2e_sum,
            state=dict(self.state) if self.state else {},
        )


def _cumulative(hist: list[int]) -> tuple[tuple[float, int], ...]:
    return tuple(zip(_EDGES, accumulate(list(hist)), strict=True))


def _quantiles(ring: list[float]) -> tuple[float | None, float | None]:
    ordered = sorted(s for s in list(ring) if s == s)  # NaN: a slot not written yet
    if not ordered:
        return None, None
    n = len(ordered)
    return ordered[(n - 1) // 2], ordered[min(n - 1, round(0.99 * (n - 1)))]


def _name(outcome: Outcome) -> str:
    return "|".join(sorted(m.name.lower() for m in outcome if m.name)) or "none"
