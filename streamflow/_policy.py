"""What a stage does when its function raises on an item."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DeadLetter", "ErrorPolicy", "FailedItem", "PartialFailure", "Retry"]


@dataclass(frozen=True, slots=True)
class FailedItem:
    """What a dead-letter sink receives: the item, where and why it failed."""

    flow: str
    stage: str
    item: Any
    meta: Any
    error: BaseException
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Send items that fail to ``sink`` as :class:`FailedItem`, then go on.

    ``sink`` is a callable taking the :class:`FailedItem` (an ``async def``, or a plain
    function that returns quickly: it runs on the event loop, e.g. ``failures.append``) or an
    object with ``send(item)``; this is checked when the flow is built. The item is acked as
    ``Outcome.DEAD_LETTERED`` once the sink returned. If the dead-letter sink itself raises,
    the flow fails.
    """

    sink: Any

    async def deliver(self, failed: FailedItem) -> None:
        """Hand ``failed`` to the sink; an awaitable it returns is awaited."""
        result = _target(self.sink)(failed)
        if inspect.isawaitable(result):
            await result


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failing item up to ``attempts`` times in all, waiting ``backoff * 2**n`` s.

    When every attempt failed, ``then`` decides: ``"fail"`` (default), ``"skip"`` or a
    :class:`DeadLetter`. Only exceptions of the types in ``on`` are retried.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 10.0
    then: Literal["fail", "skip"] | DeadLetter = "fail"
    on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("Retry.backoff and max_backoff must be >= 0")
        if isinstance(self.then, Retry) or (
            not isinstance(self.then, DeadLetter) and self.then not in ("fail", "skip")
        ):
            raise ValueError(
                f"Retry.then must be 'fail', 'skip' or a DeadLetter, got {self.then!r}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


class PartialFailure(Exception):
    """Raised by a stage function that takes a list when some of its elements failed.

    ``results``: the outputs for the elements that did not fail, in order (what the function
    would have returned); ``errors``: the exception of each failed element, by its index in
    the input list. The stage goes on with ``results`` and applies its error policy to each
    failed element on its own: ``"skip"`` counts and logs it, a :class:`DeadLetter` receives
    it as a :class:`FailedItem` of its own, ``"fail"`` fails the flow naming the element.
    A :class:`Retry` does not retry partial failures (the other elements already ran); its
    ``then`` applies. When the list came from ``batch``, each failed element's own source
    item is acknowledged as skipped or dead-lettered at once. Use it in ``map``,
    ``flat_map`` and ``sink`` stages::

        def decode_all(raws: list[bytes]) -> list[Any]:
            out, errors = [], {}
            for i, raw in enumerate(raws):
                try:
                    out.append(json.loads(raw))
                except ValueError as exc:
                    errors[i] = exc
            if errors:
                raise sf.PartialFailure(out, errors)
            return out
    """

    def __init__(self, results: Any, errors: Mapping[int, BaseException]) -> None:
        if not errors:
            raise ValueError("PartialFailure needs at least one failed element in errors")
        self.results = results
        self.errors = dict(errors)
        first = min(self.errors)
        super().__init__(
            f"{len(self.errors)} element(s) failed, first at index {first}: "
            f"{type(self.errors[first]).__name__}: {self.errors[first]}"
        )


ErrorPolicy = Literal["fail", "skip"] | Retry | DeadLetter
"""``"fail"`` stops the flow; ``"skip"`` logs, counts and goes on; or a Retry / DeadLetter."""


def check_policy(policy: object, stage: str) -> None:
    from ._errors import GraphError

    if policy in ("fail", "skip") or isinstance(policy, Retry | DeadLetter):
        if isinstance(policy, DeadLetter):
            _check_sink(policy.sink, stage)
        if isinstance(policy, Retry) and isinstance(policy.then, DeadLetter):
            _check_sink(policy.then.sink, stage)
        return
    raise GraphError(
        f"stage {stage!r}: errors must be 'fail', 'skip', sf.Retry(...) or sf.DeadLetter(sink), "
        f"got {policy!r}"
    )


def _check_sink(sink: object, stage: str) -> None:
    """The sink must take one argument: as a callable, or through its ``send`` method."""
    from ._errors import GraphError

    target = _target(sink)
    if not callable(target):
        raise GraphError(
            f"stage {stage!r}: the dead-letter sink must be a callable or have send(), got {sink!r}"
        )
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        raise GraphError(
            f"stage {stage!r}: the dead-letter sink {sink!r} must take one argument (the "
            f"sf.FailedItem), but its signature is {signature}: {exc}"
        ) from None


def _target(sink: Any) -> Any:
    """What a dead-letter sink is called through: itself, or its ``send`` method."""
    return sink if callable(sink) else getattr(sink, "send", None)
