"""Class stages with a life cycle, and the context the runtime hands them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ._devices import Worker, WorkerPool
    from ._metrics import StageMetrics

__all__ = ["Stage", "StageContext"]

In = TypeVar("In")
Out = TypeVar("Out")


class StageContext:
    """What the running flow gives a stage in ``setup(context)``: the flow's and the
    stage's names, the stage's ``device``, and the flow's device workers.

    ``context.worker("cpu:1")`` is the flow's worker thread for that device (the same one
    every stage pinned there shares; ``await worker.run(fn, *args)`` runs ``fn`` on it). A
    worker named ``"<device>/<anything>"`` is a thread of its own. Workers live until the
    flow has stopped.
    """

    __slots__ = ("_pool", "device", "flow", "stage")

    def __init__(self, flow: str, stage: str, device: str | None, pool: WorkerPool) -> None:
        self.flow = flow
        self.stage = stage
        self.device = device
        self._pool = pool

    def worker(self, name: str) -> Worker:
        """The flow's worker thread called ``name`` (created on first use)."""
        return self._pool.get(name)

    def __repr__(self) -> str:
        return f"StageContext(flow={self.flow!r}, stage={self.stage!r}, device={self.device!r})"


class Stage(Generic[In, Out]):
    """A stage with state and a life cycle; use it as ``stream.map("name", MyStage())``.

    ``setup(context)`` runs once before the first item (``context`` is a
    :class:`StageContext`; a ``setup(self)`` without it is called without), ``process(item)``
    once per item, and ``teardown()`` once after the stage's last item, also when the flow
    fails or is cancelled. Each may be ``async def`` (runs on the event loop) or a plain
    ``def`` (runs on the stage's device worker, or on the loop when ``device=None``).
    """

    def setup(self, context: StageContext) -> Any:
        """Prepare (load a model, open a client). Called before the first item."""
        return None

    def process(self, item: In) -> Any:
        """Turn one item into one result."""
        raise NotImplementedError(f"{type(self).__name__}.process is not implemented")

    def teardown(self) -> Any:
        """Release what ``setup`` took. Called after the last item, even on failure."""
        return None

    def sub_metrics(self) -> Mapping[str, StageMetrics]:
        """Metrics of parts this stage runs itself (a pipelined model's parts), by name;
        they appear in the flow's metrics next to the stage."""
        return {}
