"""Class stages with a life cycle."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ._devices import WorkerPool
    from ._metrics import StageMetrics

__all__ = ["Stage"]

In = TypeVar("In")
Out = TypeVar("Out")


class Stage(Generic[In, Out]):
    """A stage with state and a life cycle; use it as ``stream.map("name", MyStage())``.

    ``setup()`` runs once before the first item, ``process(item)`` once per item, and
    ``teardown()`` once after the stage's last item, also when the flow fails or is
    cancelled. Each may be ``async def`` (runs on the event loop) or a plain ``def`` (runs on
    the stage's device worker, or on the loop when ``device=None``). ``self.device`` holds the
    stage's device string while it runs.
    """

    device: str | None = None
    _workers: WorkerPool | None = None  # the running flow's device workers (set by the runtime)

    def setup(self) -> Any:
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
