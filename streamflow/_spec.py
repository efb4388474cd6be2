"""The frozen description of a flow: what the builder hands the runtime.

:class:`Flow` (the builder) produces a :class:`FlowSpec`; the runtime reads it and never
writes back, and nothing in the runtime imports the builder. Each stage's loop strategy is
chosen here, once, from what the stage is (see :func:`choose_loop`), so ``flow.describe()``
can show it before the flow runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._calls import is_async
from ._channel import Overflow
from ._checkpoints import Checkpoints
from ._policy import ErrorPolicy
from ._stage import Stage

__all__ = ["LOOPS", "FlowSpec", "Kind", "Loop", "StageSpec", "choose_loop", "sends_runs"]

Kind = Literal[
    "source", "map", "key_by", "filter", "flat_map", "batch", "unbatch", "window", "sink", "merge"
]

Loop = Literal[
    "source",
    "inline",
    "worker",
    "window",
    "tasks",
    "runs",
    "batch",
    "unbatch",
    "windows",
    "fused",
    "junction",
]
LOOPS: Mapping[str, str] = {
    "source": "pulls items from the source, a run of them at a time when it has them",
    "inline": "calls the function on the event loop, over each run of queued items",
    "worker": "sends each run of queued items to the stage's worker thread as one job",
    "window": "starts up to `concurrency` calls that return futures, results in order",
    "tasks": "runs up to `concurrency` items at once, one task each (one per key at a time "
    "on a keyed stream)",
    "runs": "hands each run of queued items to the sink's send_run, up to `concurrency` items "
    "in flight",
    "batch": "groups items into lists by size and wait",
    "unbatch": "splits lists back into their items",
    "windows": "holds items in windows per key and emits each window when it closes",
    "fused": "runs inside the stage it alone feeds (a key_by before its window): no hop",
    "junction": "a merge: no task, its inputs feed its readers directly",
}
"""Every loop strategy, with what it does (the names ``flow.describe()`` shows)."""


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage as the runtime runs it.

    ``outputs`` are the stages that read this one's items, merges resolved to what reads
    them; ``consumers`` the direct ones (merges included), for describing the graph.
    ``keyed``: the stage reads a keyed stream (its items carry ``Message.key``): with
    ``concurrency > 1`` it never runs two items of one key at once.
    """

    name: str
    kind: Kind
    fn: Any
    label: str
    loop: Loop
    inputs: tuple[str, ...]
    consumers: tuple[str, ...]
    outputs: tuple[str, ...]
    capacity: int = 16
    overflow: Overflow = "block"
    device: str | None = None
    concurrency: int = 1
    ordered: bool = True
    errors: ErrorPolicy = "fail"
    envelope: bool = False
    options: Mapping[str, Any] | None = None
    keyed: bool = False

    @property
    def has_inbox(self) -> bool:
        """Whether the stage reads a channel of its own (sources and merges do not)."""
        return self.kind not in ("source", "merge")


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A validated flow graph: its name, its stages in the order they were added, and how
    it is checkpointed (``None``: not at all)."""

    name: str
    stages: tuple[StageSpec, ...]
    checkpoints: Checkpoints | None = None

    def __getitem__(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def called(kind: Kind, fn: Any) -> Any:
    """The callable a stage calls per item: a Stage's ``process``, a sink object's ``send``."""
    if isinstance(fn, Stage):
        return fn.process
    if kind == "sink" and not callable(fn):
        return fn.send
    return fn


def sends_runs(fn: Any) -> bool:
    """Whether a sink object takes runs: ``async send_run(items) -> list[error or None]``
    (see :class:`~streamflow.Sink`)."""
    return not callable(fn) and is_async(getattr(fn, "send_run", None))


def choose_loop(
    kind: Kind,
    fn: Any,
    *,
    device: str | None,
    concurrency: int,
    ordered: bool,
    envelope: bool,
) -> Loop:
    """The loop strategy for a stage (one place decides it; see :data:`LOOPS`)."""
    if kind in ("source", "batch", "unbatch"):
        return kind
    if kind == "window":
        return "windows"
    if kind == "merge":
        return "junction"
    call = called(kind, fn)
    if kind == "sink" and device is None and not envelope and sends_runs(fn):
        return "runs"
    on_loop = is_async(call) or inspect.isasyncgenfunction(call) or device is None
    if concurrency > 1:
        windowed = kind == "map" and ordered and device is None and not envelope
        return "window" if windowed and not is_async(call) else "tasks"
    return "inline" if on_loop else "worker"
