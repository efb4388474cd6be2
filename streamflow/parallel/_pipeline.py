"""A model split layer-wise into stages pinned to devices, usable as one flow stage."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
import torch
from torch import nn

from .._channel import Channel
from .._cuda import CudaPlacement
from .._devices import Worker, resolve_future
from .._graph import Flow
from .._io import iterate
from .._metrics import StageMetrics, _Counters
from .._stage import Stage, StageContext
from ._devices import intra_op_threads, torch_device
from ._forward import layer_chain
from ._layers import named_layers
from ._plan import Objective, Plan, plan
from ._profile import profile

if TYPE_CHECKING:
    from .._channel import Overflow
    from .._graph import Stream
    from .._policy import ErrorPolicy

__all__ = ["Pipeline", "pipeline"]


def pipeline(
    model: nn.Module | Sequence[nn.Module],
    devices: Sequence[str] | Literal["auto"] = "auto",
    example: torch.Tensor | None = None,
    *,
    partition: Literal["auto"] | Sequence[int] | Plan = "auto",
    objective: Objective = "throughput",
    capacity: int = 16,
    cuda_graphs: bool = False,
    inline_below: float = 5e-4,
) -> Pipeline:
    """Split ``model`` layer-wise over ``devices`` for pipelined inference over a stream.

    ``model``: an ``nn.Sequential`` (nested ones flattened), a list of modules, or a module
    that ``torch.fx`` can trace. ``partition="auto"`` profiles each layer on ``example`` (a
    batch like the ones the stream carries) and plans the cut points (see
    :func:`streamflow.parallel.plan`; it may use fewer stages than devices); a list gives the
    layers per stage; a :class:`Plan` is used as it is. ``capacity`` is how many samples may
    wait per part (at most ``capacity`` x parts are in flight): more keeps the parts busier
    while the event loop runs, fewer lowers latency when the source is always ahead.
    ``cuda_graphs=True`` captures each CUDA part's forward once per input shape and replays it.

    When the plan is a single CPU stage predicted to take less than ``inline_below`` seconds
    per input batch, the model runs on the event loop itself, like a plain ``def`` stage: handing
    such a small piece of work to a thread (and sharing the GIL with it) would cost more than
    the work. Set ``inline_below=0`` to always use a worker thread. Use the result as
    ``stream.map("model", pipe)`` or ``pipe.open(items)``.
    """
    devs = _resolve_devices(devices)
    layers = named_layers(model, example)
    if isinstance(partition, Plan):
        chosen = partition
        if chosen.stages[-1].layer_end != len(layers):
            raise ValueError(
                f"the plan covers {chosen.stages[-1].layer_end} layers, the model has {len(layers)}"
            )
    else:
        if example is None:
            raise ValueError(
                "pipeline() needs example= (one input batch) to profile the layers; "
                "or pass partition=Plan.load(...)"
            )
        prof = profile([m for _, m in layers], example, list(dict.fromkeys(devs)))
        if partition == "auto":
            chosen = plan(prof, devs, objective)
        else:
            chosen = plan(prof, devs, objective, partition=list(partition))
    return Pipeline(
        [m for _, m in layers],
        chosen,
        capacity=capacity,
        cuda_graphs=cuda_graphs,
        inline_below=inline_below,
    )


def _resolve_devices(devices: Sequence[str] | Literal["auto"]) -> list[str]:
    if devices == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [f"cpu:{i}" for i in range(min(2, os.cpu_count() or 1))]
    if isinstance(devices, str):
        raise TypeError(
            f"devices must be 'auto' or a list such as ['cpu:0', 'cpu:1'], got {devices!r}"
        )
    return list(devices)


class Pipeline:
    """A model cut into parts by a :class:`Plan`; each part runs on its own device thread.

    As a flow stage (``stream.map("model", pipe)``) each sample enters the first part as soon
    as it arrives and the parts work on different samples at the same time; a sample moves
    from one part's thread to the next directly, never through the event loop. Outputs keep
    input order; at most ``in_flight`` samples are inside the pipeline (``capacity`` per
    part, 16 by default), so backpressure holds. The parts appear in flow metrics as
    ``model[0]``, ``model[1]``, ...
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        plan: Plan,
        *,
        capacity: int = 16,
        cuda_graphs: bool = False,
        inline_below: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.plan = plan
        self.in_flight = capacity * len(plan.stages)
        only = plan.stages[0]
        self.inline = (
            len(plan.stages) == 1 and only.device.startswith("cpu") and only.time_s < inline_below
        )
        cpu_parts = sum(1 for s in plan.stages if s.device.startswith("cpu"))
        threads = intra_op_threads(cpu_parts)
        self.parts: list[PipelinePart] = [
            PipelinePart(
                nn.Sequential(*layers[s.layer_start : s.layer_end]),
                s.device,
                index=i,
                layers=(s.layer_start, s.layer_end),
                threads=threads,
                cuda_graphs=cuda_graphs,
            )
            for i, s in enumerate(plan.stages)
        ]

    def __repr__(self) -> str:
        devices = ", ".join(p.target for p in self.parts)
        return f"<Pipeline {len(self.parts)} parts on {devices}>"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the parts one after another on the calling thread (a reference forward)."""
        with torch.inference_mode():
            for part in self.parts:
                x = part.forward(x)
        return x

    def add_stages(
        self,
        stream: Stream[Any],
        name: str,
        *,
        capacity: int,
        overflow: Overflow,
        errors: ErrorPolicy,
    ) -> Stream[Any]:
        return stream.map(
            name,
            _PipelineStage(self, name),
            capacity=capacity,
            overflow=overflow,
            errors=errors,
            concurrency=1 if self.inline else self.in_flight,
        )

    @asynccontextmanager
    async def open(self, items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Channel[Any]]:
        """Run the pipeline over ``items`` without writing a flow::

            async with pipe.open(frames) as outputs:
                async for y in outputs:  # in input order
                    ...

        The flow runs in a task group that the block owns: leaving the block early (a
        ``break``, an error) cancels the flow and joins its threads before the block ends.
        A failure of the flow ends ``outputs`` and is raised when the block ends.

        :raises StageError: a part failed.
        """
        out: Channel[Any] = Channel(self.in_flight)
        flow = Flow("pipeline")
        flow.source("items", iterate(items)).map("model", self).sink("out", out.send)
        failure: list[Exception] = []

        async def run() -> None:
            try:
                await flow.run()
            except Exception as exc:  # raised below, unwrapped from the task group
                failure.append(exc)
            finally:
                out.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                yield out
            finally:
                if not (out.closed and len(out) == 0):
                    tg.cancel_scope.cancel()  # left early: stop the flow now
        if failure:
            raise failure[0]


class PipelineError(Exception):
    """A layer raised inside a pipeline part; the message names the part, its layers and
    device, and ``__cause__`` is the original exception."""


class PipelinePart:
    """One part of a :class:`Pipeline`: consecutive layers pinned to one device."""

    def __init__(
        self,
        module: nn.Module,
        target: str,
        *,
        index: int,
        layers: tuple[int, int],
        threads: int,
        cuda_graphs: bool,
    ) -> None:
        self.module = module
        self.target = target
        self.index = index
        self.layers = layers
        self.threads = threads
        self.cuda_graphs = cuda_graphs
        self.torch_device = torch_device(target)
        self.is_cuda = self.torch_device.type == "cuda"
        self.counters = _Counters()
        self._chain = layer_chain(module)
        self._gpu = CudaPlacement(target) if self.is_cuda else None
        self._graphs: dict[tuple[tuple[int, ...], torch.dtype], Any] = {}
        if cuda_graphs and not self.is_cuda:
            raise ValueError(f"cuda_graphs=True needs CUDA devices, part {index} is on {target}")

    def prepare(self) -> None:
        """On the part's device thread: set its intra-op threads, or check the GPU, make it
        current and create the part's CUDA stream; then place the weights."""
        if self._gpu is not None:
            self._gpu.prepare()
        else:
            torch.set_num_threads(self.threads)
        self.module.to(self.torch_device).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward one batch on this part's device (call it on the part's thread).

        On CUDA the copy in and the forward are queued on the part's own stream, and the
        thread (never the event loop) waits for the result before handing it on (see
        ``streamflow._cuda.CudaPlacement``).
        """
        if self._gpu is None:
            return self._chain(x if x.device.type == "cpu" else x.cpu())  # type: ignore[no-any-return]
        return self._gpu.run(self._replay if self.cuda_graphs else self._chain, x)  # type: ignore[no-any-return]

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        """Run a CUDA graph captured for ``x``'s shape and dtype (captured on first use)."""
        key = (tuple(x.shape), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = x.clone()
            for _ in range(3):  # warm up outside the graph (cuBLAS handles, allocator)
                self.module(static_in)
            graph = torch.cuda.CUDAGraph()
            # "thread_local": the other parts keep running on their own threads while this
            # one captures (allocating, waiting on events), which the default "global" mode
            # would count as an error in this capture.
            assert self._gpu is not None
            stream = self._gpu.stream
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                static_out = self.module(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # type: ignore[no-any-return]  # the static buffer is overwritten by the next replay

    def describe(self, name: str) -> str:
        start, end = self.layers
        return f"{name}[{self.index}] (layers {start}..{end - 1} on {self.target})"


class _PipelineStage(Stage[torch.Tensor, torch.Tensor]):
    """The flow stage behind ``stream.map(name, pipe)``: feeds the part threads, awaits the
    last part's result."""

    def __init__(self, pipe: Pipeline, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.workers: list[Worker] = []
        self._ready: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._wake_pending = False
        self._started = 0  # samples handed to the first part (written by the loop only)
        self._finished = 0  # samples out of the last part (written by part threads only)

    def __repr__(self) -> str:
        parts = " | ".join(
            f"layers {p.layers[0]}..{p.layers[1] - 1} on {p.target}" for p in self.pipe.parts
        )
        return f"pipeline [{parts}]" + (" inline" if self.pipe.inline else "")

    async def setup(self, context: StageContext) -> None:
        """Place each part on its device's worker: the flow's own worker for that device
        (shared with other stages pinned there). A second part on the same GPU gets a
        thread of its own, so that its stream runs beside the first part's instead of
        after it."""
        if self.pipe.inline:
            part = self.pipe.parts[0]
            part.counters = _Counters()
            part.module.eval()
            return
        placed: set[str] = set()
        workers = []
        for p in self.pipe.parts:
            again = p.is_cuda and p.target in placed
            placed.add(p.target)
            name = f"{p.target}/{self.name}[{p.index}]" if again else p.target
            workers.append(context.worker(name))
        self.workers = workers
        for part, worker in zip(self.pipe.parts, self.workers, strict=True):
            part.counters = _Counters()
            await worker.run(part.prepare)

    def process(self, item: torch.Tensor) -> asyncio.Future[torch.Tensor] | torch.Tensor:
        """Start ``item`` on the first part's thread; the future resolves on the loop.
        (An inline pipeline computes the result right here.)"""
        if self.pipe.inline:  # the stage's own metrics are the part's
            with torch.inference_mode():
                return self.pipe.parts[0].forward(item)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._started += 1
        self._hand(0, item, future, loop)
        return future

    def _hand(
        self,
        i: int,
        x: torch.Tensor,
        future: asyncio.Future[torch.Tensor],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        part = self.pipe.parts[i]

        def done(y: Any, error: BaseException | None) -> None:  # on part i's thread
            if error is not None:
                failure = PipelineError(
                    f"{part.describe(self.name)}: {type(error).__name__}: {error}"
                )
                failure.__cause__ = error
                self._deliver(loop, future, None, failure)
            elif i + 1 < len(self.pipe.parts):
                self._hand(i + 1, y, future, loop)
            else:
                self._deliver(loop, future, y, None)

        self.workers[i].submit(_timed, (part, x), done)

    def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[torch.Tensor],
        result: Any,
        error: BaseException | None,
    ) -> None:
        """From a part's thread: queue a result. Wake the loop only when the pipeline runs
        low (half its samples or fewer still inside) and no wake-up is pending: while the
        pipeline is full, results are settled (and new samples started) in groups, so the
        loop does not compete with the parts for the cores once per sample."""
        self._ready.append((future, result, error))
        self._finished += 1
        inside = self._started - self._finished
        if not self._wake_pending and inside <= self.pipe.in_flight // 2:
            self._wake_pending = True
            loop.call_soon_threadsafe(self._settle_ready)

    def _settle_ready(self) -> None:
        self._wake_pending = False
        ready = self._ready
        while ready:
            resolve_future(*ready.popleft())

    def sub_metrics(self) -> dict[str, StageMetrics]:
        if self.pipe.inline:
            return {}
        return {
            f"{self.name}[{p.index}]": p.counters.snapshot(f"{self.name}[{p.index}]", "part", 0, 0)
            for p in self.pipe.parts
        }


def _timed(part: PipelinePart, x: torch.Tensor) -> torch.Tensor:
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = part.forward(x)
    c = part.counters
    c.items_in += 1
    c.items_out += 1
    c.record(time.perf_counter() - t0)
    return y
