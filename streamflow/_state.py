"""Keyed state: what a stateful stage keeps per key, behind one small interface that a
checkpoint can snapshot and restore, and the stage behind ``KeyedStream.stateful_map``."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ._message import Message
from ._stage import Stage, StageContext

__all__ = ["KeyedState", "StatefulMap"]

S = TypeVar("S")

_SWEEP_EVERY = 256  # calls between two looks for idle keys


class KeyedState(Generic[S]):
    """Values by key, in plain Python objects (or tensors), each with the time it was last
    touched. ``ttl`` (seconds, processing time) forgets a key nobody touched for that long
    (looked for by :meth:`expire`). Not thread-safe: one stage's task or worker uses it.

    ``snapshot()`` returns a plain dict ``{key: value}`` and ``restore(d)`` replaces the
    contents with one: the whole interface a checkpoint needs.
    """

    def __init__(self, ttl: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._values: OrderedDict[Any, S] = OrderedDict()
        self._touched: dict[Any, float] = {}
        self.expired = 0

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def get(self, key: Any) -> S | None:
        """The key's value, or ``None`` when it has none."""
        return self._values.get(key)

    def set(self, key: Any, value: S) -> None:
        """Keep ``value`` for ``key`` (``touched`` now)."""
        values = self._values
        values[key] = value
        if self.ttl is not None:
            values.move_to_end(key)
            self._touched[key] = self._clock()

    def delete(self, key: Any) -> None:
        """Forget ``key`` (nothing happens when it is not there)."""
        self._values.pop(key, None)
        self._touched.pop(key, None)

    def expire(self) -> int:
        """Forget the keys idle for longer than ``ttl``; how many went."""
        if self.ttl is None:
            return 0
        oldest = self._clock() - self.ttl
        values, touched, gone = self._values, self._touched, 0
        while values:
            key = next(iter(values))
            if touched.get(key, oldest) > oldest:
                break  # keys are in the order they were last set: the rest are newer
            del values[key]
            touched.pop(key, None)
            gone += 1
        self.expired += gone
        return gone

    def snapshot(self) -> dict[Any, S]:
        """A copy of every key's value (the values themselves are not copied)."""
        return dict(self._values)

    def restore(self, values: dict[Any, S]) -> None:
        """Replace the contents with ``values`` (every key touched now)."""
        self._values = OrderedDict(values)
        now = self._clock()
        self._touched = dict.fromkeys(self._values, now) if self.ttl is not None else {}


class StatefulMap(Stage[Message[Any], Any]):
    """``fn(state | None, item) -> (state | None, output)`` per item, with the state of the
    item's key; a returned state of ``None`` forgets the key. Items of one key are handled
    one at a time, in order. The state lives in :attr:`state` (a :class:`KeyedState`),
    created afresh at each run's setup."""

    def __init__(self, fn: Callable[[Any, Any], tuple[Any, Any]], ttl: float | None) -> None:
        self.fn = fn
        self.ttl = ttl
        self.state: KeyedState[Any] = KeyedState(ttl)
        self.counts = {"keys": 0, "expired": 0}  # the stage's metrics ``state``
        self._calls = 0

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"stateful {name}" + (f" ttl={self.ttl:g}s" if self.ttl is not None else "")

    def setup(self, context: StageContext) -> None:
        """A fresh, empty state for the run."""
        self.state = KeyedState(self.ttl)
        self.counts.update(keys=0, expired=0)
        self._calls = 0

    def process(self, msg: Message[Any]) -> Any:
        """Run ``fn`` on the item with its key's state; keep or forget the new state."""
        state, key = self.state, msg.key
        result = self.fn(state.get(key), msg.value)
        try:
            new, out = result
        except (TypeError, ValueError):
            raise TypeError(
                f"a stateful_map function returns (state, output), got {type(result).__name__}"
            ) from None
        if new is None:
            state.delete(key)
        else:
            state.set(key, new)
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0 and state.ttl is not None:
            state.expire()
            self.counts["expired"] = state.expired
        self.counts["keys"] = len(state)
        return out

    def snapshot(self) -> dict[str, Any]:
        """Every key's state, for a checkpoint (as a list of pairs: keys of any type)."""
        return {"keys": list(self.state.snapshot().items()), "expired": self.state.expired}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Take back the keys of :meth:`snapshot` (called after setup, before any item)."""
        self.state.restore(dict(snapshot["keys"]))
        self.state.expired = snapshot["expired"]
        self.counts.update(keys=len(self.state), expired=self.state.expired)
