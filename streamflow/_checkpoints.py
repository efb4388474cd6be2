"""What a user configures to checkpoint a flow, and what participants are handed.

A flow built with ``Flow(name, checkpoints=Checkpoints(path, every=5.0, keep=3))`` takes
a consistent checkpoint every ``every`` seconds and restores the newest complete one when
it starts. The participants (sources, ``sf.Stage`` objects, sinks, and the runtime's own
keyed state and windows) take part through the small :class:`Snapshotting` protocol; see
docs/RECOVERY.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._checkpoint_store import DirectoryStore

__all__ = ["CheckpointError", "CheckpointInfo", "Checkpoints", "Snapshotting", "participant_of"]


class CheckpointError(Exception):
    """A checkpoint cannot be taken or restored: it was taken of another graph (the message
    names the difference), a state cannot be stored or restored, or a participant failed
    to commit. The flow fails with it (as the ``cause`` of a ``StageError`` in phase
    ``"checkpoint"``) rather than run with what it learned lost or doubled. ``stage``
    names the stage when one is to blame."""

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A durable checkpoint, as handed to a participant's ``commit``: its ``number``, the
    participant's own ``state`` (what its ``snapshot`` returned), and every source's
    position by source stage name (a transactional sink commits them with its output)."""

    number: int
    state: Any
    positions: Mapping[str, Any]


@runtime_checkable
class Snapshotting(Protocol):
    """A participant in checkpoints: a source, an ``sf.Stage`` or a sink object.

    ``snapshot()`` (plain or ``async``) is called on the event loop at a checkpoint, while
    the flow is quiet: the sources are paused and no item is inside any stage. It returns a
    copy of the state (JSON types, ``bytes``, tuples, tensors; no arbitrary objects): it
    must not change after it is returned. A source returns its position: where the item
    after the last one it handed out is.

    ``restore(state)`` (plain or ``async``) is called once, before the first item: a stage
    or sink after its ``setup``/``__aenter__``, with what its ``snapshot`` returned in the
    checkpoint being restored (not called when that checkpoint holds nothing for it). A
    source is always called when the flow runs with checkpoints, with its position or
    ``None`` (no checkpoint yet): it then reads from there, and commits positions only
    through ``commit``.

    ``commit(info)`` (optional, plain or ``async``) is called once the checkpoint is
    durable, with a :class:`CheckpointInfo`. Sources commit their position to their broker
    there. A sink with ``transactional = True`` commits its output there: the flow keeps
    its sources paused until it returned, and on restart asks every source with an
    ``is_committed(position)`` method which checkpoint's positions the broker holds.
    """

    def snapshot(self) -> Any: ...

    def restore(self, state: Any) -> Any: ...


class Checkpoints:
    """Checkpoint a flow every ``every`` seconds into ``path`` (a directory, or a store
    with ``write``/``candidates``, see :class:`~streamflow._checkpoint_store.DirectoryStore`),
    keeping the newest ``keep``. ``timeout``: a checkpoint whose flow does not become quiet
    within this many seconds is skipped with a warning (the sources resume).

    On start the flow restores the newest complete checkpoint, skipping torn or corrupt
    ones with a warning, and refuses (:class:`CheckpointError`) one taken of another graph.
    A flow that drains (end of its sources, ``stop(drain=True)``, a signal) takes a last
    checkpoint after its sinks have everything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | DirectoryStore,
        *,
        every: float = 5.0,
        keep: int = 3,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
            raise ValueError(f"every must be a number of seconds > 0, got {every!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.store = path if isinstance(path, DirectoryStore) else DirectoryStore(path, keep)
        self.every = float(every)
        self.timeout = float(timeout)

    @property
    def keep(self) -> int:
        return self.store.keep

    def __repr__(self) -> str:
        return f"Checkpoints({str(self.store.path)!r}, every={self.every}, keep={self.keep})"


def participant_of(obj: Any) -> Any:
    """``obj`` if it takes part in checkpoints (``snapshot`` and ``restore``), else None."""
    if callable(getattr(obj, "snapshot", None)) and callable(getattr(obj, "restore", None)):
        return obj
    return None
