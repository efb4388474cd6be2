"""A stage's error policy, built once when the flow is wired: what happens to an item whose
call raised (retry with the stage's own call, skip, dead-letter or fail)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._errors import StageError, describe_item
from ._logging import get_logger
from ._message import DEAD_LETTERED, SKIPPED, Message, _AckGroup
from ._metrics import Counters
from ._policy import DeadLetter, ErrorPolicy, FailedItem, PartialFailure, Retry

__all__ = ["Recovery"]

log = get_logger("streamflow")


class Recovery:
    """``await recovery(msg, exc)``: ``(True, result)`` when a retry worked, ``(False, None)``
    when the item was skipped or dead-lettered (and acked so); raises :class:`StageError`
    to fail the flow. ``call`` is the stage's own call, so a retry runs exactly as the
    first attempt did (same thread, same device placement)."""

    def __init__(
        self,
        flow: str,
        stage: str,
        kind: str,
        policy: ErrorPolicy,
        call: Callable[[Any], Awaitable[Any]],
        counters: Counters,
        *,
        envelope: bool,
    ) -> None:
        self.flow = flow
        self.stage = stage
        self.kind = kind
        self.retry = policy if isinstance(policy, Retry) else None
        self.final: Any = policy.then if isinstance(policy, Retry) else policy
        self.call = call
        self.c = counters
        self.envelope = envelope

    async def __call__(self, msg: Message[Any], exc: Exception) -> tuple[bool, Any]:
        if isinstance(exc, PartialFailure):
            return await self._elements(msg, exc)
        c = self.c
        c.errors += 1
        attempts = 1
        retry = self.retry
        if retry is not None:
            while attempts < retry.attempts and isinstance(exc, retry.on):
                delay = retry.delay(attempts)
                log.info(
                    "stage.retry",
                    flow=self.flow,
                    stage=self.stage,
                    attempt=attempts,
                    delay_s=delay,
                    item=describe_item(msg.value),
                    error=repr(exc),
                )
                await anyio.sleep(delay)
                attempts += 1
                c.retries += 1
                try:
                    return True, await self.call(msg if self.envelope else msg.value)
                except Exception as again:
                    c.errors += 1
                    exc = again
        outcome = await self._give_up(msg.value, msg.meta, exc, attempts)
        msg._done(outcome)
        return False, None

    async def _give_up(
        self, item: Any, meta: Any, exc: BaseException, attempts: int, **extra: Any
    ) -> int:
        """Apply the final policy to one failed item: the outcome to ack it with."""
        policy = self.final
        if policy == "fail":
            raise StageError(self.stage, item, exc, flow=self.flow, meta=meta) from exc
        if policy == "skip":
            self.c.skipped += 1
            outcome, name = SKIPPED, "skip"
        else:
            assert isinstance(policy, DeadLetter)
            await policy.deliver(FailedItem(self.flow, self.stage, item, meta, exc, attempts))
            outcome, name = DEAD_LETTERED, "dead_letter"
        log.warning(
            "stage.error",
            flow=self.flow,
            stage=self.stage,
            policy=name,
            item=describe_item(item),
            meta=meta,
            attempts=attempts,
            error=repr(exc),
            **extra,
        )
        return outcome

    async def _elements(self, msg: Message[Any], exc: PartialFailure) -> tuple[bool, Any]:
        """Apply the policy to each failed element of a list item, then go on with the
        results of the others. A member of a ``batch`` is acknowledged on its own. A
        :class:`Retry` does not retry elements (the others already ran): its ``then``
        applies."""
        items = msg.value
        misuse: Exception | None = None
        if self.kind == "filter" or not isinstance(items, list | tuple):
            why = (
                "a filter"
                if self.kind == "filter"
                else f"an item of type {type(items).__name__}, not a list"
            )
            misuse = TypeError(f"PartialFailure was raised by {why}: it is for stages on lists")
        elif bad := [i for i in exc.errors if not (isinstance(i, int) and 0 <= i < len(items))]:
            misuse = IndexError(f"PartialFailure names {bad!r}, the list has {len(items)} elements")
        if misuse is not None:
            raise StageError(self.stage, items, misuse, flow=self.flow, meta=msg.meta) from exc
        group = msg._ack
        members = (
            group.members
            if isinstance(group, _AckGroup)
            and group.pending == 1
            and len(group.members) == len(items)
            else None
        )
        outcome = 0
        for index in sorted(exc.errors):
            self.c.errors += 1
            meta = members[index].meta if members is not None else msg.meta
            done = await self._give_up(items[index], meta, exc.errors[index], 1, index=index)
            if members is not None:
                members[index]._done(done)
            outcome |= done
        if members is not None:
            assert isinstance(group, _AckGroup)
            group.members = [m for i, m in enumerate(members) if i not in exc.errors]
        elif group is not None:
            group.outcome |= outcome  # the source item was partly skipped or dead-lettered
        if len(exc.errors) == len(items):  # nothing left to go on with
            msg._done(0)
            return False, None
        return True, exc.results
