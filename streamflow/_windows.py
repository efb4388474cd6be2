"""Window shapes and the windows a window stage emits.

A time window is half-open, ``[start, end)``, in the stream's time (event time from the
stage's ``time=`` function, or processing time: ``time.time()`` when the item arrives).
Tumbling and sliding windows are aligned to ``offset`` (0: multiples of the size from the
epoch): an item at time ``t`` belongs to the tumbling window starting at
``offset + size * floor((t - offset) / size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Count", "Session", "Sliding", "Tumbling", "Window", "Windower"]

T = TypeVar("T")


def _positive(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Tumbling:
    """Back-to-back windows of ``size`` seconds: each item is in exactly one."""

    size: float
    offset: float = 0.0

    def __post_init__(self) -> None:
        _positive("Tumbling size", self.size)

    def spans(self, t: float) -> list[tuple[float, float]]:
        """The windows an item at time ``t`` belongs to, ``(start, end)``."""
        start = self.offset + self.size * math.floor((t - self.offset) / self.size)
        return [(start, start + self.size)]


@dataclass(frozen=True, slots=True)
class Sliding:
    """Windows of ``size`` seconds starting every ``every`` seconds: an item is in about
    ``size / every`` of them (in none when ``every > size`` leaves it in a gap)."""

    size: float
    every: float
    offset: float = 0.0

    def __post_init__(self) -> None:
        _positive("Sliding size", self.size)
        _positive("Sliding every", self.every)

    def spans(self, t: float) -> list[tuple[float, float]]:
        """The windows an item at time ``t`` belongs to, earliest start first."""
        last = self.offset + self.every * math.floor((t - self.offset) / self.every)
        out = []
        start = last
        while start + self.size > t:
            out.append((start, start + self.size))
            start -= self.every
        out.reverse()
        return out


@dataclass(frozen=True, slots=True)
class Session:
    """Per key, items less than ``gap`` seconds apart form one window; it ends ``gap``
    seconds after its last item (``[first, last + gap)``). An item that bridges two
    sessions merges them."""

    gap: float

    def __post_init__(self) -> None:
        _positive("Session gap", self.gap)


@dataclass(frozen=True, slots=True)
class Count:
    """Per key, every ``size`` items make a window (the rest at the end of the stream).
    Its ``start`` and ``end`` count the key's items: ``[0, size)``, ``[size, 2 * size)``,
    ...; time plays no part."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Count size must be an int >= 1, got {self.size!r}")


Windower = Tumbling | Sliding | Session | Count
"""A window shape, for ``KeyedStream.window``."""


@dataclass(slots=True)
class Window(Generic[T]):
    """One closed window of one key: the items that fell in ``[start, end)``, in the order
    they arrived (empty when the stage aggregates), and ``value``, the aggregate (with
    ``aggregate=``; else ``None``). ``late=True``: an update with items that arrived after
    the window was emitted (``late="emit"``): it holds only those items."""

    key: Any
    start: float
    end: float
    items: list[T] = field(default_factory=list)
    value: Any = None
    late: bool = False
