"""The task behind ``KeyedStream.window``: items held in windows per key, each window
emitted when it closes.

Time is event time (the stage's ``time`` function) or processing time (``time.time()`` on
arrival). In event time each input (a source, or a source's partition when its items'
``meta`` has one) has a watermark, the largest time it has sent minus ``lateness``; the
stage's watermark is the smallest over the inputs that sent something within ``idle``
seconds. When every input is idle, the watermark moves on with the clock from the idle
timeout on, so windows close without new input. A window closes when the watermark
reaches its end, and every open one closes at the end of the stream. An item whose every
window is closed is late and goes to the ``late`` policy.

A window holds its items' acks: an item is acknowledged only once every window it went
into was handled downstream, so a source cannot commit past an item held in an open
window.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

from ._channel import ReceiveEnd
from ._errors import StageError, describe_item
from ._logging import get_logger
from ._message import DEAD_LETTERED, FILTERED, LATE, Message, _Ack, _AckSet
from ._policy import DeadLetter, FailedItem
from ._recovery import Recovery
from ._runners import Runner, Supervisor
from ._spec import StageSpec
from ._windows import Count, Session, Tumbling, Window

__all__ = ["FusedRunner", "LateItem", "WindowRunner"]

log = get_logger("streamflow")
_INF = math.inf
_NO_INPUT: Any = object()


class LateItem(Exception):
    """What a dead-letter sink gets for an item that came after its window closed."""


class _Open:
    """One open window of one key."""

    __slots__ = (
        "acc", "acks", "alive", "born", "end", "items", "key", "last", "n", "seqs", "start",
    )  # fmt: skip

    def __init__(self, key: Any, start: float, end: float, acc: Any, born: float) -> None:
        self.key = key
        self.start = start
        self.end = end
        self.last = start  # sessions: the time of the latest item
        self.items: list[Any] = []
        self.seqs: list[int] = []  # sessions: each item's arrival number (for merging)
        self.acks: list[_Ack] = []
        self.acc = acc
        self.born = born
        self.alive = True
        self.n = 0  # items in it


async def _never(value: Any) -> Any:  # a window stage has no retry: nothing to call again
    raise AssertionError("unreachable")


class FusedRunner(Runner):
    """A ``key_by`` fused into the window stage it alone feeds (loop ``fused``): the window
    stage reads this stage's inbox and calls its key function; this runner only keeps its
    counters (items in and out), so its metrics stay where they were."""

    async def run(self) -> None:
        self.rt.runner_done(self)  # nothing to run; the window stage sets c.stopped at its end


class WindowRunner(Runner):
    """Assigns each item to its key's windows and emits the windows that closed. With
    ``key_by`` (a :class:`FusedRunner`), it keys each item itself first."""

    def __init__(
        self,
        rt: Supervisor,
        spec: StageSpec,
        recv: ReceiveEnd[Message[Any]],
        *,
        key_by: Runner | None = None,
    ):
        super().__init__(rt, spec, recv)
        self.key_by = key_by
        options = spec.options or {}
        self.shape = options["shape"]
        self.time_fn: Callable[[Any], float] | None = options["time"]
        self.lateness: float = options["lateness"]
        self.late: Any = options["late"]
        self.idle: float = options["idle"]
        agg = options["aggregate"]
        self.init: Callable[[], Any] | None = agg[0] if agg is not None else None
        self.add: Callable[[Any, Any], Any] | None = agg[1] if agg is not None else None
        self.merge: Callable[[Any, Any], Any] | None = agg[2] if agg is not None else None
        self.recover = Recovery(
            rt.name, spec.name, "window", spec.errors, _never, self.c, envelope=False
        )
        self.open: dict[tuple[Any, float], _Open] = {}  # tumbling and sliding
        self.sessions: dict[Any, list[_Open]] = {}  # session windows per key
        self.counts: dict[Any, _Open] = {}  # count windows per key
        self.heap: list[tuple[float, int, _Open]] = []  # (end, order, window)
        self.order = itertools.count()
        self.arrivals = itertools.count()
        self.per_key: dict[Any, int] = {}  # open windows per key
        self.origins: dict[Any, list[float]] = {}  # input -> [largest time, last arrival]
        self.wm = -_INF  # the event-time watermark so far (it only moves on)
        # Starting up, the watermark stays put until every upstream source has sent (and a
        # partitioned one for ``idle`` seconds, so that its other partitions can show up),
        # or ``idle`` seconds after the first item: an input that has not sent yet may still
        # send old items, which would otherwise be late.
        self.holding = self.time_fn is not None
        self.waiting_for = set(options.get("sources", ()))
        self.partitioned = False  # a source of partitioned items has sent
        self.hold_until = _INF
        self.ready: list[Message[Any]] = []  # windows to emit, in order
        self.held = {"keys": 0, "windows_open": 0, "items_held": 0, "late": 0}
        self.c.state = self.held

    # -- the loop ----------------------------------------------------------------------

    async def _body(self) -> None:
        recv = self.recv
        assert recv is not None
        loop = asyncio.get_running_loop()
        self.set_up.set()
        if self.rt.checkpointer is not None:  # restored windows set the first deadline
            self.resting = True  # quiet meanwhile (it has taken nothing)
            await self.rt.checkpointer.released.wait()
            self.resting = False
        while await recv.wait(self._deadline(loop.time())):
            run = recv.take_run()
            if run:
                keys = self._keys(run) if self.key_by is not None else [m.key for m in run]
                self.c.items_in += len(run)
                await self._take(run, keys, loop.time())
            self._close(self._watermark(loop.time()))
            if self.ready:
                await self._emit_ready()
        self._close(_INF)  # the end of the stream: every open window
        if self.ready:
            await self._emit_ready()
        if self.key_by is not None:
            self.key_by.c.stopped = time.perf_counter()
        await self._wait_last_checkpoint()

    # -- checkpoints -------------------------------------------------------------------

    def participant(self) -> Any:
        return self

    def snapshot(self) -> dict[str, Any]:
        """Every open window (its key, span, items or accumulator), the watermark and each
        input's largest event time: plain data for a checkpoint, in columns (one list per
        field, so that 100,000 windows encode as a few long lists). The items' acks stay
        behind: the sources' positions in the same checkpoint are past these items."""
        ws = self._alive()
        holds_items = self.add is None
        return {
            "key": [w.key for w in ws],
            "start": [w.start for w in ws],
            "end": [w.end for w in ws],
            "last": [w.last for w in ws],
            "n": [w.n for w in ws],
            "acc": None if holds_items else [w.acc for w in ws],
            "items": [w.items.copy() for w in ws] if holds_items else None,
            "seqs": [w.seqs.copy() for w in ws] if isinstance(self.shape, Session) else None,
            "watermark": self.wm,
            "inputs": [[origin, seen[0]] for origin, seen in self.origins.items()],
            "late": self.held["late"],
            "arrivals": next(self.arrivals),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Reopen the windows of :meth:`snapshot` (called before the first item)."""
        now = asyncio.get_running_loop().time()
        shape, born = self.shape, time.perf_counter()
        items, seqs, accs = state["items"], state["seqs"], state["acc"]
        for i, (key, start, end, last, n) in enumerate(
            zip(state["key"], state["start"], state["end"], state["last"], state["n"], strict=True)
        ):
            w = self._new(key, start, end, born)
            if isinstance(shape, Count):
                self.counts[key] = w
            elif isinstance(shape, Session):
                self.sessions.setdefault(key, []).append(w)
            else:
                self.open[key, start] = w
            w.last, w.n = last, n
            if items is not None:
                w.items = items[i]
            if seqs is not None:
                w.seqs = seqs[i]
            if accs is not None:
                w.acc = accs[i]
            self.held["items_held"] += n
        self.wm = state["watermark"]
        for origin, largest in state["inputs"]:
            self.origins[origin] = [largest, now]
        if self.origins:  # as if they just sent: the start-up hold ends ``idle`` s from now
            self.hold_until = now + self.idle
        self.held["late"] = state["late"]
        self.arrivals = itertools.count(state["arrivals"])

    def _alive(self) -> list[_Open]:
        if isinstance(self.shape, Count):
            return list(self.counts.values())
        if isinstance(self.shape, Session):
            return [w for ws in self.sessions.values() for w in ws]
        return list(self.open.values())

    def _keys(self, run: list[Message[Any]]) -> list[Any]:
        """The fused ``key_by``: each item's key (its error fails the flow, as the stage's
        own ``errors="fail"`` would), counting in its counters. ``_take`` sets them."""
        assert self.key_by is not None
        c, key = self.key_by.c, self.key_by.spec.fn
        t0 = time.perf_counter()
        try:
            keys = [key(msg.value) for msg in run]
        except Exception:
            for msg in run:  # which item: call again one by one (a key function is pure)
                try:
                    key(msg.value)
                except Exception as exc:
                    raise StageError(
                        self.key_by.name, msg.value, exc, flow=self.rt.name, meta=msg.meta
                    ) from exc
            raise
        c.record_run(time.perf_counter() - t0, len(run))
        c.items_out += len(run)
        return keys

    async def _emit_ready(self) -> None:
        out, self.ready = self.ready, []
        self.c.items_out += len(out)
        await self.emit(out)

    # -- time --------------------------------------------------------------------------

    def _watermark(self, now: float) -> float:
        """Processing time: the clock minus ``lateness``. Event time: see the module. It
        never goes back: when an idle input sends again (and the clock no longer carries
        the watermark), what closed stays closed and later items for it are late."""
        if self.time_fn is None:
            return time.time() - self.lateness
        origins = self.origins
        if not origins or (self.holding and self._still_holding(now)):
            return self.wm
        active = [t for t, seen in origins.values() if now - seen <= self.idle]
        if active:
            mark = min(active) - self.lateness
        else:
            largest = max(t for t, _ in origins.values())
            latest = max(seen for _, seen in origins.values())
            mark = largest - self.lateness + (now - latest - self.idle)
        if mark > self.wm:
            self.wm = mark
        return self.wm

    def _seen_input(self, source: str | None, partitioned: bool, now: float) -> None:
        """A new input sent its first item (see the start-up hold in ``__init__``)."""
        if self.hold_until == _INF:
            self.hold_until = now + self.idle
        self.waiting_for.discard(source or "")
        self.partitioned = self.partitioned or partitioned

    def _still_holding(self, now: float) -> bool:
        """Whether the start-up hold is still on; once off, it stays off."""
        if now < self.hold_until and (self.waiting_for or self.partitioned):
            return True
        self.holding = False
        return False

    def _deadline(self, now: float) -> float | None:
        """When to look again without new input (``loop.time()``), or ``None``."""
        heap = self.heap
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        if not heap or isinstance(self.shape, Count):
            return None
        end = heap[0][0]
        if self.holding:
            return self.hold_until + 1e-3
        if self.time_fn is None:
            return now + max(0.0, end + self.lateness - time.time()) + 1e-3
        origins = self.origins
        active = [seen for _, seen in origins.values() if now - seen <= self.idle]
        if active:  # the next input to go idle may let the watermark move
            return min(active) + self.idle + 1e-3
        largest = max(t for t, _ in origins.values())
        latest = max(seen for _, seen in origins.values())
        return latest + self.idle + (end - (largest - self.lateness)) + 1e-3

    # -- assigning items ---------------------------------------------------------------

    async def _take(self, run: list[Message[Any]], keys: list[Any], now: float) -> None:
        """Place each item of ``run`` (its ``keys``; arrived at ``now``, ``loop.time()``).
        Tumbling windows take the short path inline: one window per item, found by its
        start. What the loop keeps in locals (the one input's watermark, the next end due)
        is read again after anything that may have changed it."""
        time_fn, lateness, origins, heap = self.time_fn, self.lateness, self.origins, self.heap
        wall = time.time() if time_fn is None else 0.0
        shape = self.shape
        tumbling = type(shape) is Tumbling
        size, offset = (shape.size, shape.offset) if tumbling else (1.0, 0.0)
        floor, opened, add = math.floor, self.open, self.add
        placed = 0  # items the short path put in windows (counted once, after the run)
        # one input (and no start-up hold): the stage's watermark is that input's
        single = len(origins) == 1 and not self.holding
        wm = self.wm
        next_end = heap[0][0] if heap else _INF  # the earliest end still in the heap
        last_origin: Any = _NO_INPUT  # the input of the item before, and its [largest, seen]
        seen: list[float] = []
        for msg, key in zip(run, keys, strict=True):
            msg.key = key
            if time_fn is None:
                t = wall
                watermark = wall - lateness
            else:
                try:
                    t = time_fn(msg.value)
                    if type(t) is not float:
                        t = float(t)
                    if t - t != 0.0:  # inf or nan
                        raise ValueError(f"the event time must be finite, got {t!r}")
                except Exception as exc:
                    await self.recover(msg, exc)
                    continue
                meta = msg.meta
                origin = (
                    (msg._origin, meta.get("topic"), meta["partition"])
                    if type(meta) is dict and "partition" in meta
                    else msg._origin
                )
                if origin is not last_origin:
                    last_origin = origin
                    known = origins.get(origin)
                    if known is None:
                        known = origins[origin] = [t, now]
                        if self.holding:
                            self._seen_input(msg._origin, origin is not msg._origin, now)
                        single = len(origins) == 1 and not self.holding
                    seen = known
                if t > seen[0]:
                    seen[0] = t
                seen[1] = now
                if single:  # the one input just sent this item: it is active
                    watermark = seen[0] - lateness
                    if watermark > wm:
                        self.wm = wm = watermark
                    else:
                        watermark = wm
                else:
                    watermark = self._watermark(now)
                    wm = self.wm
                    single = not self.holding and len(origins) == 1
            if next_end <= watermark:
                self._close(watermark)  # first what closed before this item came
                next_end = heap[0][0] if heap else _INF
            try:
                if not tumbling:
                    await self._assign(msg, t, watermark)
                    next_end = heap[0][0] if heap else _INF
                    continue
                start = offset + size * floor((t - offset) / size)
                if start + size <= watermark:
                    await self._late(msg, key, [(start, start + size)])
                    next_end = heap[0][0] if heap else _INF
                    continue
                w = opened.get((key, start))
                if w is None:
                    w = opened[key, start] = self._new(key, start, start + size, msg._born)
                    next_end = heap[0][0]
                if add is not None:
                    w.acc = add(w.acc, msg.value)
                else:
                    w.items.append(msg.value)
                w.n += 1
                placed += 1
                ack = msg._ack
                if ack is not None:
                    msg._ack = None
                    w.acks.append(ack)
            except StageError:
                raise
            except Exception as exc:  # the aggregate raised: this item only
                await self.recover(msg, exc)
        self.held["items_held"] += placed

    async def _assign(self, msg: Message[Any], t: float, watermark: float) -> None:
        shape, key = self.shape, msg.key
        if isinstance(shape, Count):
            self._add_count(msg, key, t)
            return
        if isinstance(shape, Session):
            await self._add_session(msg, key, t, watermark)
            return
        spans = shape.spans(t)
        live = [(s, e) for s, e in spans if e > watermark]
        if not spans:  # in the gap between two sliding windows
            msg._done(FILTERED)
            return
        if not live:
            await self._late(msg, key, spans)
            return
        windows = []
        for start, end in live:
            w = self.open.get((key, start))
            if w is None:
                w = self._new(key, start, end, msg._born)
                self.open[key, start] = w
            windows.append(w)
        self._put(msg, windows)

    def _new(self, key: Any, start: float, end: float, born: float) -> _Open:
        w = _Open(key, start, end, self.init() if self.init is not None else None, born)
        if not isinstance(self.shape, Count):
            heapq.heappush(self.heap, (end, next(self.order), w))
        self.per_key[key] = self.per_key.get(key, 0) + 1
        self.held["windows_open"] += 1
        self.held["keys"] = len(self.per_key)
        return w

    def _put(self, msg: Message[Any], windows: list[_Open]) -> None:
        """Add the item to each of ``windows`` (the aggregate first: if it raises, nothing
        changed); the windows hold its ack, one pending count each."""
        value, add = msg.value, self.add
        if add is not None:
            accs = [add(w.acc, value) for w in windows]
            for w, acc in zip(windows, accs, strict=True):
                w.acc = acc
        else:
            for w in windows:
                w.items.append(value)
        for w in windows:
            w.n += 1
        self.held["items_held"] += len(windows)
        ack = msg._ack
        if ack is not None:
            msg._ack = None
            ack.pending += len(windows) - 1
            for w in windows:
                w.acks.append(ack)

    def _add_count(self, msg: Message[Any], key: Any, t: float) -> None:
        w = self.counts.get(key)
        if w is None:
            w = self.counts[key] = self._new(key, t, t, msg._born)
        self._put(msg, [w])
        w.end = t
        assert isinstance(self.shape, Count)
        if w.n >= self.shape.size:
            del self.counts[key]
            self._ready(w)

    async def _add_session(self, msg: Message[Any], key: Any, t: float, watermark: float) -> None:
        gap = self.shape.gap
        sessions = self.sessions.setdefault(key, [])
        joined = [
            w
            for w in sessions
            if w.alive and w.end > watermark and w.start - gap < t < w.last + gap
        ]
        if not joined:
            if t + gap <= watermark:
                if not sessions:
                    del self.sessions[key]
                await self._late(msg, key, [(t, t + gap)])
                return
            w = self._new(key, t, t + gap, msg._born)
            w.last = t
            sessions.append(w)
        else:
            w = joined[0]
            if len(joined) > 1:
                self._merge(w, joined[1:])
            if t < w.start:
                w.start = t
            if t > w.last:
                w.last = t
        self._put(msg, [w])
        w.seqs.append(next(self.arrivals))
        end = w.last + gap
        if end != w.end:
            w.end = end
            heapq.heappush(self.heap, (end, next(self.order), w))

    def _merge(self, into: _Open, others: list[_Open]) -> None:
        """An item bridged sessions: fold ``others`` into ``into`` (items by arrival)."""
        for other in others:
            if self.merge is not None:
                into.acc = self.merge(into.acc, other.acc)
            if self.add is None:
                pairs = sorted(
                    itertools.chain(
                        zip(into.seqs, into.items, strict=True),
                        zip(other.seqs, other.items, strict=True),
                    ),
                    key=lambda p: p[0],
                )
                into.items = [v for _, v in pairs]
                into.seqs = [seq for seq, _ in pairs]
            else:
                into.seqs = sorted(into.seqs + other.seqs)
            into.n += other.n  # the items move: items_held stays
            into.acks.extend(other.acks)
            into.start = min(into.start, other.start)
            into.last = max(into.last, other.last)
            into.born = min(into.born, other.born)
            other.alive = False
            self.sessions[into.key].remove(other)
            self._gone(other)

    def _gone(self, w: _Open) -> None:
        """``w`` is no longer open (emitted or merged into another)."""
        w.alive = False
        key = w.key
        left = self.per_key[key] - 1
        if left:
            self.per_key[key] = left
        else:
            del self.per_key[key]
        held = self.held
        held["windows_open"] -= 1
        held["keys"] = len(self.per_key)

    # -- late items --------------------------------------------------------------------

    async def _late(self, msg: Message[Any], key: Any, spans: list[tuple[float, float]]) -> None:
        self.held["late"] += 1
        policy = self.late
        if policy == "drop":
            msg._done(LATE)
            return
        if isinstance(policy, DeadLetter):
            start, end = spans[-1]
            error = LateItem(
                f"stage {self.name!r}: an item of key {key!r} came after its window "
                f"[{start:g}, {end:g}) had closed"
            )
            await policy.deliver(FailedItem(self.rt.name, self.name, msg.value, msg.meta, error, 1))
            msg._done(DEAD_LETTERED)
            log.warning(
                "window.late",
                flow=self.rt.name,
                stage=self.name,
                policy="dead_letter",
                item=describe_item(msg.value),
                meta=msg.meta,
            )
            return
        # "emit": an update of each window the item missed, holding only the item
        windows = [self._new(key, s, e, msg._born) for s, e in spans]
        self._put(msg, windows)
        for w in windows:
            self._ready(w, late=True)

    # -- closing -----------------------------------------------------------------------

    def _close(self, watermark: float) -> None:
        """Every window whose end the watermark reached goes to :attr:`ready`, by end."""
        heap = self.heap
        while heap and (heap[0][0] <= watermark or not heap[0][2].alive):
            end, _, w = heapq.heappop(heap)
            if not w.alive or end != w.end:
                continue  # merged away, or a session that grew since
            self._ready(w)
        if watermark == _INF:
            for key in list(self.counts):  # count windows left at the end of the stream
                self._ready(self.counts.pop(key))

    def _ready(self, w: _Open, late: bool = False) -> None:
        if not late:
            if isinstance(self.shape, Session):
                sessions = self.sessions[w.key]
                sessions.remove(w)
                if not sessions:
                    del self.sessions[w.key]
            elif not isinstance(self.shape, Count):
                del self.open[w.key, w.start]
        self._gone(w)
        self.held["items_held"] -= w.n
        value = Window(w.key, w.start, w.end, w.items, w.acc, late)
        msg: Message[Any] = Message.__new__(Message)
        msg.value = value
        msg.meta = None
        msg.key = w.key
        msg._born = w.born
        msg._origin = None
        msg._ack = _AckSet(w.acks) if w.acks else None
        self.ready.append(msg)
