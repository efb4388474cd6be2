"""Dynamic programming over contiguous layer splits assigned to devices in order.

A split is a list of stages ``(start, end, device_index)`` covering layers ``0..n`` with
strictly increasing device indices (devices may be skipped, so fewer stages than devices
is allowed). ``stage_s(start, end, device, prev_device)`` gives the time of one stage,
including its incoming transfer (``prev_device`` is ``None`` for the first stage).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Split", "StageTime", "min_bottleneck", "min_latency", "min_stages_within"]

Split = list[tuple[int, int, int]]
StageTime = Callable[[int, int, int, int | None], float]

_REL_TOL = 1e-9
_ABS_TOL = 1e-15


def _before(x: tuple[float, ...], y: tuple[float, ...]) -> bool:
    """Lexicographic ``x < y`` treating nearly equal floats as ties."""
    for u, v in zip(x, y, strict=True):
        if abs(u - v) > max(_REL_TOL * max(abs(u), abs(v)), _ABS_TOL):
            return u < v
    return False


def min_bottleneck(n: int, ndev: int, stage_s: StageTime) -> float:
    """The smallest achievable maximum stage time over all splits."""
    inf = float("inf")
    best = [[inf] * ndev for _ in range(n + 1)]  # best[i][j]: layers [0, i), last on device j
    for end in range(1, n + 1):
        for j in range(ndev):
            value = stage_s(0, end, j, None)
            for start in range(1, end):
                for jp in range(j):
                    if best[start][jp] < value:
                        value = min(value, max(best[start][jp], stage_s(start, end, j, jp)))
            best[end][j] = value
    return min(best[n])


def _cheapest(
    n: int,
    ndev: int,
    stage_s: StageTime,
    score: Callable[[int, float], tuple[float, ...]],
    limit: float,
) -> Split | None:
    """The split minimising ``score(stages, latency)`` whose stages all take <= ``limit``."""
    # cell[i][j] = (stage count, latency, parent (start, device) or None)
    cell: list[list[tuple[int, float, tuple[int, int] | None] | None]]
    cell = [[None] * ndev for _ in range(n + 1)]
    for end in range(1, n + 1):
        for j in range(ndev):
            chosen: tuple[int, float, tuple[int, int] | None] | None = None
            first = stage_s(0, end, j, None)
            if first <= limit:
                chosen = (1, first, None)
            for start in range(1, end):
                for jp in range(j):
                    prev = cell[start][jp]
                    if prev is None:
                        continue
                    t = stage_s(start, end, j, jp)
                    if t > limit:
                        continue
                    option = (prev[0] + 1, prev[1] + t, (start, jp))
                    if chosen is None or _before(
                        score(option[0], option[1]), score(chosen[0], chosen[1])
                    ):
                        chosen = option
            cell[end][j] = chosen
    finals = [(j, c) for j, c in enumerate(cell[n]) if c is not None]
    if not finals:
        return None
    j, best = finals[0]
    for jj, c in finals[1:]:
        if _before(score(c[0], c[1]), score(best[0], best[1])):
            j, best = jj, c
    split: Split = []
    end, node = n, best
    while True:
        parent = node[2]
        start = 0 if parent is None else parent[0]
        split.append((start, end, j))
        if parent is None:
            return split[::-1]
        end, j = parent
        found = cell[end][j]
        assert found is not None
        node = found


def min_stages_within(n: int, ndev: int, stage_s: StageTime, limit: float) -> Split:
    """Fewest stages, then lowest total latency, with every stage taking <= ``limit``."""
    split = _cheapest(n, ndev, stage_s, lambda k, lat: (k, lat), limit)
    if split is None:
        raise ValueError(f"no split has every stage within {limit!r} s")
    return split


def min_latency(n: int, ndev: int, stage_s: StageTime) -> Split:
    """Lowest total latency (sum of stage times), then fewest stages."""
    split = _cheapest(n, ndev, stage_s, lambda k, lat: (lat, k), float("inf"))
    assert split is not None
    return split
