"""Property tests: every codec keeps its contract on any input.

For each codec and any bytes: ``decode`` returns a value or raises ``ValueError`` (for the
tensor codec: ``TensorFormatError``), nothing else; and whatever it returns, ``encode``
accepts and decoding that encoding gives an equal value (NaN-aware). Inputs are random bytes
and "almost valid" ones: valid encodings, perturbed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from typing import Any

import numpy as np
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from streamflow.connectors import BYTES, JSON, CsvCodec, JsonCodec, TextCodec
from streamflow.connectors.codecs import json_depth
from streamflow.connectors.tensors import (
    _DTYPES,
    MAX_HEADER_DEPTH,
    Tagged,
    TensorCodec,
    TensorFormatError,
    decode_tensor,
)


def _odds(n: int) -> st.SearchStrategy[bool]:
    """True n times in n + 1 (st.integers is biased to its bounds)."""
    return st.sampled_from([True] * n + [False])


# -- comparing decoded values ---------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types (1, 1.0 and True differ), NaN equal to NaN, -0.0 not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return bool(
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()
        )
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, Tagged):
        return same(a.tensor, b.tensor) and same(a.meta, b.meta)
    return bool(a == b)


def keeps_contract(
    codec: Any,
    raw: bytes | bytearray,
    error: type[Exception] = ValueError,
    *,
    accept: bool | None = None,
) -> Any:
    """Decode ``raw``: a failure must be ``error``; a value must encode and decode back."""
    try:
        value = codec.decode(raw)
    except error as exc:
        assert accept is not True, f"{codec!r} refused {raw[:200]!r}"
        event(f"{codec.name}: {type(exc).__name__} {str(exc)[:20]}")  # --hypothesis-show-statistics
        return None
    event(f"{codec.name}: accepted")
    assert accept is not False, f"{codec!r} accepted {raw[:200]!r}: {value!r}"[:400]
    again = codec.decode(codec.encode(value))
    assert same(again, value), (raw[:200], value, again)
    return value


# -- JSON -----------------------------------------------------------------------------------

JSON_CODECS = [JSON, JsonCodec(allow_nan=True), JsonCodec(max_depth=3)]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**50), max_value=10**50)
    | st.floats()  # NaN and infinities too: dumped with allow_nan
    | st.text(alphabet=st.characters(codec=None), max_size=8)  # lone surrogates too
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.characters(codec=None), max_size=4), inner, max_size=4
        )
    ),
    max_leaves=12,
)
_pieces = st.sampled_from(
    [
        "\\ud800",
        "\\udfff",
        "\\udbff\\udfff",
        "\\ud83d\\ude00",
        "\\u0000",
        "\\",
        '"',
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1E+400",
        "1e-400",
        "1" * 320 + ".5",
        "9" * 5000,
        "[" * 300,
        "]",
        "{",
        "}",
        ",",
        ":",
        "\ufeff",
        "\x00",
        "\u2028",
        "é",
        " ",
    ]
)


@st.composite
def json_texts(draw: st.DrawFn) -> bytes:
    """JSON texts, mostly valid, then perturbed: escapes, constants, nesting, BOMs, UTF-16."""
    value = draw(json_values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_pieces) + text[at + draw(st.integers(0, 2)) :]
    if not draw(_odds(9)):
        depth = draw(st.integers(1, 100_000))
        text = "[" * depth + text + "]" * draw(st.sampled_from([0, depth]))
    encoding = draw(st.sampled_from(["utf-8"] * 8 + ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"]))
    return text.encode(encoding, "surrogatepass")  # a raw surrogate: invalid UTF-8 bytes


@settings(max_examples=500)
@given(raw=json_texts() | st.binary(max_size=40), codec=st.sampled_from(JSON_CODECS))
def test_json_keeps_its_contract(raw: bytes, codec: JsonCodec) -> None:
    try:
        value = codec.decode(raw)
    except ValueError as exc:
        event(f"json: {type(exc).__name__} {str(exc)[:20]}")
        return
    event("json: accepted")
    assert json_depth(raw) <= codec.max_depth
    again = codec.decode(codec.encode(value))
    assert same(again, value), (raw[:200], value, again)


@settings(max_examples=300)
@given(value=json_values)
def test_json_round_trips_every_encodable_value(value: Any) -> None:
    lenient = JsonCodec(allow_nan=True)
    try:
        raw = lenient.encode(value)
    except UnicodeEncodeError:  # a lone surrogate (not valid Unicode): encode refuses too
        return
    assert same(keeps_contract(lenient, raw, accept=True), value)
    # the strict codec takes exactly the values without NaN or infinity
    finite = "NaN" not in raw.decode() and "Infinity" not in raw.decode()
    keeps_contract(JSON, raw, accept=finite or None)


def test_json_depth_matches_the_parser() -> None:
    for text in ["1", "[]", '{"a":[1,{"b":[]}]}', '["[[[", "\\"[", "\\\\", [[]]]', '"]]]"']:
        value = json.loads(text)
        assert json_depth(text.encode()) == _depth(value), text


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


# -- CSV ------------------------------------------------------------------------------------

_csv_chars = st.sampled_from(list('ab ,;\t"\r\n\x00\\é')) | st.characters(codec="utf-8")
_fields = st.lists(st.text(alphabet=_csv_chars, max_size=6), min_size=1, max_size=4)


@st.composite
def csv_records(draw: st.DrawFn) -> tuple[int, str, bytes]:
    """A record written by ``csv.writer`` in some dialect, then perturbed."""
    fields = draw(_fields)
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    out = io.StringIO()
    csv.writer(
        out,
        delimiter=delimiter,
        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
        lineterminator=draw(st.sampled_from(["", "\n", "\r\n", "\r"])),
    ).writerow(fields)
    text = out.getvalue()
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_csv_chars) + text[at + draw(st.integers(0, 1)) :]
    n = draw(st.sampled_from([len(fields), len(fields), 1, 3]))
    return n, delimiter, text.encode()


@settings(max_examples=600)
@given(
    record=csv_records()
    | st.tuples(st.integers(1, 3), st.sampled_from([",", ";"]), st.binary(max_size=20))
)
def test_csv_keeps_its_contract(record: tuple[int, str, bytes]) -> None:
    n, delimiter, raw = record
    keeps_contract(CsvCodec([f"f{i}" for i in range(n)], delimiter=delimiter), raw)


@settings(max_examples=200)
@given(fields=_fields, delimiter=st.sampled_from([",", ";", "\t", " ", "|"]))
def test_csv_reads_back_whatever_it_writes(fields: list[str], delimiter: str) -> None:
    codec = CsvCodec([f"f{i}" for i in range(len(fields))], delimiter=delimiter)
    assert codec.decode(codec.encode(fields)) == dict(zip(codec.fieldnames, fields, strict=True))


# -- text and bytes -------------------------------------------------------------------------

ENCODINGS = [
    "utf-8",
    "latin-1",
    "cp1252",
    "utf-16",
    "utf-16-be",
    "utf-32",
    "utf-8-sig",
    "utf-7",
    "shift_jis",
    "gb18030",
    "big5hkscs",
    "iso2022_jp",
    "iso2022_jp_2",
    "iso2022_kr",
]


@settings(max_examples=500)
@given(
    encoding=st.sampled_from(ENCODINGS),
    raw=st.binary(max_size=12)
    | st.text(alphabet=st.characters(codec=None), max_size=6).map(
        lambda t: t.encode("utf-16-le", "surrogatepass")
    )
    | st.text(max_size=6).map(lambda t: "\x1b$B" + t).map(lambda t: t.encode("utf-8"))
    | st.lists(  # ISO-2022 escape sequences, shift codes and stray bytes
        st.sampled_from([b"\x1b", b"$", b"(", b"B", b"D", b"\x0e", b"\x0f", b"a"])
        | st.binary(min_size=1, max_size=1),
        max_size=8,
    ).map(b"".join),
)
def test_text_keeps_its_contract(encoding: str, raw: bytes) -> None:
    keeps_contract(TextCodec(encoding), raw)
    keeps_contract(BYTES, raw, accept=True)


# -- tensors --------------------------------------------------------------------------------

TENSOR_CODECS = [
    TensorCodec(),
    TensorCodec(with_meta=True),
    TensorCodec(framework="numpy", with_meta=True),
]


def frame(header: bytes | dict[str, Any], payload: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"SFT1" + struct.pack("<I", len(text)) + text + payload


def tensor_contract(raw: bytes, *, writable: bool = False) -> None:
    for codec in TENSOR_CODECS:
        keeps_contract(codec, bytearray(raw) if writable else raw, TensorFormatError)


_weird_dims = st.sampled_from([-1, 2**48, 2**48 + 1, 2**63, 2**70, 10**400]) | st.booleans()
_weird_shapes = (
    st.lists(
        st.integers(0, 4) | _weird_dims | st.floats() | st.text(max_size=2) | st.none(),
        max_size=6,
    )
    | st.lists(st.integers(0, 1), min_size=60, max_size=70)  # MAX_NDIM is 64
    | st.lists(st.integers(0, 1) | st.just(2**40), min_size=2, max_size=5)  # 0 by a huge dim
    | json_values
)
_weird_dtypes = st.sampled_from(["object", "float", "torch.float32", "", "FLOAT32"]) | json_values


@st.composite
def tensor_headers(draw: st.DrawFn) -> bytes:
    """Headers mostly close to valid (each field right 4 times in 5): random dtype, shape and
    meta, fields missing, extra or of the wrong type, payloads of the right or a random size."""
    header: dict[str, Any] = {}
    if draw(_odds(19)):
        valid = draw(_odds(4))
        header["dtype"] = draw(st.sampled_from(list(_DTYPES)) if valid else _weird_dtypes)
    if draw(_odds(19)):
        valid = draw(_odds(4))
        small = st.lists(st.integers(0, 4), max_size=4)
        header["shape"] = draw(small if valid else _weird_shapes)
    if draw(st.booleans()):
        valid = draw(_odds(4))
        header["meta"] = draw(
            st.dictionaries(st.text(max_size=3), json_values, max_size=3) if valid else json_values
        )
    if not draw(_odds(3)):
        header[draw(st.text(max_size=3))] = draw(json_values)  # an extra (or replaced) field
    if not draw(_odds(19)):
        return frame(json.dumps(draw(json_values), allow_nan=True).encode())
    size = 1
    dtype = header.get("dtype")
    shape = header.get("shape")
    if (
        isinstance(dtype, str)
        and dtype in _DTYPES
        and isinstance(shape, list)
        and all(type(d) is int and abs(d) < 2**80 for d in shape)
    ):
        size = math.prod(shape) * _DTYPES[dtype][0]
    exact = 0 <= size <= 4096
    length = size if exact and draw(_odds(3)) else draw(st.integers(0, 40))
    payload = draw(st.binary(min_size=length, max_size=length))
    if dtype == "bool" and draw(st.booleans()):
        payload = bytes(b & 1 for b in payload)
    return frame(json.dumps(header).encode(), payload)


@settings(max_examples=500)
@given(raw=tensor_headers(), writable=st.booleans())
def test_tensor_decode_of_random_headers(raw: bytes, writable: bool) -> None:
    tensor_contract(raw, writable=writable)


@settings(max_examples=200)
@given(
    raw=st.binary(max_size=80)
    | st.binary(max_size=80).map(lambda b: b"SFT1" + b)
    | st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=80)).map(
        lambda t: b"SFT1" + struct.pack("<I", t[0]) + t[1]
    )
)
def test_tensor_decode_of_random_bytes(raw: bytes) -> None:
    tensor_contract(raw)


@settings(max_examples=100)
@given(
    depth=st.integers(MAX_HEADER_DEPTH - 3, 100_000),
    opener=st.sampled_from(["[", '{"a":', '{"dtype":"uint8","shape":[1],"meta":{"a":']),
    closed=st.booleans(),
)
def test_tensor_decode_of_deep_headers(depth: int, opener: str, closed: bool) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + (closer * depth if closed else "")
    tensor_contract(frame(text.encode(), b"\x01"))


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, tuple[int, ...], bytes, dict[str, Any]]:
    """Random dtype (every one in the table), shape (0-sized too), contents and meta."""
    dtype = draw(st.sampled_from(list(_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    n = math.prod(shape) * _DTYPES[dtype][0]
    if dtype == "bool":
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        data = draw(st.binary(min_size=n, max_size=n))  # NaN payloads and all
    meta = draw(st.dictionaries(st.text(max_size=4), json_values, max_size=3))
    return dtype, shape, data, meta


def _make(dtype: str, shape: tuple[int, ...], data: bytes, framework: str) -> Any:
    if framework == "numpy":
        numpy_name = _DTYPES[dtype][1]
        assert numpy_name is not None
        return np.frombuffer(data, dtype=np.dtype(numpy_name).newbyteorder("<")).reshape(shape)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
    return flat.to(torch.uint8).view(getattr(torch, dtype)).reshape(shape)


@settings(max_examples=300)
@given(case=tensors(), framework=st.sampled_from(["torch", "numpy"]))
def test_tensor_round_trip(
    case: tuple[str, tuple[int, ...], bytes, dict[str, Any]], framework: str
) -> None:
    dtype, shape, data, meta = case
    if framework == "numpy" and _DTYPES[dtype][1] is None:
        framework = "torch"  # bfloat16 has no numpy dtype
    value = _make(dtype, shape, data, framework)
    codec = TensorCodec(framework=framework, with_meta=True)  # type: ignore[arg-type]
    raw = codec.encode(Tagged(value, meta))
    back = keeps_contract(codec, raw, TensorFormatError, accept=True)
    assert same(back, Tagged(value, meta))
    plain, _ = decode_tensor(bytearray(raw), framework=framework)  # type: ignore[arg-type]
    assert same(plain, value)


_MUTATIONS = ["truncate", "extend", "replace", "flip", "drop", "insert"]


@settings(max_examples=400)
@given(case=tensors(), data=st.data(), writable=st.booleans())
def test_tensor_decode_of_mutated_encodings(
    case: tuple[str, tuple[int, ...], bytes, dict[str, Any]], data: st.DataObject, writable: bool
) -> None:
    dtype, shape, contents, meta = case
    raw = TensorCodec().encode(Tagged(_make(dtype, shape, contents, "torch"), meta))
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(_MUTATIONS))
        at = data.draw(st.integers(0, len(raw) - 1)) if raw else 0
        byte = data.draw(st.integers(0, 255))
        if kind == "truncate":
            raw = raw[:at]
        elif kind == "extend":
            raw += bytes([byte]) * data.draw(st.integers(1, 16))
        elif raw and kind == "drop":
            raw = raw[:at] + raw[at + 1 :]
        elif raw and kind in ("replace", "flip"):
            new = byte if kind == "replace" else raw[at] ^ (1 << byte % 8)
            raw = raw[:at] + bytes([new]) + raw[at + 1 :]
        else:
            raw = raw[:at] + bytes([byte]) + raw[at:]
        event(kind)
    tensor_contract(raw, writable=writable)
