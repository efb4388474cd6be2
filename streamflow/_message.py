"""The envelope around every item, and the acknowledgement that follows it to the sinks."""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["AckCallback", "Message", "Outcome"]

T = TypeVar("T")


class Outcome(enum.Flag):
    """How the items derived from one source item ended.

    Flags combine: a broadcast item delivered by one branch and filtered in another is
    ``DELIVERED | FILTERED``.
    """

    DELIVERED = enum.auto()
    """A sink accepted it."""
    FILTERED = enum.auto()
    """A ``filter`` (or an empty ``flat_map``) removed it."""
    DROPPED = enum.auto()
    """A channel's overflow policy dropped it."""
    SKIPPED = enum.auto()
    """A stage failed on it and its policy skipped it."""
    DEAD_LETTERED = enum.auto()
    """A stage failed on it and it went to the dead-letter sink."""
    ABORTED = enum.auto()
    """The flow stopped before the item was handled: a stage failed (``errors="fail"``), or
    the flow was stopped without draining or cancelled. Whether a sink saw it is unknown;
    at-least-once connectors do not commit it, so it is delivered again."""
    LATE = enum.auto()
    """It came after the window it belongs to had closed (event time past the watermark),
    and the window stage's ``late="drop"`` dropped it."""


AckCallback = Callable[[Outcome], None]
"""Called once on the event loop when every item derived from a source item is handled."""


class Message(Generic[T]):
    """An item with its metadata, as it travels between stages.

    Sources may yield ``Message(value, meta=..., on_ack=...)`` to attach metadata (key,
    partition, offset, ...) and to learn, through ``on_ack(outcome)``, when everything derived
    from the item has been handled. Plain values are wrapped automatically. ``on_ack`` runs on
    the event loop and must not block. Stages see ``value`` unless they ask for the envelope.
    ``key`` is the item's key once a ``key_by`` stage set it (``None`` before), and it
    stays with the item, and with everything derived from it, through the stages after.
    """

    __slots__ = ("_ack", "_born", "_origin", "key", "meta", "value")

    def __init__(
        self,
        value: T,
        meta: dict[str, Any] | None = None,
        on_ack: AckCallback | None = None,
        *,
        key: Any = None,
    ) -> None:
        self.value = value
        self.meta = meta
        self.key = key
        self._ack: _Ack | None = _Notifying(on_ack) if on_ack is not None else None
        self._born = 0.0
        self._origin: str | None = None  # the source it came from (set by the source)

    def __repr__(self) -> str:
        return f"Message(value={self.value!r}, meta={self.meta!r})"

    def _derive(self, value: Any) -> Message[Any]:
        """A sibling carrying another value, sharing this item's ack (one more pending)."""
        child: Message[Any] = Message.__new__(Message)
        child.value = value
        child.meta = self.meta
        child.key = self.key
        child._born = self._born
        child._origin = self._origin
        ack = self._ack
        if ack is not None:
            ack.pending += 1
        child._ack = ack
        return child

    def _done(self, outcome: int) -> None:
        ack = self._ack
        if ack is not None:
            self._ack = None
            ack.done(outcome)


class _Ack:
    """Reference-counted acknowledgement shared by every item derived from one source item;
    when the last of them is handled, the combined outcome is counted at the source.

    Outcomes are accumulated as plain ints (``Outcome`` values; enum arithmetic is slow on
    the per-item path). An item with an ``on_ack`` carries a :class:`_Notifying` instead.
    """

    __slots__ = ("counter", "outcome", "pending")

    def __init__(self, counter: defaultdict[int, int] | None) -> None:
        self.counter = counter  # the source's outcome counts (set when the source sends it)
        self.pending = 1
        self.outcome = 0

    def done(self, outcome: int) -> None:
        self.outcome |= outcome
        self.pending -= 1
        if self.pending == 0:  # the plain case inline: this runs once per item
            # a plain ack is made by its source, with the source's counter
            self.counter[self.outcome] += 1  # type: ignore[index]

    def _fire(self) -> None:
        if self.counter is not None:
            self.counter[self.outcome] += 1

    def abort(self) -> None:
        """Fire now, with ``ABORTED`` added: the flow stopped before every derived item was
        handled. Items derived from it that finish later change nothing (it fires once)."""
        if self.pending <= 0:
            return
        self.pending = 0
        self.outcome |= ABORTED
        self._fire()


class _Firing(_Ack):
    """An ack that does more than count when it fires (:meth:`_fire`)."""

    __slots__ = ()

    def done(self, outcome: int) -> None:
        self.outcome |= outcome
        self.pending -= 1
        if self.pending == 0:
            self._fire()


class _Notifying(_Firing):
    """The ack of a source item with an ``on_ack``: it also calls that, once, and is in the
    running flow's set of acks not fired yet (which a failing flow aborts)."""

    __slots__ = ("callback", "live")

    def __init__(self, callback: AckCallback) -> None:
        super().__init__(None)
        self.callback = callback
        self.live: set[_Ack] | None = None  # the running flow's acks not fired yet

    def _fire(self) -> None:
        if self.live is not None:
            self.live.discard(self)
        if self.counter is not None:
            self.counter[self.outcome] += 1
        self.callback(Outcome(self.outcome))


class _AckGroup(_Firing):
    """The ack of a batch: handling the batch handles each member."""

    __slots__ = ("members",)

    def __init__(self, members: list[Message[Any]]) -> None:
        super().__init__(None)
        self.members = members

    def _fire(self) -> None:
        for member in self.members:
            member._done(self.outcome)


class _AckSet(_Firing):
    """The ack of a window: handling the window handles each item it holds (an item in
    several windows holds one pending count per window)."""

    __slots__ = ("acks",)

    def __init__(self, acks: list[_Ack]) -> None:  # no super() call: one per window
        self.counter = None
        self.pending = 1
        self.outcome = 0
        self.acks = acks

    def _fire(self) -> None:
        outcome = self.outcome
        for ack in self.acks:
            ack.done(outcome)


# Outcome values as ints, for the per-item path.
DELIVERED = Outcome.DELIVERED.value
FILTERED = Outcome.FILTERED.value
DROPPED = Outcome.DROPPED.value
SKIPPED = Outcome.SKIPPED.value
DEAD_LETTERED = Outcome.DEAD_LETTERED.value
ABORTED = Outcome.ABORTED.value
LATE = Outcome.LATE.value
