"""Windows per key against an independent reference: random out-of-order event streams over
many keys, tumbling, sliding, session and count windows, lateness and every late policy.

The reference reads the same events one by one in plain Python: the watermark is the
largest event time so far minus the lateness; before an item is placed, every window whose
end the watermark reached is emitted; an item whose every window has ended is late. Per key,
the windows emitted, their contents and their order must equal the flow's."""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamflow as sf

Event = tuple[str, float, int]  # key, event time, value
Emitted = tuple[float, float, tuple[int, ...], bool]  # start, end, values, late


def spans(shape: Any, t: float) -> list[tuple[float, float]]:
    if isinstance(shape, sf.Tumbling):
        start = shape.size * math.floor(t / shape.size)
        return [(start, start + shape.size)]
    assert isinstance(shape, sf.Sliding)
    out = []
    k = math.floor(t / shape.every)
    while shape.every * k + shape.size > t:
        out.append((shape.every * k, shape.every * k + shape.size))
        k -= 1
    return out[::-1]


def reference(
    events: list[Event], shape: Any, lateness: float, late: str
) -> tuple[dict[str, list[Emitted]], list[Event]]:
    """Tumbling, sliding and count windows per key, and the items the reference saw as
    late."""
    out: dict[str, list[Emitted]] = defaultdict(list)
    dropped: list[Event] = []
    watermark = -math.inf
    opened: dict[tuple[str, float, float], list[int]] = {}
    counts: dict[str, list[tuple[float, int]]] = {}

    def close(upto: float) -> None:
        for key, start, end in sorted(opened, key=lambda w: (w[2], w[1])):
            if end <= upto:
                out[key].append((start, end, tuple(opened.pop((key, start, end))), False))

    for key, t, v in events:
        watermark = max(watermark, t - lateness)
        close(watermark)
        if isinstance(shape, sf.Count):
            held = counts.setdefault(key, [])
            held.append((t, v))
            if len(held) == shape.size:
                out[key].append((held[0][0], t, tuple(x for _, x in held), False))
                del counts[key]
            continue
        live = [(s, e) for s, e in spans(shape, t) if e > watermark]
        if not spans(shape, t):
            continue
        if not live:
            dropped.append((key, t, v))
            if late == "emit":
                for s, e in spans(shape, t):
                    out[key].append((s, e, (v,), True))
            continue
        for s, e in live:
            opened.setdefault((key, s, e), []).append(v)
    close(math.inf)
    for key, held in counts.items():
        out[key].append((held[0][0], held[-1][0], tuple(x for _, x in held), False))
    return dict(out), dropped


def session_reference(
    events: list[Event], shape: sf.Session, lateness: float, late: str
) -> tuple[dict[str, list[Emitted]], list[Event]]:
    """Sessions: an item joins each open session of its key it is less than ``gap`` from
    (merging them), in arrival order; a new session late by the same rule is late."""
    out: dict[str, list[Emitted]] = defaultdict(list)
    dropped: list[Event] = []
    watermark = -math.inf
    opened: dict[int, tuple[str, float, float, list[tuple[int, int]]]] = {}
    ids = iter(range(10**9))
    for arrival, (key, t, v) in enumerate(events):
        watermark = max(watermark, t - lateness)
        for i, (k, start, end, items) in sorted(opened.items(), key=lambda kv: kv[1][2]):
            if end <= watermark:
                out[k].append((start, end, tuple(x for _, x in items), False))
                del opened[i]
        mine = [
            i
            for i, (k, start, end, _) in opened.items()
            if k == key and start - shape.gap < t < end
        ]
        if not mine:
            if t + shape.gap <= watermark:
                dropped.append((key, t, v))
                if late == "emit":
                    out[key].append((t, t + shape.gap, (v,), True))
                continue
            opened[next(ids)] = (key, t, t + shape.gap, [(arrival, v)])
            continue
        start, end = t, t + shape.gap
        items = [(arrival, v)]
        for i in mine:
            _, s, e, held = opened.pop(i)
            start, end = min(start, s), max(end, e)
            items.extend(held)
        items.sort()
        opened[next(ids)] = (key, start, end, items)
    for _, (k, start, end, items) in sorted(opened.items(), key=lambda kv: kv[1][2]):
        out[k].append((start, end, tuple(x for _, x in items), False))
    return dict(out), dropped


async def run_windows(
    events: list[Event], shape: Any, lateness: float, late: Any, aggregate: bool = False
) -> tuple[dict[str, list[Emitted]], list[sf.Outcome]]:
    acks: list[sf.Outcome] = []
    out: dict[str, list[Emitted]] = defaultdict(list)

    def got(w: sf.Window[Event]) -> None:
        values = (w.value,) if aggregate else tuple(v for _, _, v in w.items)
        out[w.key].append((w.start, w.end, values, w.late))

    flow = sf.Flow("windows")
    keyed = flow.source("events", [sf.Message(e, on_ack=acks.append) for e in events]).key_by(
        "by_key", lambda e: e[0]
    )
    agg = (lambda: 0, lambda a, e: a + e[2], lambda a, b: a + b) if aggregate else None
    keyed.window(
        "win", shape, time=lambda e: e[1], lateness=lateness, late=late, aggregate=agg
    ).sink("out", got)
    await flow.run()
    return dict(out), acks


times = st.integers(0, 400).map(lambda n: n / 4)  # quarter seconds: exact in binary
events_st = st.lists(st.tuples(st.sampled_from("abcde"), times, st.integers(0, 99)), max_size=60)


def jitter(events: list[Event]) -> list[Event]:
    """Mostly in time order, a little out of it: what a sensor network sends."""
    return sorted(events, key=lambda e: e[1] + (e[2] % 7) * 0.75)


@settings(max_examples=150, deadline=None)
@given(
    events=events_st,
    shape=st.sampled_from([sf.Tumbling(5.0), sf.Sliding(6.0, every=2.0), sf.Count(3)]),
    lateness=st.sampled_from([0.0, 1.0, 3.0]),
    late=st.sampled_from(["drop", "emit"]),
)
def test_tumbling_sliding_and_count_windows_equal_the_reference(
    events: list[Event], shape: Any, lateness: float, late: str
) -> None:
    events = jitter(events)
    want, dropped = reference(events, shape, lateness, late)
    got, acks = asyncio.run(run_windows(events, shape, lateness, late))
    assert got == want
    late_acks = sum(1 for a in acks if a == sf.Outcome.LATE)
    assert late_acks == (len(dropped) if late == "drop" else 0)
    assert len(acks) == len(events)  # every item acked once, after its windows went out


@settings(max_examples=150, deadline=None)
@given(
    events=events_st,
    gap=st.sampled_from([1.0, 2.5]),
    lateness=st.sampled_from([0.0, 2.0]),
    late=st.sampled_from(["drop", "emit"]),
)
def test_session_windows_equal_the_reference(
    events: list[Event], gap: float, lateness: float, late: str
) -> None:
    events = jitter(events)
    want, dropped = session_reference(events, sf.Session(gap), lateness, late)
    got, acks = asyncio.run(run_windows(events, sf.Session(gap), lateness, late))
    assert got == want
    assert sum(1 for a in acks if a == sf.Outcome.LATE) == (len(dropped) if late == "drop" else 0)


@settings(max_examples=60, deadline=None)
@given(events=events_st, lateness=st.sampled_from([0.0, 2.0]))
def test_an_aggregate_equals_the_sum_of_the_items(events: list[Event], lateness: float) -> None:
    events = jitter(events)
    for shape in (sf.Tumbling(5.0), sf.Session(2.0)):
        by_items, _ = asyncio.run(run_windows(events, shape, lateness, "drop"))
        summed, _ = asyncio.run(run_windows(events, shape, lateness, "drop", aggregate=True))
        assert summed == {
            k: [(s, e, (sum(v),), late) for s, e, v, late in ws] for k, ws in by_items.items()
        }


@pytest.mark.asyncio
async def test_no_ack_completes_before_its_window_is_delivered() -> None:
    """A source's item is acknowledged only once the window holding it reached the sink:
    the sink records which acks had completed when each window arrived."""
    acked: list[int] = []
    seen_at_delivery: list[tuple[tuple[int, ...], set[int]]] = []
    events = [("k", float(t), t) for t in range(30)]
    flow = sf.Flow("acks")

    def deliver(w: sf.Window[Event]) -> None:
        seen_at_delivery.append((tuple(v for *_, v in w.items), set(acked)))

    msgs = [sf.Message(e, on_ack=lambda _, i=e[2]: acked.append(i)) for e in events]
    flow.source("events", msgs).key_by("k", lambda e: e[0]).window(
        "w", sf.Tumbling(10.0), time=lambda e: e[1]
    ).sink("out", deliver)
    await flow.run()
    for values, done_before in seen_at_delivery:
        assert not done_before & set(values), "an item was acked before its window went out"
    assert sorted(acked) == list(range(30))


@pytest.mark.asyncio
async def test_sliding_item_is_acked_once_all_its_windows_are_delivered() -> None:
    outcomes: list[sf.Outcome] = []
    delivered: list[tuple[float, float]] = []
    first_ack_after: list[int] = []

    def deliver(w: sf.Window[Event]) -> None:
        delivered.append((w.start, w.end))

    def on_ack(outcome: sf.Outcome) -> None:
        outcomes.append(outcome)
        first_ack_after.append(len(delivered))

    flow = sf.Flow("sliding")
    events = [sf.Message(("k", 5.0, 1), on_ack=on_ack), sf.Message(("k", 40.0, 2))]
    flow.source("events", events).key_by("k", lambda e: e[0]).window(
        "w", sf.Sliding(6.0, every=2.0), time=lambda e: e[1]
    ).sink("out", deliver)
    await flow.run()
    assert delivered[:3] == [(0.0, 6.0), (2.0, 8.0), (4.0, 10.0)]
    assert outcomes == [sf.Outcome.DELIVERED]
    assert first_ack_after[0] >= 3  # once, after the third of its windows, not before


@pytest.mark.asyncio
async def test_late_items_go_to_a_dead_letter_with_a_late_item_error() -> None:
    failed: list[sf.FailedItem] = []
    outcomes: list[sf.Outcome] = []
    events = [("k", 1.0, 1), ("k", 12.0, 2), ("k", 3.0, 3)]
    flow = sf.Flow("late")
    flow.source("events", [sf.Message(e, on_ack=outcomes.append) for e in events]).key_by(
        "k", lambda e: e[0]
    ).window("w", sf.Tumbling(10.0), time=lambda e: e[1], late=sf.DeadLetter(failed.append)).sink(
        "out", lambda w: None
    )
    await flow.run()
    assert [f.item for f in failed] == [("k", 3.0, 3)]
    assert isinstance(failed[0].error, sf.LateItem) and "[0, 10)" in str(failed[0].error)
    assert sf.Outcome.DEAD_LETTERED in outcomes
    assert flow.metrics()["w"].state["late"] == 1


@pytest.mark.asyncio
async def test_event_time_windows_close_on_processing_time_once_the_input_is_idle() -> None:
    """No new input and no end of stream: after ``idle`` seconds the watermark moves on
    with the clock, so the open window is emitted while the source still waits."""
    got: list[sf.Window[Event]] = []
    release = asyncio.Event()

    async def source() -> Any:
        yield ("k", 1.0, 1)
        yield ("k", 2.0, 2)
        await release.wait()

    flow = sf.Flow("idle")
    flow.source("events", source()).key_by("k", lambda e: e[0]).window(
        "w", sf.Tumbling(1.0), time=lambda e: e[1], idle=0.05
    ).sink("out", got.append)
    async with flow.start() as running:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(got) == 2:
                break
        assert [(w.start, w.end) for w in got] == [(1.0, 2.0), (2.0, 3.0)]
        release.set()
        await running.wait()


@pytest.mark.asyncio
async def test_processing_time_windows_close_by_timer() -> None:
    got: list[sf.Window[int]] = []

    async def source() -> Any:
        for i in range(3):
            yield i
        await asyncio.sleep(0.4)

    flow = sf.Flow("ptime")
    flow.source("n", source()).key_by("k", lambda i: "all").window("w", sf.Tumbling(0.1)).sink(
        "out", got.append
    )
    async with flow.start() as running:
        await asyncio.sleep(0.3)
        assert sum(len(w.items) for w in got) == 3  # emitted before the stream ended
        await running.wait()


@pytest.mark.asyncio
async def test_a_time_function_that_raises_follows_the_policy_for_that_item_only() -> None:
    got: list[sf.Window[Any]] = []
    outcomes: list[sf.Outcome] = []
    events = [{"t": 1.0}, {"oops": 0}, {"t": 2.0}]
    flow = sf.Flow("bad")
    flow.source("e", [sf.Message(e, on_ack=outcomes.append) for e in events]).key_by(
        "k", lambda e: 0
    ).window("w", sf.Tumbling(10.0), time=lambda e: e["t"], errors="skip").sink("out", got.append)
    await flow.run()
    assert [len(w.items) for w in got] == [2]
    assert outcomes.count(sf.Outcome.SKIPPED) == 1


@pytest.mark.asyncio
async def test_an_event_time_that_is_not_a_finite_number_follows_the_policy() -> None:
    got: list[sf.Window[Any]] = []
    outcomes: list[sf.Outcome] = []
    times: list[Any] = [1, math.nan, "2.5", math.inf, -math.inf, 3.0, "soon"]
    flow = sf.Flow("bad_times")
    flow.source("e", [sf.Message(t, on_ack=outcomes.append) for t in times]).key_by(
        "k", lambda t: 0
    ).window("w", sf.Tumbling(10.0), time=lambda t: t, errors="skip").sink("out", got.append)
    await flow.run()
    assert [w.items for w in got] == [[1, "2.5", 3.0]]  # an int and a numeric str are times
    assert outcomes.count(sf.Outcome.SKIPPED) == 4
    assert outcomes.count(sf.Outcome.DELIVERED) == 3


@pytest.mark.asyncio
async def test_a_key_function_that_raises_fails_the_flow_naming_the_key_stage() -> None:
    flow = sf.Flow("bad_key")
    flow.source("e", [{"k": 1, "t": 1.0}, {"t": 2.0}]).key_by("by_k", lambda e: e["k"]).window(
        "w", sf.Tumbling(10.0), time=lambda e: e["t"]
    ).sink("out", sf.collect())
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert info.value.stage == "by_k"
    assert info.value.item == "{'t': 2.0}"  # the item as described in the error
    assert isinstance(info.value.__cause__, KeyError)


def test_window_options_are_checked_when_the_flow_is_built() -> None:
    flow = sf.Flow("opts")
    keyed = flow.source("s", [1]).key_by("k", lambda x: x)
    with pytest.raises(sf.GraphError, match="window shape"):
        keyed.window("w", 10.0)  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="merge"):
        keyed.window("w", sf.Session(1.0), aggregate=(lambda: 0, lambda a, x: a))
    with pytest.raises(sf.GraphError, match="late must be"):
        keyed.window("w", sf.Tumbling(1.0), late="keep")  # type: ignore[arg-type]
    with pytest.raises(sf.GraphError, match="errors="):
        keyed.window("w", sf.Tumbling(1.0), errors=sf.Retry())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        sf.Tumbling(0)


@pytest.mark.asyncio
async def test_the_slowest_input_holds_the_watermark_until_it_goes_idle() -> None:
    """Two sources merged into one window stage: the fast one is at t=100 while the slow one
    is at t=1, so the window [0, 10) stays open (the slow source's late items still count)
    until the slow source falls idle; then it closes without new input."""
    got: list[sf.Window[Event]] = []
    slow_more = asyncio.Event()

    async def slow() -> Any:
        yield ("k", 1.0, 1)
        await slow_more.wait()
        yield ("k", 2.0, 2)  # after the fast source reached 100: still in the open window
        await asyncio.sleep(10)

    async def fast() -> Any:
        for t in (50.0, 100.0):
            yield ("k", t, 3)
        await asyncio.sleep(10)

    flow = sf.Flow("inputs")
    both = sf.merge("both", flow.source("slow", slow()), flow.source("fast", fast()))
    both.key_by("k", lambda e: e[0]).window(
        "w", sf.Tumbling(10.0), time=lambda e: e[1], idle=0.3
    ).sink("out", got.append)
    async with flow.start() as running:
        await asyncio.sleep(0.1)
        assert got == []  # the slow source holds the watermark at 1
        slow_more.set()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if got:
                break
        assert [(w.start, [v for *_, v in w.items]) for w in got][:1] == [(0.0, [1, 2])]
        await running.stop(drain=False)


@pytest.mark.asyncio
async def test_the_watermark_never_goes_back_when_an_idle_input_sends_again() -> None:
    """The clock closed [0, 0.5) while the input was idle; readings for it that come after
    are late, not a second [0, 0.5) window."""

    async def readings() -> Any:
        for i in range(5):
            yield ("a", i / 10, i)
        await asyncio.sleep(0.4)  # idle: the clock moves the watermark past 0.5
        for t, v in ((0.45, 5), (0.3, 6), (0.6, 7)):
            yield ("a", t, v)

    got: list[sf.Window[Event]] = []
    flow = sf.Flow("back")
    flow.source("src", readings()).key_by("k", lambda e: e[0]).window(
        "w", sf.Tumbling(0.5), time=lambda e: e[1], idle=0.1
    ).sink("out", got.append)
    await flow.run()
    assert [(w.start, [v for *_, v in w.items]) for w in got] == [
        (0.0, [0, 1, 2, 3, 4]),
        (0.5, [7]),
    ]
    assert flow.metrics()["w"].state["late"] == 2
