"""The declarative flow graph: Flow, Stream handles, merge, and build-time validation."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    overload,
    runtime_checkable,
)

from ._calls import is_async
from ._channel import _OVERFLOWS, Overflow
from ._checkpoints import Checkpoints
from ._devices import parse_device
from ._errors import GraphError
from ._io import Sink, Source, iterate
from ._policy import DeadLetter, ErrorPolicy, Retry, check_policy
from ._spec import FlowSpec, Kind, StageSpec, choose_loop
from ._stage import Stage
from ._state import StatefulMap
from ._windows import Count, Session, Sliding, Tumbling, Window, Windower

if TYPE_CHECKING:
    from ._describe import FlowDescription
    from ._message import Message
    from ._metrics import StageMetrics
    from ._runtime import RunningFlow

__all__ = ["Composite", "Flow", "KeyedStream", "Stream", "merge"]

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
    keyed: bool = False  # emits a keyed stream (see Stream.key_by)

    def label(self) -> str:
        """What the stage runs: a function's name, a Stage's class name (or its own repr)."""
        fn = self.fn
        if self.kind == "window":
            o = self.options
            clock = (
                "processing time"
                if o["time"] is None
                else f"event time, lateness {o['lateness']:g}s"
            )
            return f"{o['shape']!r} {clock}" + (" aggregate" if o["aggregate"] else "")
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
            loop="fused"
            if _fused(self)
            else choose_loop(
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
            options=MappingProxyType(
                {**self.options, "sources": _sources_of(self), "key": _fused_key(self)}
                if self.kind == "window"
                else dict(self.options)
            ),
            keyed=bool(self.inputs) and all(n.keyed for n in self.inputs),
        )


def _fused(node: _Node) -> bool:
    """A ``key_by`` that alone feeds a window stage, with nothing of its own to run (on the
    loop, one item at a time, failing the flow on error): the window stage calls its key
    function itself, and the hop between them goes."""
    if node.kind != "key_by" or len(node.consumers) != 1:
        return False
    window = node.consumers[0]
    return (
        window.kind == "window"
        and len(window.inputs) == 1
        and node.device is None
        and node.concurrency == 1
        and node.errors == "fail"
        and not node.envelope
        and not is_async(node.fn)
        and not inspect.isasyncgenfunction(node.fn)
    )


def _fused_key(window: _Node) -> tuple[str, Any] | None:
    """The fused ``key_by`` before ``window``: its name and key function, or ``None``."""
    if len(window.inputs) == 1 and _fused(window.inputs[0]):
        return window.inputs[0].name, window.inputs[0].fn
    return None


def _sources_of(node: _Node) -> tuple[str, ...]:
    """The names of the sources upstream of ``node``, in the order they were added."""
    found: dict[str, None] = {}
    stack, seen = list(node.inputs), set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.kind == "source":
            found[n.name] = None
        stack.extend(n.inputs)
    return tuple(sorted(found))


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

    ``checkpoints``: a :class:`~streamflow.Checkpoints` to checkpoint what the flow learned
    together with its sources' positions, and to restore the newest checkpoint on start
    (see docs/RECOVERY.md). It can also be set later, as the attribute, before a run.
    """

    def __init__(self, name: str, *, checkpoints: Checkpoints | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise GraphError(f"a flow needs a non-empty name, got {name!r}")
        if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
            raise GraphError(
                f"flow {name!r}: checkpoints must be an sf.Checkpoints, got {checkpoints!r}"
            )
        self.name = name
        self.checkpoints = checkpoints
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
        stages = tuple(node.spec() for node in self._nodes.values())
        return FlowSpec(self.name, stages, self.checkpoints)

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

    async def run(self, *, stop_on_signals: bool = False, drain_timeout: float = 30.0) -> None:
        """Run until every source is exhausted and every item has reached the sinks.

        ``stop_on_signals=True``, for a process that runs the flow itself (main thread): the
        first SIGINT or SIGTERM stops the sources and drains (in-flight items reach the
        sinks, sources commit, connectors close), then ``run`` returns normally; a second
        signal, or ``drain_timeout`` seconds, stops at once. The previous signal handlers
        are restored afterwards.

        :raises StageError: a stage with ``errors="fail"`` raised; the flow was stopped.
        :raises Interrupted: stopped at once by a second signal or the drain timeout
            (``exit_code`` is 130 for SIGINT, 143 for SIGTERM).
        """
        async with self.start() as running:
            await running.wait(stop_on_signals=stop_on_signals, drain_timeout=drain_timeout)

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

    def key_by(
        self,
        name: str,
        key: Callable[[T], Any],
        *,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        errors: ErrorPolicy = "fail",
    ) -> KeyedStream[T]:
        """A keyed stream: each item keeps its value and gets ``key(item)`` as its key (a
        hashable; ``Message.key``). The stages after it keep each key's items in order
        (``map(..., concurrency=k)`` runs different keys at once, never two items of one
        key), and offer :meth:`KeyedStream.stateful_map` and :meth:`KeyedStream.window`.
        ``batch`` and ``merge`` give back an unkeyed stream."""
        stream = self._then(name, "key_by", key, capacity, overflow, device, 1, True, errors, False)
        assert isinstance(stream, KeyedStream)
        return stream

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
        added = self._flow._add(node)
        if kind in ("key_by", "window") or (
            self._node.keyed and kind in ("map", "filter", "flat_map")
        ):
            added.keyed = True  # its items keep their keys: its readers see a keyed stream
            return KeyedStream(self._flow, added)
        return Stream(self._flow, added)


class KeyedStream(Stream[T]):
    """A stream whose items carry a key (see :meth:`Stream.key_by`): per-key state and
    windows. ``map``, ``filter`` and ``flat_map`` keep it keyed."""

    __slots__ = ()

    def stateful_map(
        self,
        name: str,
        fn: Callable[[Any, T], tuple[Any, Any]],
        *,
        ttl: float | None = None,
        capacity: int = 16,
        overflow: Overflow = "block",
        device: str | None = None,
        errors: ErrorPolicy = "fail",
    ) -> KeyedStream[Any]:
        """``fn(state, item) -> (state, output)`` per item, ``state`` being its key's state
        (``None`` the first time); returning ``None`` as the state forgets the key. Each
        output goes on with the item's key and ack (acked when it is delivered). One item
        at a time, in order; a plain ``def`` may run on ``device``. ``ttl`` (seconds of
        processing time) forgets keys left idle that long. A call that raises changes no
        state and follows ``errors``. Metrics: ``state["keys"]``, ``state["expired"]``."""
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0
        ):
            raise GraphError(f"stage {name!r}: ttl must be seconds > 0 or None, got {ttl!r}")
        if not callable(fn) or is_async(fn):
            raise GraphError(
                f"stage {name!r}: stateful_map takes a plain function "
                f"fn(state, item) -> (state, output), got {fn!r}"
            )
        stage = StatefulMap(fn, None if ttl is None else float(ttl))
        stream = self._then(name, "map", stage, capacity, overflow, device, 1, True, errors, True)
        assert isinstance(stream, KeyedStream)
        return stream

    def window(
        self,
        name: str,
        shape: Windower,
        *,
        time: Callable[[T], float] | None = None,
        lateness: float = 0.0,
        late: Literal["drop", "emit"] | DeadLetter = "drop",
        aggregate: tuple[Callable[[], Any], Callable[[Any, T], Any]]
        | tuple[Callable[[], Any], Callable[[Any, T], Any], Callable[[Any, Any], Any]]
        | None = None,
        idle: float = 5.0,
        capacity: int = 256,
        overflow: Overflow = "block",
        errors: Literal["fail", "skip"] | DeadLetter = "fail",
    ) -> KeyedStream[Window[T]]:
        """Group each key's items into windows (:class:`Tumbling`, :class:`Sliding`,
        :class:`Session`, :class:`Count`); emit each as a :class:`Window` once it closes.

        ``time(item)``: event time in seconds (omit it for processing time). A window
        closes when the watermark (the latest event time seen minus ``lateness``, the
        smallest over the stage's inputs that sent within ``idle`` seconds) passes its end,
        and at the end of the stream (or ``stop(drain=True)``). An item whose windows all
        closed is late: ``late="drop"`` acks it as ``Outcome.LATE``, ``"emit"`` emits an
        update ``Window(..., late=True)`` holding it, a :class:`DeadLetter` gets it with a
        ``LateItem`` error. ``aggregate=(init, add)`` (and ``merge`` for sessions) keeps
        ``add(acc, item)`` per window instead of the items (``Window.value``). The window
        holds its items' acks until it is handled downstream, so a source commits past an
        item only once every window holding it was delivered. ``errors`` applies to an
        item whose ``time`` or ``add`` raised. Emitted in order of window end per key.
        ``capacity`` is 256 by default: the stage holds its items in windows anyway, and a
        deep inbox lets it take them in long runs (a ``key_by`` that alone feeds it runs
        inside it, reading through an inbox of the larger of the two capacities).
        Metrics: ``state["keys"|"windows_open"|"items_held"|"late"]``."""
        if not isinstance(shape, Tumbling | Sliding | Session | Count):
            raise GraphError(
                f"stage {name!r}: the window shape must be sf.Tumbling, sf.Sliding, "
                f"sf.Session or sf.Count, got {shape!r}"
            )
        if time is not None and not callable(time):
            raise GraphError(f"stage {name!r}: time must be a function item -> seconds")
        for what, value in (("lateness", lateness), ("idle", idle)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise GraphError(f"stage {name!r}: {what} must be seconds >= 0, got {value!r}")
        if not (late in ("drop", "emit") or isinstance(late, DeadLetter)):
            raise GraphError(
                f"stage {name!r}: late must be 'drop', 'emit' or a DeadLetter, got {late!r}"
            )
        if isinstance(errors, Retry):
            raise GraphError(
                f"stage {name!r}: a window stage takes errors='fail', 'skip' or a DeadLetter "
                "(its functions are pure: a retry would give the same answer)"
            )
        agg = _check_aggregate(name, shape, aggregate)
        if isinstance(late, DeadLetter):
            check_policy(late, name)
        stream = self._then(name, "window", None, capacity, overflow, None, 1, True, errors, False)
        stream._node.options.update(
            shape=shape,
            time=time,
            lateness=float(lateness),
            late=late,
            aggregate=agg,
            idle=float(idle),
        )
        assert isinstance(stream, KeyedStream)
        return stream


def _check_aggregate(name: str, shape: Windower, aggregate: Any) -> tuple[Any, Any, Any] | None:
    if aggregate is None:
        return None
    if not isinstance(aggregate, tuple) or len(aggregate) not in (2, 3):
        raise GraphError(
            f"stage {name!r}: aggregate must be (init, add) or (init, add, merge), "
            f"got {aggregate!r}"
        )
    if not all(callable(f) for f in aggregate):
        raise GraphError(f"stage {name!r}: every function of aggregate must be callable")
    merge_fn = aggregate[2] if len(aggregate) == 3 else None
    if isinstance(shape, Session) and merge_fn is None:
        raise GraphError(
            f"stage {name!r}: session windows merge, so aggregate needs (init, add, merge)"
        )
    return aggregate[0], aggregate[1], merge_fn


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
    if kind in ("batch", "unbatch", "window", "sink"):
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
