"""A measured trial of candidate plans: each runs as a real pipeline stage in one flow,
the candidates alternating run by run, and each gets a samples/s figure that can be compared
with the others' although the machine's speed drifts (ratios within rounds)."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import torch
from torch import nn

from .._graph import Composite, Flow
from ._layers import preserved_buffers
from ._plan import Plan

__all__ = [
    "EXTEND_WITHIN",
    "EXTRA_ROUNDS",
    "TRIAL_ROUNDS",
    "TRIAL_TIE",
    "Build",
    "Trial",
    "measure",
    "near_tie",
]

Build = Callable[[Plan], Composite]
"""Makes the stage that runs a candidate plan in a trial, as the caller would run it."""

_TRIAL_S = 0.8  # seconds of measured runs in a trial, all candidates together
TRIAL_ROUNDS = 4  # each candidate runs once per round; every other round runs in reverse
_MIN_RUN_S = 0.08
_TRIAL_WARMUP_S = 0.03  # an unmeasured run of each candidate first
_BURST_GAP_S = 5e-5  # outputs closer than this came to the sink in one burst
TRIAL_TIE = 0.12  # measured within this of each other: a near-tie, decided by layout
EXTEND_WITHIN = 0.2  # measured within this of the fastest after the rounds: extra rounds
EXTRA_ROUNDS = 4  # those get this many more rounds, of about
_EXTRA_S = 0.8  # this many seconds in all


def near_tie(rates: Sequence[float], within: float = TRIAL_TIE) -> list[int]:
    """The candidates measured within ``within`` of the fastest."""
    fastest = max(rates)
    return [i for i, r in enumerate(rates) if r >= fastest * (1 - within)]


@dataclasses.dataclass
class Trial:
    rates: list[float]  # median samples/s of each candidate
    run_s: float  # seconds of a run in the first rounds
    extended: int = 0  # candidates that ran the extra rounds
    extra_s: float = 0.0  # seconds of a run in the extra rounds
    reference: int = 0  # the candidate the others were compared with, round by round


def measure(
    modules: list[nn.Module],
    candidates: list[Plan],
    example: torch.Tensor,
    build: Build,
) -> Trial:
    """Measured samples/s of each candidate, run as ``build(candidate)`` (a real pipeline on
    its device worker threads)
    (rounds alternate the order; see ``_paired`` for how the runs are combined). When more
    than one is measured within ``EXTEND_WITHIN`` of the fastest (a trial's noise is about
    10%, more than the near-tie it must tell), those run ``EXTRA_ROUNDS`` more rounds (about
    ``_EXTRA_S`` in all): more samples where the choice is close, none where it is not.

    Runs its own event loop on the calling thread, or, when that thread runs one already
    (``pipeline()`` called in a coroutine), on a thread of its own (an inline candidate
    then runs on that thread rather than where the flow's loop will be, which can cost it
    some speed: PyTorch's intra-op threads belong to the thread that calls them). The
    modules' training flags and buffers are restored afterwards."""
    run_s = max(_MIN_RUN_S, _TRIAL_S / (TRIAL_ROUNDS * len(candidates)))
    pipes = [build(c) for c in candidates]
    modes = [(m, m.training) for root in modules for m in root.modules()]
    outcome: dict[str, object] = {}

    def main() -> None:
        try:
            outcome["trial"] = asyncio.run(_rounds(pipes, example, run_s))
        except BaseException as exc:
            outcome["error"] = exc

    try:
        with preserved_buffers(modules):
            if _loop_running():  # pipeline() called inside a coroutine: a loop of its own
                thread = threading.Thread(target=main, name="streamflow-plan-trial", daemon=True)
                thread.start()
                thread.join()
            else:  # here, as the flow will run: an inline candidate on this very thread
                main()
    finally:
        for m, mode in modes:
            m.training = mode
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    result: Trial = outcome["trial"]  # type: ignore[assignment]
    return result


async def _rounds(pipes: list[Composite], example: torch.Tensor, run_s: float) -> Trial:
    """Run the candidates in one real flow, a ``source -> map("model", pipe) -> sink``
    branch each, so each runs exactly as ``stream.map("model", pipe)`` runs it: its parts
    on the flow's worker threads, an inline one on the event loop, its own concurrency.
    One branch at a time is fed, run by run (each run drains before the next starts): a
    short warm-up of each, then the rounds, then the extra rounds of a near-tie."""
    rounds: list[dict[int, float]] = []  # samples/s of each candidate that ran, per round
    trial = Trial([], run_s)

    def schedule() -> Iterator[tuple[int, float, int | None]]:
        order = list(range(len(pipes)))
        for i in order:  # first calls on fresh threads: allocator, caches, frequency
            yield i, _TRIAL_WARMUP_S, None
        for r in range(TRIAL_ROUNDS):
            rounds.append({})
            for i in order if r % 2 == 0 else order[::-1]:
                yield i, run_s, len(rounds) - 1
        near = near_tie(_paired(rounds, 0), EXTEND_WITHIN)  # the runs so far are in
        if len(near) > 1:
            trial.extended = len(near)
            trial.extra_s = max(_MIN_RUN_S, _EXTRA_S / (EXTRA_ROUNDS * len(near)))
            for r in range(EXTRA_ROUNDS):
                rounds.append({})
                for i in near if r % 2 == 0 else near[::-1]:
                    yield i, trial.extra_s, len(rounds) - 1
            trial.reference = near[0]

    turns = _Turns(example, schedule(), rounds, len(pipes))
    flow = Flow("plan-trial")
    for i, pipe in enumerate(pipes):
        flow.source(f"feed{i}", _Feed(turns, i)).map(f"model{i}", pipe).sink(
            f"out{i}", turns.sink(i)
        )
    await flow.run()
    trial.rates = _paired(rounds, trial.reference)
    return trial


class _Turns:
    """Whose turn it is: the schedule of runs, the samples each branch was fed and when
    each output reached its sink, and the rates of the runs."""

    def __init__(
        self,
        example: torch.Tensor,
        schedule: Iterator[tuple[int, float, int | None]],
        rounds: list[dict[int, float]],
        count: int,
    ) -> None:
        self.example = example
        self.schedule = schedule
        self.rounds = rounds
        self.sent = [0] * count
        self.stamps: list[list[float]] = [[] for _ in range(count)]
        self.wake = [asyncio.Event() for _ in range(count)]
        self.drained = asyncio.Event()
        self.run: tuple[int, float, int | None] | None = None
        self.end: float | None = None  # of the current run, set when its first sample goes
        self.first = 0
        self.over = False
        self.advance()

    def advance(self) -> None:
        """Start the next run of the schedule (or end the trial) and wake its branch."""
        self.run = next(self.schedule, None)
        self.end = None
        if self.run is None:
            self.over = True
            for event in self.wake:
                event.set()
            return
        i = self.run[0]
        self.first = self.sent[i]  # its previous run has drained
        self.wake[i].set()

    def take(self, i: int) -> torch.Tensor | None:
        """A sample for branch ``i`` if its run is on (it starts now if not yet started)."""
        if self.run is None or self.run[0] != i:
            return None
        now = time.perf_counter()
        if self.end is None:
            self.end = now + self.run[1]
        if now >= self.end:
            return None
        self.sent[i] += 1
        return self.example.clone()

    async def finish(self, i: int) -> None:
        """Branch ``i``'s run is over: wait for its outputs, record its rate, move on."""
        self.drained.clear()
        if len(self.stamps[i]) < self.sent[i]:
            await self.drained.wait()
        assert self.run is not None
        round_ = self.run[2]
        if round_ is not None:
            self.rounds[round_][i] = _rate(self.stamps[i][self.first :])
        self.advance()

    def sink(self, i: int) -> Callable[[object], Awaitable[None]]:
        stamps, sent = self.stamps[i], self.sent

        async def out(_: object) -> None:
            stamps.append(time.perf_counter())
            if len(stamps) >= sent[i]:
                self.drained.set()

        return out


class _Feed:
    """Branch ``i``'s source: samples while its run is on, as cheap per sample as
    ``sf.iterate`` (``receive_nowait``); otherwise it waits for its turn."""

    def __init__(self, turns: _Turns, i: int) -> None:
        self.turns = turns
        self.i = i

    def __aiter__(self) -> _Feed:
        return self

    def receive_nowait(self) -> torch.Tensor:
        x = self.turns.take(self.i)
        if x is None:
            raise asyncio.QueueEmpty
        return x

    async def __anext__(self) -> torch.Tensor:
        turns, i = self.turns, self.i
        while True:
            if turns.over:
                raise StopAsyncIteration
            x = turns.take(i)
            if x is not None:
                return x
            if turns.run is not None and turns.run[0] == i and turns.end is not None:
                await turns.finish(i)  # this branch's run is over
                continue
            turns.wake[i].clear()
            if not (turns.over or (turns.run is not None and turns.run[0] == i)):
                await turns.wake[i].wait()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _paired(rounds: list[dict[int, float]], ref: int) -> list[float]:
    """Each candidate's samples/s: the median over the rounds of its rate over the
    reference's rate in the same round, times the reference's median rate. The machine's
    speed moves in steps of 20-30% from one second to the next; within a round it moves
    little, so ratios within rounds are what can be compared."""
    own = statistics.median(r[ref] for r in rounds if ref in r)
    count = max(i for r in rounds for i in r) + 1
    rates = []
    for i in range(count):
        ratios = [r[i] / r[ref] for r in rounds if i in r and r.get(ref)]
        rates.append(own * statistics.median(ratios) if ratios else 0.0)
    return rates


def _rate(stamps: list[float]) -> float:
    """Samples/s from the outputs of one run, from the end of a burst past its first
    quarter to its last output. Results reach the loop in bursts while a pipeline is more
    than half full (see ``_PipelineStage._deliver``) and one by one once it drains, so the
    span from a burst's end to the last output holds whole bursts only."""
    k = len(stamps) // 4
    while k + 1 < len(stamps) - 1 and stamps[k + 1] - stamps[k] < _BURST_GAP_S:
        k += 1
    span = stamps[-1] - stamps[k] if stamps else 0.0
    if len(stamps) - 1 - k < 2 or span <= 0:
        return 0.0
    return (len(stamps) - 1 - k) / span
