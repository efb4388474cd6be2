"""Codecs: how a connector turns values into bytes and back.

Every connector takes a ``codec``. Sources attach it to each :class:`~connectors.Record` and
decode only in a stage (:func:`connectors.decode`), so malformed input meets that stage's
error policy; sinks call ``encode``. Never pickle: these codecs are safe on a network path.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "BYTES",
    "JSON",
    "TEXT",
    "BytesCodec",
    "Codec",
    "CsvCodec",
    "JsonCodec",
    "TextCodec",
    "as_bytes",
]

_T = TypeVar("_T")

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Codec(Protocol[_T]):
    """Turns values into bytes (``encode``) and back (``decode``).

    ``decode`` raises (any :class:`Exception`) on malformed input; it never returns a partial
    value. ``name`` is used in logs and dead letters.
    """

    name: str

    def encode(self, value: _T, /) -> bytes: ...

    def decode(self, raw: Buffer, /) -> _T: ...


def as_bytes(value: object) -> bytes:
    """``bytes`` for bytes-like values and ``str`` (UTF-8); ``TypeError`` for anything else."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected bytes or str, got {type(value).__name__}; pass a codec")


class BytesCodec:
    """Raw bytes in, raw bytes out (``str`` is encoded as UTF-8)."""

    name = "bytes"

    def encode(self, value: object, /) -> bytes:
        return as_bytes(value)

    def decode(self, raw: Buffer, /) -> bytes:
        return raw if isinstance(raw, bytes) else bytes(raw)

    def __repr__(self) -> str:
        return "BYTES"


class TextCodec:
    """Text in ``encoding`` (UTF-8 by default); undecodable bytes raise ``UnicodeDecodeError``."""

    name = "text"

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = encoding

    def encode(self, value: str, /) -> bytes:
        return value.encode(self.encoding)

    def decode(self, raw: Buffer, /) -> str:
        return bytes(raw).decode(self.encoding)

    def __repr__(self) -> str:
        return "TEXT" if self.encoding == "utf-8" else f"TextCodec({self.encoding!r})"


class JsonCodec:
    """JSON as UTF-8: compact on the wire, any JSON value back. Malformed JSON raises
    ``json.JSONDecodeError`` (a ``ValueError``)."""

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def encode(self, value: Any, /) -> bytes:
        return self._encoder.encode(value).encode()

    def decode(self, raw: Buffer, /) -> Any:
        return json.loads(raw if isinstance(raw, bytes | bytearray) else bytes(raw))

    def __repr__(self) -> str:
        return "JSON"


class CsvCodec:
    """One CSV record <-> a ``dict`` keyed by ``fieldnames``.

    ``decode`` raises ``ValueError`` when a row has fewer or more fields than ``fieldnames``
    (values stay strings; convert them in a stage). ``encode`` takes a mapping (missing keys
    are written empty) or a sequence in field order, and returns the record without a line end.
    """

    name = "csv"

    def __init__(self, fieldnames: Sequence[str], *, delimiter: str = ",") -> None:
        if not fieldnames:
            raise ValueError("CsvCodec needs at least one field name")
        self.fieldnames = tuple(fieldnames)
        self.delimiter = delimiter

    def encode(self, value: Mapping[str, Any] | Sequence[Any], /) -> bytes:
        if isinstance(value, Mapping):
            row = [value.get(name, "") for name in self.fieldnames]
        else:
            row = list(value)
            if len(row) != len(self.fieldnames):
                raise ValueError(f"CSV row has {len(row)} fields, expected {len(self.fieldnames)}")
        out = io.StringIO()
        csv.writer(out, delimiter=self.delimiter, lineterminator="\n").writerow(row)
        return out.getvalue()[:-1].encode()

    def decode(self, raw: Buffer, /) -> dict[str, str]:
        text = bytes(raw).decode()
        rows = list(csv.reader(io.StringIO(text), delimiter=self.delimiter, strict=True))
        if len(rows) != 1:
            raise ValueError(f"expected one CSV record, got {len(rows)}")
        row = rows[0]
        if len(row) != len(self.fieldnames):
            raise ValueError(
                f"CSV row has {len(row)} fields, expected {len(self.fieldnames)} "
                f"({', '.join(self.fieldnames)})"
            )
        return dict(zip(self.fieldnames, row, strict=True))

    def __repr__(self) -> str:
        return f"CsvCodec({list(self.fieldnames)!r})"


BYTES = BytesCodec()
"""The raw-bytes codec (the default everywhere)."""
TEXT = TextCodec()
"""UTF-8 text."""
JSON = JsonCodec()
"""JSON as UTF-8."""
