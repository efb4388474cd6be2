"""What a dead-letter sink writes for a failed item: the raw bytes and the reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from streamflow import FailedItem

from ._record import DecodeError, Record

__all__ = ["DeadLetterEntry", "dead_letter_entry"]


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """A failed item flattened for storage: ``raw`` bytes as received (``None`` for a Kafka
    tombstone; or the item encoded as JSON, else its ``repr``), and text fields saying where
    and why it failed."""

    raw: bytes | None
    reason: str
    flow: str
    stage: str
    source: str | None
    position: dict[str, Any]
    attempts: int
    key: bytes | None = None

    def fields(self) -> dict[str, str]:
        """The text fields (everything but ``raw`` and ``key``), e.g. for Kafka headers."""
        out = {"reason": self.reason, "flow": self.flow, "stage": self.stage}
        if self.source is not None:
            out["source"] = self.source
        if self.position:
            out["position"] = json.dumps(self.position, default=str, separators=(",", ":"))
        out["attempts"] = str(self.attempts)
        return out


def dead_letter_entry(failed: FailedItem) -> DeadLetterEntry:
    """Flatten a :class:`streamflow.FailedItem` (what ``sf.DeadLetter`` sinks receive)."""
    item, error = failed.item, failed.error
    reason = error.reason if isinstance(error, DecodeError) else f"{type(error).__name__}: {error}"
    if isinstance(item, Record):
        return DeadLetterEntry(
            None if item.raw is None else bytes(item.raw),
            reason,
            failed.flow,
            failed.stage,
            item.source,
            dict(item.position),
            failed.attempts,
            item.key,
        )
    meta = failed.meta if isinstance(failed.meta, dict) else {}
    source = meta.get("source")
    position = {k: v for k, v in meta.items() if k != "source"}
    return DeadLetterEntry(
        _raw(item), reason, failed.flow, failed.stage, source, position, failed.attempts
    )


def _raw(item: Any) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    try:
        return json.dumps(item, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return repr(item).encode()
