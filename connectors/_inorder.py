"""In-order completion over out-of-order acknowledgements (the offset-commit rule)."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["InOrder"]

K = TypeVar("K")
V = TypeVar("V")


class InOrder(Generic[K, V]):
    """Items are tracked in arrival order and finish in any order; ``done`` releases the
    longest finished prefix.

    This is the rule for committing offsets: a position may only move past an item when that
    item *and every item before it* is finished, so a slow item is never skipped by a later
    commit. Memory is one entry per tracked, unreleased item (the caller bounds that).
    """

    __slots__ = ("_done", "_order", "_values", "last")

    def __init__(self) -> None:
        self._order: deque[K] = deque()
        self._values: dict[K, V] = {}
        self._done: set[K] = set()
        self.last: V | None = None
        """The value of the last item released."""

    def track(self, key: K, value: V) -> None:
        """Add an item after every item tracked so far (keys must be unique while tracked)."""
        self._order.append(key)
        self._values[key] = value

    def done(self, key: K) -> list[V]:
        """Mark ``key`` finished; return the values released by it, oldest first (empty if an
        earlier item is still pending, or if ``key`` is unknown)."""
        if key not in self._values:
            return []
        self._done.add(key)
        order, done, values = self._order, self._done, self._values
        released: list[V] = []
        while order and order[0] in done:
            head = order.popleft()
            done.discard(head)
            released.append(values.pop(head))
        if released:
            self.last = released[-1]
        return released

    def release(self, key: K) -> int:
        """Like :meth:`done`, but return only how many items were released (the last one's
        value is in :attr:`last`); no list is built."""
        values = self._values
        if key not in values:
            return 0
        order, done = self._order, self._done
        done.add(key)
        n = 0
        while order and order[0] in done:
            head = order.popleft()
            done.discard(head)
            self.last = values.pop(head)
            n += 1
        return n

    def discard_after(self, keep: int) -> list[K]:
        """Forget every pending item after the first ``keep`` (unsent, to be read again); return
        their keys."""
        dropped: list[K] = []
        while len(self._order) > keep:
            key = self._order.pop()
            self._values.pop(key, None)
            self._done.discard(key)
            dropped.append(key)
        dropped.reverse()
        return dropped

    def __len__(self) -> int:
        """Items tracked and not released yet."""
        return len(self._order)

    def __bool__(self) -> bool:
        return bool(self._order)
