"""Training schedules: how forwards, gradients and weight updates move through the parts.

Every method here runs on the thread of the part it names (``s``), so a part's state is
only ever touched by its own thread; work moves between parts with ``hand``. Each schedule
is deterministic: which weight version a forward sees and which gradient an update applies
depend on sample indices only, never on thread timing, so the same stream gives the same
weights. Each run of a flow is one pass of the pipeline: it fills at the start and is
flushed at the end (see each schedule's ``flush``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from ._trainpart import Activation, TrainPart

__all__ = ["NF1B", "SCHEDULES", "Job", "Partime", "Schedule", "Sync"]


class Job:
    """One stream item on its way through the parts: index in the run, current activation,
    target, rows (batch size)."""

    __slots__ = ("k", "rows", "x", "y")

    def __init__(self, k: int, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        self.k = k
        self.x = x
        self.y = y
        self.rows = rows


Hand = Callable[..., None]  # hand(s, fn, *args): run fn(*args) on part s's thread
Finish = Callable[[Job, torch.Tensor], torch.Tensor]  # emit the prediction, return the loss


class Schedule:
    """Base: the parts, the loss, and the hooks the trainer stage installs per run."""

    name: ClassVar[str]

    def __init__(self, parts: Sequence[TrainPart], microbatches: int) -> None:
        self.parts = list(parts)
        self.n = len(self.parts)
        self.last = self.n - 1
        self.microbatches = microbatches
        self.hand: Hand = _unset
        self.finish: Finish = _unset

    def begin(self, hand: Hand, finish: Finish) -> None:
        """Start a run: ``hand`` moves work between part threads, ``finish`` (called on the
        last part's thread) emits a job's prediction and returns its loss."""
        self.hand, self.finish = hand, finish

    def forward(self, s: int, job: Job) -> None:
        """``job`` arrived at part ``s``."""
        raise NotImplementedError

    def flush(self, s: int) -> None:
        """The run ended and every item was predicted: apply what is left (parts run this
        from the last to the first, each after everything queued on it)."""

    resets: ClassVar[bool] = False
    """Whether a checkpoint starts the schedule over (:meth:`settle`, then ``begin``)."""

    def settle(self, s: int) -> None:
        """A checkpoint, with every item predicted (parts run this from the last to the
        first, each after everything queued on it): apply what complete steps still need,
        and let go of the activations of a mini-batch in progress (a schedule that
        ``resets`` has its items forwarded again). The default applies nothing."""

    def staleness_bound(self, s: int) -> int:
        """The documented staleness of part ``s`` in steady state (weight versions)."""
        raise NotImplementedError


def _unset(*args: Any) -> Any:
    raise RuntimeError("the schedule is not running")


class Sync(Schedule):
    """GPipe-style micro-batches with a flush: exactly sequential mini-batch training.

    ``microbatches`` consecutive items form a mini-batch. Their forwards are pipelined over
    the parts with the weights of the previous step; each one's backward starts as soon as
    its loss is known, and a part steps once it has back-propagated the whole mini-batch
    (the flush). A part holds the next mini-batch's forwards until it has stepped. The
    update is that of ``loss_fn`` on the concatenated mini-batch (losses weighted by rows),
    so gradients and weights equal sequential training on the same mini-batches.

    Staleness: 0 at every part. Memory: up to one mini-batch of activations per part, one
    weight version. The price is the bubble: parts idle while the pipeline fills and drains
    around every step.
    """

    name = "sync"

    def begin(self, hand: Hand, finish: Finish) -> None:
        super().begin(hand, finish)
        n = self.n
        self.steps = [0] * n  # mini-batches stepped this run
        self.queued: list[deque[Job]] = [deque() for _ in range(n)]
        self.graphs: list[dict[int, Activation]] = [{} for _ in range(n)]
        self.batch: list[list[Activation]] = [[] for _ in range(n)]  # back-propagated
        self.rows = [0] * n
        self.busy = [False] * n

    def staleness_bound(self, s: int) -> int:
        return 0

    def forward(self, s: int, job: Job) -> None:
        self.queued[s].append(job)
        self._pump(s)

    def backward(self, s: int, k: int, grad: torch.Tensor) -> None:
        act = self.graphs[s].pop(k)
        torch.autograd.backward(act.out, grad.to(act.out.device))
        self._backwarded(s, k, act)

    def flush(self, s: int) -> None:
        if self.batch[s]:
            self._step(s)

    def _pump(self, s: int) -> None:
        if self.busy[s]:
            return
        self.busy[s] = True
        try:
            queued = self.queued[s]
            while queued and queued[0].k // self.microbatches <= self.steps[s]:
                self._forward(s, queued.popleft())
        finally:
            self.busy[s] = False

    def _forward(self, s: int, job: Job) -> None:
        part = self.parts[s]
        act = part.forward(job.x, job.rows, leaf=s > 0)
        self.rows[s] += job.rows
        k = job.k
        if s == self.last:
            loss = self.finish(job, act.out)
            torch.autograd.backward(loss * job.rows)
            self._backwarded(s, k, act)
        else:
            self.graphs[s][k] = act
            job.x = act.out.detach()
            self.hand(s + 1, self.forward, s + 1, job)

    def _backwarded(self, s: int, k: int, act: Activation) -> None:
        if s > 0:
            self.hand(s - 1, self.backward, s - 1, k, act.x.grad)
        batch = self.batch[s]
        batch.append(act)
        if len(batch) == self.microbatches:
            self._step(s)
            self._pump(s)

    def _step(self, s: int) -> None:
        part, batch = self.parts[s], self.batch[s]
        part.release(batch)
        part.step(min(a.version for a in batch), 1.0 / self.rows[s])
        self.batch[s] = []
        self.rows[s] = 0
        self.steps[s] += 1


class Partime(Schedule):
    """PARTIME: every part steps on every tick, on a gradient a fixed number of ticks old.

    A tick of part ``s`` is one sample. At its tick for sample ``j`` the part forwards ``j``
    (the output goes downstream at once), then takes the gradient that part ``s + 1`` sent
    back at its own tick for sample ``j - 2``, back-propagates it through the forward of the
    sample it belongs to (kept until then) with the part's latest weights, and steps its
    optimizer; the gradient for that forward's input goes upstream. The last part learns
    from the sample it has just forwarded. So part ``s`` of ``S`` applies, at its tick for
    sample ``j``, the gradient of the loss of sample ``j - 2(S-1-s)``: gradients are
    delayed by ``2(S-1-s)`` ticks, which is also the part's staleness in weight versions.
    Every part learns: the first ``2(S-1-s)`` ticks of a run bring no gradient yet (the
    pipeline fills), then every tick updates every part. ``microbatches`` is not used.

    Memory: one weight version; part ``s`` holds the activations of ``2(S-1-s) + 1``
    forwards. When a run ends, the gradients still in flight (those that the next samples
    would have carried) are dropped.
    """

    name = "partime"

    def begin(self, hand: Hand, finish: Finish) -> None:
        super().begin(hand, finish)
        n = self.n
        self.queued: list[deque[Job]] = [deque() for _ in range(n)]
        self.graphs: list[dict[int, Activation]] = [{} for _ in range(n)]
        # tick of part s + 1 -> (gradient for the output of sample i, or None; i)
        self.cotangents: list[dict[int, tuple[torch.Tensor | None, int]]] = [{} for _ in range(n)]

    def staleness_bound(self, s: int) -> int:
        return 2 * (self.last - s)

    def forward(self, s: int, job: Job) -> None:
        self.queued[s].append(job)
        self._pump(s)

    def cotangent(self, s: int, k: int, grad: torch.Tensor | None, i: int) -> None:
        self.cotangents[s][k] = (grad, i)
        self._pump(s)

    def flush(self, s: int) -> None:
        self.parts[s].release(self.graphs[s].values())
        self.graphs[s].clear()
        self.cotangents[s].clear()

    resets = True

    def settle(self, s: int) -> None:
        """Apply the gradients still in flight at part ``s`` (they would have come with
        the next samples), passing theirs upstream, then start over: at a checkpoint
        every part has learned from every sample once, a little earlier than it would
        have."""
        cotangents, part = self.cotangents[s], self.parts[s]
        for k in sorted(cotangents):
            grad, i = cotangents.pop(k)
            learned = None
            if grad is not None:
                learned = self.graphs[s].pop(i)
                torch.autograd.backward(learned.out, grad.to(learned.out.device))
                part.release((learned,))
                part.step(learned.version)
            if s > 0:
                up = None if learned is None else learned.x.grad
                self.hand(s - 1, self.cotangent, s - 1, k + 2, up, i)
        self.flush(s)

    def _pump(self, s: int) -> None:
        queued, cotangents = self.queued[s], self.cotangents[s]
        while queued:
            k = queued[0].k
            if s < self.last and k >= 2 and k - 2 not in cotangents:
                return  # part s + 1 has not finished its tick for sample k - 2 yet
            self._tick(s, queued.popleft())

    def _tick(self, s: int, job: Job) -> None:
        part, k = self.parts[s], job.k
        act = part.forward(job.x, job.rows, leaf=s > 0)
        grad: torch.Tensor | None = None
        if s == self.last:
            torch.autograd.backward(self.finish(job, act.out))
            i, learned = k, act
        else:
            self.graphs[s][k] = act
            job.x = act.out.detach()
            self.hand(s + 1, self.forward, s + 1, job)  # downstream first: it starts at once
            grad, i = self.cotangents[s].pop(k - 2, (None, -1))
            if grad is None:
                learned = None
            else:
                learned = self.graphs[s].pop(i)
                torch.autograd.backward(learned.out, grad.to(learned.out.device))
        if learned is not None:
            part.release((learned,))
            part.step(learned.version)
        if s > 0:
            up = None if learned is None else learned.x.grad
            self.hand(s - 1, self.cotangent, s - 1, k, up, i)


class NF1B(Schedule):
    """TiMePReSt (nF1B): n forwards, one backward on the latest weights, no weight stashing.

    ``microbatches`` (N) consecutive items form a mini-batch. Forwards are pipelined and
    never wait for a flush; once the last micro-batch's loss is known, one backward of the
    mean loss of the mini-batch runs from the last part to the first, each part using its
    latest weights (activations are those of the forwards), and each part steps once. With
    ticks counted in micro-batches (part ``s`` forwards micro-batch ``k`` at tick ``k + s``
    and a mini-batch's update lands at the tick its last micro-batch leaves the last part),
    the forward of micro-batch ``k`` on part ``s`` sees exactly the updates of the
    mini-batches that finished before that tick. The weight-version gap between a
    mini-batch's first forward and its backward on part ``s`` of ``W`` is then
    ``floor((W + N - 2 - s) / N)``: at the first part the paper's
    ``v = floor((W + N - 2) / N)``; 0 at the last part.

    Memory: one weight version (the backward reads the live weights), and the activations
    of the micro-batches in flight, about ``W + N - 2 - s`` at part ``s``.
    """

    name = "nf1b"

    def begin(self, hand: Hand, finish: Finish) -> None:
        super().begin(hand, finish)
        n = self.n
        self.steps = [0] * n
        self.next_k = [0] * n  # the next micro-batch each part forwards
        self.queued: list[deque[Job]] = [deque() for _ in range(n)]
        self.graphs: list[dict[int, Activation]] = [{} for _ in range(n)]
        self.losses: list[torch.Tensor] = []  # last part: row-weighted losses of the batch
        # mini-batch -> micro-batch gradients for the part's outputs (None on the last part)
        self.pending: list[dict[int, list[tuple[int, torch.Tensor]] | None]] = [
            {} for _ in range(n)
        ]
        self.busy = [False] * n

    def staleness_bound(self, s: int) -> int:
        return (self.n + self.microbatches - 2 - s) // self.microbatches

    def seen(self, k: int, s: int) -> int:
        """How many mini-batch updates the forward of micro-batch ``k`` on part ``s`` sees."""
        n = self.microbatches
        return max(0, -(-(k + s - n - self.n + 2) // n))

    def forward(self, s: int, job: Job) -> None:
        self.queued[s].append(job)
        self._pump(s)

    def backward(self, s: int, b: int, grads: list[tuple[int, torch.Tensor]]) -> None:
        self.pending[s][b] = grads
        self._pump(s)

    def flush(self, s: int) -> None:
        if s == self.last and self.losses:
            self.pending[s][self.steps[s]] = None  # the partial last mini-batch
        for b in sorted(self.pending[s]):
            self._backward(s, b)

    resets = True

    def settle(self, s: int) -> None:
        """Apply the backwards of the complete mini-batches still in flight, and drop the
        forwards of the one in progress (its items are forwarded again after the
        checkpoint): a checkpoint falls on a mini-batch boundary."""
        for b in sorted(self.pending[s]):
            self._backward(s, b)
        self.parts[s].release(self.graphs[s].values())
        self.graphs[s].clear()
        self.losses = []

    def _pump(self, s: int) -> None:
        if self.busy[s]:
            return
        self.busy[s] = True
        try:
            queued, pending = self.queued[s], self.pending[s]
            while True:
                due = self.seen(self.next_k[s], s)
                if queued and self.steps[s] == due:
                    self._forward(s, queued.popleft())
                elif self.steps[s] in pending and due > self.steps[s]:
                    self._backward(s, self.steps[s])
                else:
                    return
        finally:
            self.busy[s] = False

    def _forward(self, s: int, job: Job) -> None:
        act = self.parts[s].forward(job.x, job.rows, leaf=s > 0)
        k = job.k
        self.graphs[s][k] = act
        self.next_k[s] = k + 1
        if s == self.last:
            self.losses.append(self.finish(job, act.out) * job.rows)
            if len(self.losses) == self.microbatches:
                self.pending[s][k // self.microbatches] = None
        else:
            job.x = act.out.detach()
            self.hand(s + 1, self.forward, s + 1, job)

    def _backward(self, s: int, b: int) -> None:
        grads = self.pending[s].pop(b)
        part, graphs = self.parts[s], self.graphs[s]
        if grads is None:  # the last part: one backward of the mini-batch's summed loss
            keys = sorted(graphs)
            acts = [graphs.pop(k) for k in keys]
            total = torch.stack(self.losses).sum()
            self.losses = []
            torch.autograd.backward(total)
        else:
            keys = [k for k, _ in grads]
            acts = [graphs.pop(k) for k in keys]
            outs = [a.out for a in acts]
            cotangents = [g.to(o.device) for o, (_, g) in zip(outs, grads, strict=True)]
            torch.autograd.backward(outs, cotangents)
        if s > 0:
            up = [(k, a.x.grad) for k, a in zip(keys, acts, strict=True)]
            self.hand(s - 1, self.backward, s - 1, b, up)
        part.release(acts)
        part.step(min(a.version for a in acts), 1.0 / sum(a.rows for a in acts))
        self.steps[s] += 1


SCHEDULES: dict[str, type[Schedule]] = {"sync": Sync, "partime": Partime, "nf1b": NF1B}
