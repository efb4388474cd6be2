"""The raw record every source yields, and the decode step that meets the error policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import streamflow as sf

from ._badrecords import bad_record
from .codecs import BYTES, Buffer, Codec

__all__ = ["DecodeError", "Record", "decode", "decode_batch"]


class Record:
    """One item as a connector read it: the raw bytes and where they came from.

    ``source`` names the connector (``"kafka:readings"``, ``"file:/data/x.jsonl"``, ...);
    ``position`` says where in it (``partition``/``offset``, ``line``, ``peer``, ...). ``codec``
    is how :meth:`decode` reads ``raw``. ``error`` is set when the source itself found the input
    broken (a truncated or oversized frame, an overlong line): such a record always fails to
    decode, so it reaches the decode stage's error policy like any other malformed input.

    Sources that commit (Kafka, MQTT, files) yield records inside
    :class:`streamflow.Message` envelopes whose ``meta`` is ``{"source": ..., **position}``;
    socket sources yield bare records. Sinks of this package pass a ``Record`` through raw
    (``raw``, ``key`` and ``headers`` unchanged).
    """

    __slots__ = ("codec", "error", "headers", "key", "position", "raw", "source", "timestamp")

    def __init__(
        self,
        raw: Buffer | None,
        source: str,
        position: Mapping[str, Any],
        *,
        codec: Codec[Any] = BYTES,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        timestamp: float | None = None,
        error: str | None = None,
    ) -> None:
        self.raw = raw
        self.source = source
        self.position = position
        self.codec = codec
        self.key = key
        self.headers = headers
        self.timestamp = timestamp
        self.error = error

    def decode(self) -> Any:
        """The value, read with ``codec`` (``None`` for a tombstone).

        :raises DecodeError: ``raw`` is malformed (or ``error`` is set); it carries the record.
        """
        if self.error is None:
            if self.raw is None:
                return None
            try:
                return self.codec.decode(self.raw)
            except Exception as exc:
                raise _failure(self, exc) from exc
        raise DecodeError(self, self.error)

    def data(self) -> bytes:
        """``raw`` as ``bytes``, for a sink that writes it out.

        :raises ValueError: the record is a tombstone (it has no bytes to write).
        """
        if self.raw is None:
            raise ValueError(f"the record from {self.where()} is a tombstone: it has no value")
        return self.raw if isinstance(self.raw, bytes) else bytes(self.raw)

    def where(self) -> str:
        """``source`` and ``position`` as text, for messages."""
        inner = ", ".join(f"{k}={v}" for k, v in self.position.items())
        return f"{self.source} ({inner})" if inner else self.source

    def __len__(self) -> int:
        return 0 if self.raw is None else len(self.raw)

    def __repr__(self) -> str:
        bad = f", error={self.error!r}" if self.error else ""
        size = "tombstone" if self.raw is None else f"{len(self.raw)} bytes"
        return f"Record({self.where()}, {size}{bad})"


class DecodeError(ValueError):
    """A record could not be decoded. ``record`` holds the raw bytes and position, ``reason``
    says why; the message names both."""

    def __init__(self, record: Record, reason: str) -> None:
        self.record = record
        self.reason = reason
        super().__init__(f"malformed record from {record.where()}: {reason}")


def decode(record: Record) -> Any:
    """Decode a :class:`Record` with its codec: the function for a ``map`` stage.

    Use it as the first stage after a connector's source, with the error policy you want for
    malformed input::

        flow.source("in", KafkaSource(...)).map("decode", streamflow.connectors.decode, errors="skip")

    A malformed record logs ``connector.bad_record`` (source, position, reason, size; the
    first 10 per source in full, then a ``connector.bad_records`` count at most every 10 s)
    and raises :class:`DecodeError`, so ``errors="skip"`` counts and skips it and
    ``errors=sf.DeadLetter(sink)`` hands the sink the raw record and the reason.
    """
    if not isinstance(record, Record):
        raise TypeError(
            f"decode() expects a streamflow.connectors.Record, got {type(record).__name__}"
        )
    if record.error is None:  # Record.decode, inlined: this runs once per item
        raw = record.raw
        if raw is None:
            return None
        try:
            return record.codec.decode(raw)
        except Exception as cause:
            raise _logged(record, cause) from cause
    raise _logged(record, None)


def decode_batch(records: Sequence[Record]) -> list[Any]:
    """Decode a list of records (a batched socket source's item, or a ``batch`` of records):
    the ``map`` function for batches, as :func:`decode` is for single records.

    Each malformed record is logged like in :func:`decode`; the others are decoded and the
    function raises :class:`streamflow.PartialFailure` with their values and a
    :class:`DecodeError` per bad record, so the stage's error policy takes each bad record on
    its own (``errors="skip"`` counts them, ``sf.DeadLetter(sink)`` receives each raw record)
    and the good ones go on::

        flow.source("in", ServerSource(codec=TENSOR, batched=True)).map(
            "decode", streamflow.connectors.decode_batch, errors="skip"
        )
    """
    values: list[Any] = []
    errors: dict[int, DecodeError] = {}
    for i, record in enumerate(records):
        if type(record) is not Record and not isinstance(record, Record):
            raise TypeError(
                f"decode_batch() expects streamflow.connectors.Record values, got {type(record).__name__} "
                f"at index {i}"
            )
        if record.error is None:  # Record.decode, inlined: this runs once per element
            raw = record.raw
            try:
                values.append(None if raw is None else record.codec.decode(raw))
            except Exception as cause:
                errors[i] = _logged(record, cause)
                errors[i].__cause__ = cause
        else:
            errors[i] = _logged(record, None)
    if errors:
        raise sf.PartialFailure(values, errors)
    return values


def _logged(record: Record, cause: Exception | None) -> DecodeError:
    """The error for a malformed record (``cause``: what its codec raised, or ``None`` when
    the source flagged it), logged as ``connector.bad_record``."""
    exc = DecodeError(record, record.error or "") if cause is None else _failure(record, cause)
    bad_record(
        record.source, record.position, codec=record.codec.name, size=len(record), reason=exc.reason
    )
    return exc


def _failure(record: Record, cause: Exception) -> DecodeError:
    return DecodeError(record, f"{type(cause).__name__}: {cause}")
