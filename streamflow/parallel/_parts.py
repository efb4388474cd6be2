"""What a pipeline and an online trainer share: parts (consecutive layers of a plan pinned to
one device) and the flow stage that drives them.

The stage places each part on the flow's worker for its device, hands work to the part
threads, and settles results on the event loop in groups: a part thread queues each result
and wakes the loop only when the parts run half empty (half of ``in_flight`` or fewer still
inside) and no wake-up is pending, so while the parts are busy the loop does not compete
with them for the cores once per sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from .._devices import Worker, resolve_future
from .._metrics import Counters, StageMetrics
from .._stage import Stage, StageContext
from ._devices import intra_op_threads, torch_device
from ._plan import Plan, StagePlan

__all__ = ["Part", "PartsStage", "split", "timed"]

R = TypeVar("R")


class Part:
    """Consecutive layers ``layers = (start, end)`` of a model, pinned to device ``target``;
    ``index`` is the part's place in its plan and ``threads`` the intra-op threads it uses on
    a CPU. ``counters`` are written by the part's thread only."""

    def __init__(
        self, module: nn.Module, target: str, *, index: int, layers: tuple[int, int], threads: int
    ) -> None:
        self.module = module
        self.target = target
        self.index = index
        self.layers = layers
        self.threads = threads
        self.torch_device = torch_device(target)
        self.is_cuda = self.torch_device.type == "cuda"
        self.counters = Counters()

    def span(self) -> str:
        start, end = self.layers
        return f"layers {start}..{end - 1} on {self.target}"

    def describe(self, name: str) -> str:
        """How errors name this part of stage ``name``: ``name[i] (layers a..b on dev)``."""
        return f"{name}[{self.index}] ({self.span()})"


def split(layers: Sequence[nn.Module], plan: Plan) -> list[tuple[nn.Sequential, StagePlan, int]]:
    """The model cut by ``plan``: each stage's layers as one module, the stage, and the
    intra-op threads each CPU part gets (the cores shared among the CPU parts)."""
    cpu_parts = sum(1 for s in plan.stages if s.device.startswith("cpu"))
    threads = intra_op_threads(cpu_parts)
    return [(nn.Sequential(*layers[s.layer_start : s.layer_end]), s, threads) for s in plan.stages]


def timed(part: Part, fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    """Run ``fn(*args)`` on the part's thread, adding the time it took to the part's
    latency (also when it raises)."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        part.counters.record(time.perf_counter() - t0)


P = TypeVar("P", bound=Part)


class PartsStage(Stage[Any, torch.Tensor], Generic[P]):
    """The flow stage behind ``stream.map(name, pipe_or_trainer)``.

    Subclasses start each item on the first part's thread (counting it with ``started``),
    hand on between part threads, and call :meth:`deliver` from a part thread with a key,
    a result and an error; :meth:`resolve` settles one on the loop (by default the key is
    the item's future).
    """

    title = "parts"

    def __init__(self, parts: Sequence[P], name: str, in_flight: int) -> None:
        self.parts = parts
        self.name = name
        self.in_flight = in_flight
        self.workers: list[Worker] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque[tuple[Any, Any, BaseException | None]] = deque()
        self._wake_pending = False
        self._started = 0  # items handed to the first part (written by the loop only)
        self._finished = 0  # items delivered (written by the last part's thread only)

    def __repr__(self) -> str:
        return f"{self.title} [{' | '.join(p.span() for p in self.parts)}]"

    async def place(self, context: StageContext, prepare: Callable[[P], None]) -> None:
        """Put each part on the flow's worker for its device (shared with the other stages
        pinned there) and run ``prepare(part)`` on it. A second part on the same GPU gets a
        thread of its own, so that its CUDA stream runs beside the first part's instead of
        after it."""
        self.loop = asyncio.get_running_loop()
        placed: set[str] = set()
        workers = []
        for p in self.parts:
            again = p.is_cuda and p.target in placed
            placed.add(p.target)
            workers.append(
                context.worker(f"{p.target}/{self.name}[{p.index}]" if again else p.target)
            )
        self.workers = workers
        for part, worker in zip(self.parts, workers, strict=True):
            part.counters = Counters()
            await worker.run(prepare, part)

    def started(self) -> None:
        """One more item went into the first part (call on the loop)."""
        self._started += 1

    def deliver(self, key: Any, result: Any, error: BaseException | None) -> None:
        """From a part's thread: queue an outcome for :meth:`resolve`, waking the loop only
        when the parts run half empty and no wake-up is pending."""
        self._ready.append((key, result, error))
        self._finished += 1
        inside = self._started - self._finished
        if not self._wake_pending and inside <= self.in_flight // 2:
            self._wake_pending = True
            assert self.loop is not None
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self.loop.call_soon_threadsafe(self._settle_ready)

    def resolve(self, key: Any, result: Any, error: BaseException | None) -> None:
        """On the loop: settle one outcome (``key`` is the item's future here)."""
        resolve_future(key, result, error)

    def _settle_ready(self) -> None:
        self._wake_pending = False
        ready = self._ready
        while ready:
            self.resolve(*ready.popleft())

    def sub_metrics(self) -> dict[str, StageMetrics]:
        """Each part's latency and counts, as ``name[i]``."""
        return {
            f"{self.name}[{p.index}]": p.counters.snapshot(f"{self.name}[{p.index}]", "part", 0, 0)
            for p in self.parts
        }
