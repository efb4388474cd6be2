"""Exceptions raised by streamflow."""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["ChannelClosed", "ChannelFull", "GraphError", "StageError", "describe_item"]

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = 6
_repr.maxdict = 6


def describe_item(item: Any) -> str:
    """A short, safe description of an item for error messages and logs.

    Tensors and arrays are described by shape and dtype, never by their values; so are a
    short tuple holding them (element by element) and a list of them (a batch: its length
    and first element).
    """
    shape = getattr(item, "shape", None)
    dtype = getattr(item, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(item).__name__}(shape={list(shape)}, dtype={dtype})"
    if isinstance(item, tuple) and 0 < len(item) <= 4 and any(hasattr(i, "shape") for i in item):
        return "(" + ", ".join(describe_item(i) for i in item) + ")"  # e.g. an (x, y) pair
    if isinstance(item, list | tuple) and item and hasattr(item[0], "shape"):  # a batch
        return f"{type(item).__name__} of {len(item)}, the first {describe_item(item[0])}"
    try:
        return _repr.repr(item)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(item).__name__}>"


class GraphError(ValueError):
    """The flow graph is not valid (raised when the flow is built or started)."""


class ChannelClosed(Exception):
    """The channel was closed: no more items can be sent."""


class ChannelFull(Exception):
    """A channel with ``overflow="error"`` was full when an item was sent."""


class StageError(Exception):
    """A stage failed on an item, or outside any item (``phase``: ``"setup"``,
    ``"teardown"``, or ``"run"`` for a source that broke or a stage's own bug).

    Attributes name the flow, the stage, a short description of the item (``None`` when
    the failure was not about an item) and its metadata, and the phase; the original
    exception is ``__cause__`` (and ``cause``). ``also`` lists the failures of other stages
    that came while the flow was stopping for this one (each is named in a note, too).
    """

    def __init__(
        self,
        stage: str,
        item: Any,
        cause: BaseException,
        *,
        flow: str | None = None,
        meta: Any = None,
        phase: str | None = None,
    ) -> None:
        self.stage = stage
        self.flow = flow
        self.phase = phase
        self.item = None if phase is not None else describe_item(item)
        self.meta = meta
        self.cause = cause
        where = f"stage {stage!r}" if flow is None else f"stage {stage!r} of flow {flow!r}"
        if phase is None:
            text = f"{where} failed on item {self.item}"
        elif phase == "run":
            text = f"{where} failed"
        else:
            text = f"{where} failed in {phase}"
        if meta:
            text += f" (meta {describe_item(meta)})"
        text += f": {type(cause).__name__}: {cause}"
        super().__init__(text)
        self.__cause__ = cause
        self.also: list[StageError] = []

    def attach(self, other: StageError) -> None:
        """Record ``other``, a failure that came while the flow stopped for this one."""
        self.also.append(other)
        self.add_note(f"also failed: {other}")
