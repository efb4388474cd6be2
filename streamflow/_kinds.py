"""What each kind of function stage does with its function's results: defined once here,
used by every loop strategy.

``settle(msgs, results, c, now)`` takes the messages whose call succeeded (in input order)
and their results, acknowledges what ends here, counts what leaves, and returns the
messages to emit, in order. ``now`` is the clock after the calls (sinks record end-to-end
latency with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._message import DELIVERED, FILTERED, Message
from ._metrics import Counters

__all__ = ["Settle", "settle_for"]

Settle = Callable[[list[Message[Any]], list[Any], Counters, float], list[Message[Any]]]


def settle_map(
    msgs: list[Message[Any]], results: list[Any], c: Counters, now: float
) -> list[Message[Any]]:
    """Each message carries its result on."""
    i = 0
    for msg in msgs:  # (indexing beats zip() for the short runs of a trickle)
        msg.value = results[i]
        i += 1
    c.items_out += i
    return msgs


def settle_key(
    msgs: list[Message[Any]], results: list[Any], c: Counters, now: float
) -> list[Message[Any]]:
    """Each message goes on with its result as its key, its value unchanged."""
    i = 0
    for msg in msgs:
        msg.key = results[i]
        i += 1
    c.items_out += i
    return msgs


def settle_filter(
    msgs: list[Message[Any]], results: list[Any], c: Counters, now: float
) -> list[Message[Any]]:
    """A message goes on when its result is true; the others are acked as filtered."""
    kept = []
    for i, msg in enumerate(msgs):
        if results[i]:
            kept.append(msg)
        else:
            msg._done(FILTERED)
    c.items_out += len(kept)
    return kept


def settle_flat(
    msgs: list[Message[Any]], results: list[Any], c: Counters, now: float
) -> list[Message[Any]]:
    """Each element of a result becomes a message sharing the input's ack; an empty result
    acks the input as filtered."""
    out: list[Message[Any]] = []
    for msg, values in zip(msgs, results):  # noqa: B905 - the loops keep them aligned
        if not values:
            msg._done(FILTERED)
            continue
        out.extend(msg._derive(v) for v in values)
        msg._done(0)  # the children hold the ack now
    c.items_out += len(out)
    return out


def settle_sink(
    msgs: list[Message[Any]], results: list[Any], c: Counters, now: float
) -> list[Message[Any]]:
    """The sink accepted each message: it is delivered."""
    c.record_arrivals(now, msgs)
    for msg in msgs:
        ack = msg._ack  # msg._done(DELIVERED), inlined: this runs once per item
        if ack is not None:
            msg._ack = None
            ack.done(DELIVERED)
    c.items_out += len(msgs)
    return []


_SETTLE: dict[str, Settle] = {
    "map": settle_map,
    "key_by": settle_key,
    "filter": settle_filter,
    "flat_map": settle_flat,
    "sink": settle_sink,
}


def settle_for(kind: str) -> Settle:
    """The outcome of a ``map``, ``key_by``, ``filter``, ``flat_map`` or ``sink`` stage."""
    return _SETTLE[kind]
