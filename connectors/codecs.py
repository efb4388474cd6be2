"""Codecs: how a connector turns values into bytes and back.

Every connector takes a ``codec``. Sources attach it to each :class:`~streamflow.connectors.Record` and
decode only in a stage (:func:`streamflow.connectors.decode`), so malformed input meets that stage's
error policy; sinks call ``encode``. Never pickle: these codecs are safe on a network path.

The contract of every codec here, on any bytes at all: ``decode`` either returns a value or
raises :class:`ValueError` (or a subclass: ``UnicodeDecodeError``, ``json.JSONDecodeError``,
:class:`~streamflow.connectors.tensors.TensorFormatError`), never anything else; and whatever ``decode``
returns, ``encode`` accepts, and decoding that encoding gives the value back. So a value read
from a source can always be written to a sink with the same codec.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from itertools import accumulate
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
    "json_depth",
]

_T = TypeVar("_T")

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Codec(Protocol[_T]):
    """Turns values into bytes (``encode``) and back (``decode``).

    ``decode`` raises on malformed input and never returns a partial value; the codecs of this
    package raise only :class:`ValueError` (or a subclass), and a codec of your own should too
    (the decode stage turns any :class:`Exception` into a :class:`~streamflow.connectors.DecodeError`).
    Whatever ``decode`` returns, ``encode`` must accept, and ``decode(encode(value))`` must equal
    ``value``. ``name`` is used in logs and dead letters.
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


# decoding these never yields text that does not encode back to itself (checked, not assumed,
# for every other encoding: the stateful ISO-2022 codecs, for one, accept escape sequences
# that they cannot write back)
_ROUND_TRIP_ENCODINGS = frozenset(
    ["utf-8", "utf-8-sig", "ascii", "latin-1", "iso8859-1", "cp1252"]
    + [f"utf-{n}{end}" for n in (16, 32) for end in ("", "-le", "-be")]
)


class TextCodec:
    """Text in ``encoding`` (UTF-8 by default), decoded strictly.

    ``decode`` raises ``UnicodeDecodeError`` (a ``ValueError``) on bytes that are not valid in
    ``encoding``, and ``ValueError`` on text that ``encoding`` could not write back (so
    ``encode`` always accepts what ``decode`` returns). An unknown or non-text encoding raises
    ``LookupError`` here, not at the first record.
    """

    name = "text"

    def __init__(self, encoding: str = "utf-8") -> None:
        try:  # LookupError now for "nope" or "rot13" (not a text encoding), not per record
            b"x".decode(encoding)
            "x".encode(encoding)
        except UnicodeError:
            pass
        self.encoding = encoding
        self._checked = codecs.lookup(encoding).name not in _ROUND_TRIP_ENCODINGS

    def encode(self, value: str, /) -> bytes:
        return value.encode(self.encoding)

    def decode(self, raw: Buffer, /) -> str:
        text = bytes(raw).decode(self.encoding)
        if self._checked:
            try:
                same = text.encode(self.encoding).decode(self.encoding) == text
            except UnicodeError:
                same = False
            if not same:
                raise ValueError(f"text does not encode back to {self.encoding}: {text[:40]!r}")
        return text

    def __repr__(self) -> str:
        return "TEXT" if self.encoding == "utf-8" else f"TextCodec({self.encoding!r})"


_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# One pass that makes the rare, costly inputs easy to spot: digits become 0, E becomes e,
# { becomes [ and + goes. A float literal overflows to infinity only with an exponent of 3+
# digits ("e000" then) or with 210+ digits before the point (a run of 0s).
_HINTS = bytes.maketrans(b"123456789E{", b"000000000e[")
_LONG_RUN = b"0" * 210
_BEFORE_NUMBER = frozenset(b"[,: \t\r\n")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(data: bytes) -> int:
    """How deeply the JSON text ``data`` nests arrays and objects (0 for a scalar).

    Exact for valid JSON (brackets inside strings do not count) and linear in ``len(data)``
    on any bytes, with no recursion: a guard to run before a recursive parser.
    """
    # drop escaped backslashes, then escaped quotes: every '"' left delimits a string
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _big_exponent(hints: bytes) -> bool:
    """Whether an "e000" in ``hints`` (see _HINTS) may end a number, not sit in a string."""
    at = hints.find(b"e000")
    while at >= 0:
        start = at
        while start and hints[start - 1] in b"0.-":
            start -= 1
        if start < at and (start == 0 or hints[start - 1] in _BEFORE_NUMBER):
            return True
        at = hints.find(b"e000", at + 1)
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (JsonCodec(allow_nan=True) accepts it)")


class JsonCodec:
    """JSON as UTF-8: compact on the wire, any JSON value back; strict by default.

    ``decode`` accepts exactly the JSON texts (RFC 8259) in UTF-8 (one leading UTF-8 byte
    order mark is skipped, as RFC 8259 allows; UTF-16 and UTF-32 are refused), nested at most
    ``max_depth`` arrays and objects deep, whose strings hold no lone surrogate (an escape such
    as ``"\\ud800"`` has no UTF-8 encoding) and whose numbers fit a float. ``NaN``, ``Infinity``
    and ``-Infinity`` (not JSON) are refused unless ``allow_nan=True``; then ``encode`` writes
    them too, else it raises ``ValueError`` on them. Malformed JSON raises
    ``json.JSONDecodeError``, bytes that are not UTF-8 ``UnicodeDecodeError``, everything else
    refused ``ValueError``: all ``ValueError``, never ``RecursionError``. Whatever ``decode``
    returns, ``encode`` accepts.
    """

    name = "json"

    def __init__(self, *, allow_nan: bool = False, max_depth: int = 256) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        self.allow_nan = allow_nan
        self.max_depth = max_depth
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), allow_nan=allow_nan
        )
        constant = None if allow_nan else _refuse_constant
        self._decode = json.JSONDecoder(parse_constant=constant).decode

    def encode(self, value: Any, /) -> bytes:
        """Compact UTF-8 JSON. ``ValueError`` for NaN or infinities (unless ``allow_nan``),
        strings with lone surrogates and circular or too deeply nested values; ``TypeError``
        for values that are not JSON (sets, bytes, objects)."""
        try:
            return self._encoder.encode(value).encode()
        except RecursionError:
            raise ValueError("value is nested too deeply to encode as JSON") from None

    def decode(self, raw: Buffer, /) -> Any:
        data = raw if isinstance(raw, bytes) else bytes(raw)
        try:
            return self._loads(data)
        except json.JSONDecodeError:
            if data.startswith(_BOM):  # (checked only here, off the common path)
                return self._loads(data[3:])
            raise

    def _loads(self, data: bytes) -> Any:
        text = data.decode()  # strict UTF-8: UnicodeDecodeError
        hints = data.translate(_HINTS, b"+")
        # more than max_depth openers (and as many closers) before it can nest too deep
        if len(data) > 2 * self.max_depth and hints.count(b"[") > self.max_depth:
            depth = json_depth(data)
            if depth > self.max_depth:
                raise ValueError(
                    f"JSON nested {depth} deep, deeper than max_depth={self.max_depth}"
                )
        try:
            value = self._decode(text)
        except RecursionError:  # max_depth above what this interpreter's stack allows
            raise ValueError("JSON nested too deeply for this interpreter") from None
        # the rare values that may not encode back (a lone surrogate, a float that overflowed
        # to infinity): check those by encoding them
        if (b"\\" in data and b"\\u" in data and _SURROGATE_ESCAPE.search(data)) or (
            not self.allow_nan
            and (
                (b"e000" in hints and _big_exponent(hints))
                or (len(hints) >= len(_LONG_RUN) and _LONG_RUN in hints)
            )
        ):
            self._check_encodes(value)
        return value

    def _check_encodes(self, value: Any) -> None:
        try:
            self._encoder.encode(value).encode()
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end]
            raise ValueError(
                f"JSON string holds a lone surrogate {bad!r}, which has no UTF-8 encoding"
            ) from None
        except ValueError:  # allow_nan=False: a finite-looking number overflowed
            raise ValueError(
                "JSON number is too large for a float (it overflows to infinity)"
            ) from None
        except RecursionError:
            raise ValueError("JSON nested too deeply for this interpreter") from None

    def __repr__(self) -> str:
        options = []
        if self.allow_nan:
            options.append("allow_nan=True")
        if self.max_depth != 256:
            options.append(f"max_depth={self.max_depth}")
        return f"JsonCodec({', '.join(options)})" if options else "JSON"


class CsvCodec:
    """One CSV record <-> a ``dict`` keyed by ``fieldnames`` (the excel dialect: fields with a
    delimiter, quote, ``\\r`` or ``\\n`` are quoted, quotes doubled).

    ``decode`` takes one UTF-8 record, with or without its line end, and raises ``ValueError``
    on anything else: bytes that are not UTF-8 (``UnicodeDecodeError``), more or less than one
    record, a row with fewer or more fields than ``fieldnames``, a stray quote after a quoted
    field, an unterminated quote, a field over ``csv.field_size_limit()``. Values stay strings
    (convert them in a stage). ``encode`` takes a mapping (missing keys are written empty) or a
    sequence in field order, and returns the record without a line end; it quotes whatever
    ``decode`` would otherwise misread, so every decoded record encodes back to itself.
    """

    name = "csv"

    def __init__(self, fieldnames: Sequence[str], *, delimiter: str = ",") -> None:
        if not fieldnames:
            raise ValueError("CsvCodec needs at least one field name")
        if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n':
            raise ValueError(
                "delimiter must be one character other than a quote or a line end, "
                f"got {delimiter!r}"
            )
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
        # "\r\n" as the line end quotes fields holding either, so that they read back
        csv.writer(out, delimiter=self.delimiter, lineterminator="\r\n").writerow(row)
        return out.getvalue()[:-2].encode()

    def decode(self, raw: Buffer, /) -> dict[str, str]:
        text = bytes(raw).decode()
        try:
            # one string, not lines: a line end that is not quoted ends the record, and any
            # text after it is an error ("new-line character seen in unquoted field")
            rows = list(csv.reader([text], delimiter=self.delimiter, strict=True))
        except csv.Error as exc:  # not a ValueError
            reason = str(exc)
            if reason.startswith("new-line character"):  # the hint about files misleads here
                reason = "a line end outside quotes, or more than one record"
            raise ValueError(f"malformed CSV record: {reason}") from None
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
"""Strict JSON as UTF-8 (see :class:`JsonCodec`)."""
