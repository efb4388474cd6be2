"""A model split layer-wise into stages pinned to devices, usable as one flow stage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import anyio
import torch
from torch import nn

from .._channel import Channel
from .._cuda import CudaPlacement
from .._graph import Flow
from .._io import iterate
from .._metrics import Counters, StageMetrics
from .._stage import StageContext
from ._choose import Partition, choose_plan
from ._devices import resolve_devices
from ._forward import layer_chain
from ._layers import named_layers
from ._parts import Part, PartsStage, split, timed
from ._plan import Objective, Plan

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
    partition: Partition = "auto",
    objective: Objective = "throughput",
    capacity: int = 16,
    cuda_graphs: bool = False,
    inline_below: float = 5e-4,
) -> Pipeline:
    """Split ``model`` layer-wise over ``devices`` for pipelined inference over a stream.

    ``model``: an ``nn.Sequential`` (nested ones flattened), a list of modules, or a module
    that ``torch.fx`` can trace. ``partition="auto"`` profiles each layer on ``example`` (a
    batch like the ones the stream carries) and plans the cut points (see
    :func:`streamflow.parallel.plan`; it may use fewer stages than devices); when other plans
    are predicted within 25% of the best, the candidates (three at most) run for about 1 s
    in all as real pipelines on the device threads, and one measured faster than the
    incumbent by over 12% replaces it (on CPU workers; docs/PARALLEL.md has the rules). A
    list gives the layers per stage (profiled for the plan's predicted costs when
    ``example`` is given); a :class:`Plan` is used as it is. ``pipe.plan.table()`` says how each input was measured and how the plan was chosen.
    ``capacity`` is how many samples may wait per part (at most ``capacity`` x parts are in
    flight): more keeps the parts busier while the event loop runs, fewer lowers latency
    when the source is always ahead. ``cuda_graphs=True`` captures each CUDA part's forward
    once per input shape and replays it.

    When the plan is a single CPU stage predicted to take less than ``inline_below`` seconds
    per input batch, the model runs on the event loop itself, like a plain ``def`` stage: handing
    such a small piece of work to a thread (and sharing the GIL with it) would cost more than
    the work. Set ``inline_below=0`` to always use a worker thread. Use the result as
    ``stream.map("model", pipe)`` or ``pipe.open(items)``.
    """
    devs = resolve_devices(devices)
    layers = named_layers(model, example)
    chosen = choose_plan(
        layers,
        devs,
        example,
        partition,
        objective,
        caller="pipeline()",
        build=lambda p: Pipeline(
            [m for _, m in layers], p, capacity=capacity, inline_below=inline_below
        ),
    )
    return Pipeline(
        [m for _, m in layers],
        chosen,
        capacity=capacity,
        cuda_graphs=cuda_graphs,
        inline_below=inline_below,
    )


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
        self.parts = [
            PipelinePart(
                module,
                s.device,
                index=i,
                layers=(s.layer_start, s.layer_end),
                threads=threads,
                cuda_graphs=cuda_graphs,
            )
            for i, (module, s, threads) in enumerate(split(layers, plan))
        ]

    def __repr__(self) -> str:
        devices = ", ".join(p.target for p in self.parts)
        return f"<Pipeline {len(self.parts)} parts on {devices}>"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the parts one after another on the calling thread (a reference forward)."""
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


class PipelinePart(Part):
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
        super().__init__(module, target, index=index, layers=layers, threads=threads)
        self.cuda_graphs = cuda_graphs
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
        """Forward one batch on this part's device, in inference mode (call it on the part's
        thread), and count it.

        On CUDA the copy in and the forward are queued on the part's own stream, and the
        thread (never the event loop) waits for the result before handing it on (see
        ``streamflow._cuda.CudaPlacement``).
        """
        with torch.inference_mode():
            if self._gpu is None:
                y = self._chain(x if x.device.type == "cpu" else x.cpu())
            else:
                y = self._gpu.run(self._replay if self.cuda_graphs else self._chain, x)
        c = self.counters
        c.items_in += 1
        c.items_out += 1
        return y  # type: ignore[no-any-return]

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


class _PipelineStage(PartsStage[PipelinePart]):
    """The flow stage behind ``stream.map(name, pipe)``: feeds the part threads, awaits the
    last part's result."""

    title = "pipeline"

    def __init__(self, pipe: Pipeline, name: str) -> None:
        super().__init__(pipe.parts, name, pipe.in_flight)
        self.inline = pipe.inline

    def __repr__(self) -> str:
        return super().__repr__() + (" inline" if self.inline else "")

    async def setup(self, context: StageContext) -> None:
        """Place each part on its device's worker (see ``PartsStage.place``); an inline
        pipeline runs its one part on the loop."""
        if self.inline:
            part = self.parts[0]
            part.counters = Counters()
            part.module.eval()
            return
        await self.place(context, PipelinePart.prepare)

    def process(self, item: torch.Tensor) -> asyncio.Future[torch.Tensor] | torch.Tensor:
        """Start ``item`` on the first part's thread; the future resolves on the loop.
        (An inline pipeline computes the result right here.)"""
        if self.inline:  # the stage's own metrics are the part's
            return self.parts[0].forward(item)
        assert self.loop is not None
        future: asyncio.Future[torch.Tensor] = self.loop.create_future()
        self.started()
        self._hand(0, item, future)
        return future

    def _hand(self, i: int, x: torch.Tensor, future: asyncio.Future[torch.Tensor]) -> None:
        part = self.parts[i]

        def done(y: Any, error: BaseException | None) -> None:  # on part i's thread
            if error is not None:
                failure = PipelineError(
                    f"{part.describe(self.name)}: {type(error).__name__}: {error}"
                )
                failure.__cause__ = error
                self.deliver(future, None, failure)
            elif i + 1 < len(self.parts):
                self._hand(i + 1, y, future)
            else:
                self.deliver(future, y, None)

        self.workers[i].submit(timed, (part, part.forward, (x,)), done)

    def sub_metrics(self) -> dict[str, StageMetrics]:
        return {} if self.inline else super().sub_metrics()
