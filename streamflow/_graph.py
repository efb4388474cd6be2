"""The declarative flow graph: Flow, Stream handles, merge, and build-time validation."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload, runtime_checkable

from ._calls import is_async
from ._channel import _OVERFLOWS, Overflow
from ._devices import parse_device
from ._errors import GraphError
from ._io import Sink, Source, iterate
from ._policy import ErrorPolicy, check_policy
from ._spec import FlowSpec, Kind, StageSpec, choose_loop
from ._stage import Stage

if TYPE_CHECKING:
    from ._describe import FlowDescription
    from ._message import Message
    from ._metrics import StageMetrics
    from ._runtime import RunningFlow

__all__ = ["Composite", "Flow", "Stream", "merge"]

T = TypeVar("T")
U = TypeVar("U")


@runtime_checkable
class Composite(Protocol):
    """What ``stream.map(name, composite)`` accepts besides functions and stages: an object
    that adds its own stages after ``stream`` and returns the stream they end in (a
    pipelined model, an online trainer). Its stages are named ``name``, ``name[0]``, ...

    It receives the map's ``capacity``, ``overflow`` and ``errors``; it chooses device,
    concurrency, order and envelope itself, so ``map`` refuses those options for it.
    """

    def add_stages(
        self,
        stream: Stream[Any],
        name: str,
        *,
        capacity: int,
        overflow: Overflow,
        errors: ErrorPolicy,
    ) -> Stream[Any]: ...


@dataclass(eq=False)
class _Node:
    """One named vertex of the graph as it is being built (see :meth:`Flow.spec` for the
    frozen form the runtime reads)."""

    name: str
    kind: Kind
    fn: Any = None
    inputs: list[_Node] = field(default_factory=list)
    consumers: list[_Node] = field(default_factory=list)
    capacity: int = 16
    overflow: Overflow = "block"
    device: str | None = None
    concurrency: int = 1
    ordered: bool = True
    errors: ErrorPolicy = "fail"
    envelope: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        """What the stage runs: a function's name, a Stage's class name (or its own repr)."""
        fn = self.fn
        if isinstance(fn, Stage):
            return repr(fn) if type(fn).__repr__ is not object.__repr__ else type(fn).__name__
        return _fn_name(fn)

    def spec(self) -> StageSpec:
        """This node, frozen, with its loop strategy chosen."""
        return StageSpec(
            name=self.name,
            kind=self.kind,
            fn=self.fn,
            label=self.label(),
            loop=choose_loop(
                self.kind,
                self.fn,
                device=self.device,
                concurrency=self.concurrency,
                ordered=self.ordered,
                envelope=self.envelope,
            ),
            inputs=tuple(n.name for n in self.inputs),
            consumers=tuple(n.name for n in self.consumers),
            outputs=tuple(n.name for n in _readers(self.consumers)),
            capacity=self.capacity,
            overflow=self.overflow,
            device=self.device,
            concurrency=self.concurrency,
            ordered=self.ordered,
            errors=self.errors,
            envelope=self.envelope,
            options=MappingProxyType(dict(self.options)),
        )


def _readers(consumers: list[_Node]) -> list[_Node]:
    """Consumers with merge junctions replaced by what reads them."""
    out: list[_Node] = []
    for node in consumers:
        if node.kind == "merge":
            out.extend(_readers(node.consumers))
        else:
            out.append(node)
    return out


def _fn_name(fn: Any) -> str:
    if fn is None:
        return ""
    if isinstance(fn, iterate):
        return "iterate"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__name__


class Flow:
    """A named graph of stages. Build it with :meth:`source` and the :class:`Stream` methods,
    then ``await flow.run()`` or ``async with flow.start() as running:``.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise GraphError(f"a flow needs a non-empty name, got {name!r}")
        self.name = name
        self._nodes: dict[str, _Node] = {}
        self._last_metrics: dict[str, StageMetrics] = {}
        self._running = False

    def __repr__(self) -> str:
        return f"<Flow {self.name!r} with {len(self._nodes)} stages>"

    # -- building ----------------------------------------------------------------------

    @overload
    def source(self, name: str, source: Source[Message[T]] | Iterable[Message[T]]) -> Stream[T]: ...

    @overload
    def source(self, name: str, source: Source[T] | Iterable[T]) -> Stream[T]: ...

    def source(self, name: str, source: Source[Any] | Iterable[Any]) -> Stream[Any]:
        """Add a source: an :class:`~streamflow.Source` (any async iterable) or an iterable.

        A source of :class:`~streamflow.Message` envelopes gives a stream of their values (it
        is typed that way too)."""
        if not isinstance(source, AsyncIterable):
            if isinstance(source, Iterable) and not isinstance(source, str | bytes):
                source = iterate(source)
            else:
                hint = (
                    f"; call it: {source.__name__}(...) gives the iterable"
                    if inspect.isfunction(source) or inspect.ismethod(source)
                    else ""
                )
                raise GraphError(
                    f"source {name!r}: expected an async iterable (sf.Source) or an iterable, "
                    f"got {source!r}{hint}"
                )
        return Stream(self, self._add(_Node(name, "source", fn=source)))

    def _add(self, node: _Node) -> _Node:
        if not isinstance(node.name, str) or not node.name:
            raise GraphError(f"a stage needs a non-empty name, got {node.name!r}")
        if node.name in self._nodes:
            raise GraphError(f"flow {self.name!r} already has a stage named {node.name!r}")
        if self._running:
            raise GraphError(f"flow {self.name!r} is running: add stages before starting it")
        self._nodes[node.name] = node
        for upstream in node.inputs:
            upstream.consumers.append(node)
        return node

    # -- running -----------------------------------------------------------------------

    def spec(self) -> FlowSpec:
        """The validated graph, frozen: what the runtime runs (the builder can go on
        changing without affecting it).

        :raises GraphError: the graph is not valid (see :meth:`validate`).
        """
        self.validate()
        return self._freeze()

    def _freeze(self) -> FlowSpec:
        return FlowSpec(self.name, tuple(node.spec() for node in self._nodes.values()))

    def start(self) -> RunningFlow:
        """Start the flow; use as ``async with flow.start() as running:``.

        Leaving the block drains the flow (like ``running.stop(drain=True)``); an error in the
        block stops it without draining.
        """
        from ._runtime import RunningFlow

        return RunningFlow(self.spec(), owner=self)

    def run_starting(self) -> None:
        """Called by the run this flow started, as it starts (one run at a time)."""
        if self._running:
            raise RuntimeError(f"flow {self.name!r} is already running")
        self._running = True

    def run_ended(self, metrics: dict[str, StageMetrics]) -> None:
        """Called by the run this flow started, when it has stopped: its last metrics."""
        self._last_metrics = metrics
        self._running = False

    async def run(self) -> None:
        """Run until every source is exhausted and every item has reached the sinks.

        :raises StageError: a stage with ``errors="fail"`` raised; the flow was stopped.
        """
        async with self.start() as running:
            await running.wait()

    def metrics(self) -> dict[str, StageMetrics]:
        """Per-stage metrics of the last run (empty before the first run)."""
        return dict(self._last_metrics)

    def describe(self) -> FlowDescription:
        """The graph as text (``str(...)``) and as a Mermaid diagram (``.mermaid``), with
        each stage's loop strategy (see :data:`streamflow.LOOPS`)."""
        from ._describe import describe

        return describe(self._freeze())

    # -- validation --------------------------------------------------------------------

    def validate(self) -> None:
        """Check the graph; raise :class:`GraphError` naming what is wrong."""
        nodes = list(self._nodes.values())
        if not any(n.kind == "source" for n in nodes):
            raise GraphError(f"flow {self.name!r} has no source")
        for node in nodes:
            if node.kind != "sink" and not node.consumers:
                raise GraphError(
                    f"stage {node.name!r} of flow {self.name!r} has no consumer: "
                    f"add a stage or a sink after it (every item must end in a sink)"
                )
        cycle = _find_cycle(nodes)
        if cycle:
            raise GraphError(f"flow {self.name!r} has a cycle: {' -> '.join(cycle)}")


def _find_cycle(nodes: list[_Node]) -> list[str] | None:
    state: dict[int, int] = {}  # 1 = on the path, 2 = done
    path: list[_Node] = []

    def visit(node: _Node) -> list[str] | None:
        state[id(node)] = 1
        path.append(node)
        for nxt in node.consumers:
            mark = state.get(id(nxt))
            if mark == 1:
                start = path.index(nxt)
                return [n.name for n in path[start:]] + [nxt.name]
            if mark is None:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[id(node)] = 2
        return None

    for node in nodes:
        if id(node) not in state:
            found = visit(node)
            if found:
                return found
    return None


class Stream(Generic[T]):
    """The output of a stage. Each method adds a stage reading it and returns its output.

    A stream read by several stages is broadcast: each gets every item. Common options:

    - ``capacity``, ``overflow``: the bounded channel in front of the new stage.
    - ``device``: ``None`` (the event loop), ``"cpu"`` (threads of the stage's own,
      ``concurrency`` of them), ``"cpu:N"`` (dedicated worker thread N) or ``"cuda:N"`` (a
      worker thread for GPU N, the stage's own CUDA stream, input tensors moved to the GPU);
      plain ``def`` functions run there.
    - ``concurrency``: items processed at once; results keep input order unless
      ``ordered=False``.
    - ``errors``: ``"fail"``, ``"skip"``, :class:`~streamflow.Retry` or
      :class:`~streamflow.DeadLetter`.
    - ``envelope``: pass the :class:`~streamflow.Message` instead of its value.
    """

    __slots__ = ("_flow", "_node")

    def __init__(self, flow: Flow, node: _Node) -> None:
        self._flow = flow
        self._node = node

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def flow(self) -> Flow:
        return self._flow

    def __repr__(self) -> str:
        return f"<Stream {self._node.name!r} of flow {self._flow.name!r}>"

    def map(
        self,
        name: str,
        fn: Callable[[T], Any] | Stage[T, Any] | Composite,
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        concurrency: int = 1,
        ordered: bool = True,
        errors: ErrorPolicy = "fail",
        envelope: bool = False,
    ) -> Stream[Any]:
        """Apply ``fn`` (``def``, ``async def`` or a :class:`~streamflow.Stage`) to each item.

        ``fn`` may also be a :class:`~streamflow.Composite` such as a
        :func:`~streamflow.pipeline`: it then adds its own stages, named ``name[0]``,
        ``name[1]``, ...; it takes ``capacity``, ``overflow`` and ``errors``, and chooses
        ``device``, ``concurrency``, ``ordered`` and ``envelope`` itself (giving one is a
        :class:`~streamflow.GraphError`).
        """
        if isinstance(fn, Composite):
            given = {
                "device": device is not None,
                "concurrency": concurrency != 1,
                "ordered": ordered is not True,
                "envelope": envelope is not False,
            }
            refused = [option for option, set_ in given.items() if set_]
            if refused:
                raise GraphError(
                    f"stage {name!r}: {type(fn).__name__} adds stages of its own and chooses "
                    f"{', '.join(refused)} itself; it takes only capacity, overflow and errors"
                )
            _check_options(name, "sink", None, capacity, overflow, None, 1, errors)
            return fn.add_stages(self, name, capacity=capacity, overflow=overflow, errors=errors)
        return self._then(
            name, "map", fn, capacity, overflow, device, concurrency, ordered, errors, envelope
        )

    def filter(
        self,
        name: str,
        predicate: Callable[[T], Any],
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        concurrency: int = 1,
        ordered: bool = True,
        errors: ErrorPolicy = "fail",
        envelope: bool = False,
    ) -> Stream[T]:
        """Keep the items for which ``predicate`` is true; the others are acked as filtered."""
        return self._then(
            name,
            "filter",
            predicate,
            capacity,
            overflow,
            device,
            concurrency,
            ordered,
            errors,
            envelope,
        )

    def flat_map(
        self,
        name: str,
        fn: Callable[[T], Any],
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        concurrency: int = 1,
        ordered: bool = True,
        errors: ErrorPolicy = "fail",
        envelope: bool = False,
    ) -> Stream[Any]:
        """Emit every item of ``fn(item)``: an iterable, an async iterable, or an async
        generator. The outputs share the input's ack; none at all acks it as filtered."""
        return self._then(
            name,
            "flat_map",
            fn,
            capacity,
            overflow,
            device,
            concurrency,
            ordered,
            errors,
            envelope,
        )

    def batch(
        self,
        name: str,
        max_size: int,
        max_wait: float,
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
    ) -> Stream[list[T]]:
        """Group items into lists: emit when ``max_size`` items are in, or when the oldest has
        waited ``max_wait`` seconds, or at the end of the stream (a partial batch)."""
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise GraphError(f"stage {name!r}: max_size must be an int >= 1, got {max_size!r}")
        if not isinstance(max_wait, int | float) or max_wait < 0:
            raise GraphError(f"stage {name!r}: max_wait must be seconds >= 0, got {max_wait!r}")
        stream = self._then(name, "batch", None, capacity, overflow, None, 1, True, "fail", False)
        stream._node.options.update(max_size=max_size, max_wait=float(max_wait))
        return stream

    def unbatch(
        self, name: str, *, capacity: int = 16, overflow: Overflow = "block"
    ) -> Stream[Any]:
        """Emit the elements of each list one by one (the inverse of :meth:`batch`).

        When a batch still has as many elements as it was built from, each element gets back
        its own metadata and ack."""
        return self._then(name, "unbatch", None, capacity, overflow, None, 1, True, "fail", False)

    def sink(
        self,
        name: str,
        sink: Sink[T] | Callable[[T], Any],
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        concurrency: int = 1,
        errors: ErrorPolicy = "fail",
        envelope: bool = False,
    ) -> None:
        """End the stream in ``sink``: an :class:`~streamflow.Sink` or a callable. An item
        is acked as delivered when the sink returns."""
        target: Any = sink
        if not callable(target):
            send = getattr(target, "send", None)
            if not callable(send):
                raise GraphError(
                    f"stage {name!r}: a sink must be callable or have send(item), got {sink!r}"
                )
        self._then(
            name, "sink", sink, capacity, overflow, device, concurrency, True, errors, envelope
        )

    def _then(
        self,
        name: str,
        kind: Kind,
        fn: Any,
        capacity: int,
        overflow: Overflow,
        device: str | None,
        concurrency: int,
        ordered: bool,
        errors: ErrorPolicy,
        envelope: bool,
    ) -> Stream[Any]:
        _check_options(name, kind, fn, capacity, overflow, device, concurrency, errors)
        node = _Node(
            name,
            kind,
            fn=fn,
            inputs=[self._node],
            capacity=capacity,
            overflow=overflow,
            device=device,
            concurrency=concurrency,
            ordered=ordered,
            errors=errors,
            envelope=envelope,
        )
        return Stream(self._flow, self._flow._add(node))


def _check_options(
    name: str,
    kind: Kind,
    fn: Any,
    capacity: int,
    overflow: Overflow,
    device: str | None,
    concurrency: int,
    errors: ErrorPolicy,
) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise GraphError(f"stage {name!r}: capacity must be an int >= 1, got {capacity!r}")
    if overflow not in _OVERFLOWS:
        raise GraphError(f"stage {name!r}: overflow must be one of {_OVERFLOWS}, got {overflow!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise GraphError(f"stage {name!r}: concurrency must be an int >= 1, got {concurrency!r}")
    if device is not None:
        try:
            parse_device(device)
        except ValueError as exc:
            raise GraphError(f"stage {name!r}: {exc}") from None
    check_policy(errors, name)
    if kind in ("batch", "unbatch", "sink"):
        return
    if isinstance(fn, Stage):
        if kind != "map":
            raise GraphError(f"stage {name!r}: a Stage instance can only be used with map()")
        return
    if isinstance(fn, type) and issubclass(fn, Stage):
        raise GraphError(
            f"stage {name!r}: got the class {fn.__name__}; pass an instance: {fn.__name__}()"
        )
    if not callable(fn):
        raise GraphError(f"stage {name!r}: {fn!r} is not callable (expected a function or Stage)")
    if device is not None and device != "cpu" and (is_async(fn) or inspect.isasyncgenfunction(fn)):
        raise GraphError(
            f"stage {name!r}: {_fn_name(fn)} is async and would run on the event loop; "
            f"device={device!r} runs plain (sync) functions on a worker thread"
        )


class _Merged(Stream[T]):
    """The output of :func:`merge`; ``add()`` joins one more input stream."""

    __slots__ = ()

    def add(self, stream: Stream[T]) -> _Merged[T]:
        """Join ``stream`` into this merge (rejected if it would close a cycle)."""
        if not isinstance(stream, Stream) or stream._flow is not self._flow:
            raise GraphError(
                f"merge {self.name!r}: can only add streams of flow {self._flow.name!r}"
            )
        node = self._node
        node.inputs.append(stream._node)
        stream._node.consumers.append(node)
        cycle = _find_cycle(list(self._flow._nodes.values()))
        if cycle:
            node.inputs.pop()
            stream._node.consumers.pop()
            raise GraphError(
                f"flow {self._flow.name!r}: merge would create a cycle: {' -> '.join(cycle)}"
            )
        return self


def merge(name: str, *streams: Stream[Any]) -> _Merged[Any]:
    """Fan in: one stream with every item of ``streams``, in arrival order.

    It is a junction, not a task: it adds no hop and has no metrics of its own.
    """
    if not streams:
        raise GraphError(f"merge {name!r}: give at least one stream")
    flows = {id(s._flow) for s in streams if isinstance(s, Stream)}
    if len(flows) != 1 or not all(isinstance(s, Stream) for s in streams):
        raise GraphError(f"merge {name!r}: all inputs must be streams of the same flow")
    flow = streams[0]._flow
    node = flow._add(_Node(name, "merge", inputs=[s._node for s in streams]))
    return _Merged(flow, node)
