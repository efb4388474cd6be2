"""Codecs, the tensor wire format, the in-order ack rule and the decode stage (no I/O)."""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest
import torch
from streamflow.connectors import JSON, TEXT, CsvCodec, DecodeError, JsonCodec, Record, TextCodec
from streamflow.connectors._inorder import InOrder
from streamflow.connectors.tensors import (
    TENSOR,
    Tagged,
    TensorCodec,
    TensorFormatError,
    decode_tensor,
)
from structlog.testing import capture_logs

from streamflow import connectors


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.arange(24) % 3).reshape(2, 3, 4).to(dtype)
    back = TENSOR.decode(TENSOR.encode(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_tensor_edge_shapes_views_and_metadata() -> None:
    assert TENSOR.decode(TENSOR.encode(torch.tensor(2.5))).item() == 2.5
    assert TENSOR.decode(TENSOR.encode(torch.zeros(0, 7))).shape == (0, 7)
    strided = torch.arange(20.0).reshape(4, 5)[:, ::2]  # not contiguous
    assert torch.equal(TENSOR.decode(TENSOR.encode(strided)), strided)
    tagged = TensorCodec(with_meta=True).decode(TENSOR.encode(Tagged(strided, {"id": 7})))
    assert tagged.meta == {"id": 7} and torch.equal(tagged.tensor, strided)
    big_endian = np.arange(5, dtype=">i4")
    assert TENSOR.decode(TENSOR.encode(big_endian)).tolist() == [0, 1, 2, 3, 4]


def test_tensor_encoding_is_zero_copy_and_data_is_aligned() -> None:
    t = torch.randn(100)
    header, data = TENSOR.encode_parts(t)
    assert len(header) % 64 == 0
    assert (
        isinstance(data, memoryview) and np.frombuffer(data, np.float32).ctypes.data == t.data_ptr()
    )
    frame = bytearray(b"".join([header, data]))
    back = TENSOR.decode(frame)  # writable buffer: the tensor aliases it
    back[0] = 123.0
    assert struct.unpack_from("<f", frame, len(header))[0] == 123.0
    array, _ = decode_tensor(bytes(frame), framework="numpy")  # read-only numpy view
    assert array[0] == 123.0 and not array.flags.writeable


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-4], "header says float32[4] = 16 bytes of data, the buffer holds 12"),
        (lambda b: b + b"\0" * 4, "the buffer holds 20"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:6], "shorter than the 8-byte prefix"),
        (lambda b: b[:4] + struct.pack("<I", 1 << 30) + b[8:], "header length"),
    ],
)
def test_tensor_decode_rejects_lies_and_truncation(mutate: object, message: str) -> None:
    good = TENSOR.encode(torch.ones(4))
    with pytest.raises(TensorFormatError, match=re.escape(message)):
        TENSOR.decode(mutate(good))  # type: ignore[operator]


@pytest.mark.parametrize(
    "header",
    [
        {"dtype": "object", "shape": [1]},
        {"dtype": "float32", "shape": [-1]},
        {"dtype": "float32", "shape": [1.5]},
        {"dtype": "float32", "shape": "4"},
        {"dtype": "float32", "shape": [1], "meta": []},
    ],
)
def test_tensor_decode_rejects_bad_headers(header: dict[str, object]) -> None:
    text = json.dumps(header).encode()
    with pytest.raises(TensorFormatError):
        TENSOR.decode(b"SFT1" + struct.pack("<I", len(text)) + text + b"\0" * 4)


def test_never_pickles() -> None:
    with pytest.raises(TypeError):
        TENSOR.encode([1, 2, 3])
    with pytest.raises(TypeError):
        TENSOR.encode(np.array([object()]))


def test_json_text_and_csv_codecs() -> None:
    assert JSON.decode(JSON.encode({"a": [1, "é"]})) == {"a": [1, "é"]}
    assert JSON.encode({"a": 1}) == b'{"a":1}'
    assert TEXT.decode(TEXT.encode("héllo")) == "héllo"
    csv = CsvCodec(["a", "b"])
    assert csv.decode(csv.encode({"a": "1", "b": 'x,"y"'})) == {"a": "1", "b": 'x,"y"'}
    with pytest.raises(ValueError, match="CSV row has 1 fields, expected 2"):
        csv.decode(b"1")
    with pytest.raises(ValueError, match="CSV row has 3 fields"):
        csv.decode(b"1,2,3")


def test_in_order_releases_only_the_finished_prefix() -> None:
    acks: InOrder[int, int] = InOrder()
    for offset in (10, 11, 12, 15):  # offsets need not be contiguous
        acks.track(offset, offset)
    assert acks.done(11) == [] and acks.done(15) == []  # 10 is slow: nothing moves past it
    assert acks.done(10) == [10, 11]
    assert acks.done(12) == [12, 15]
    assert len(acks) == 0 and acks.done(99) == []
    acks.track(16, 16)
    acks.track(17, 17)
    assert acks.release(17) == 0 and acks.release(16) == 2 and acks.last == 17


def test_decode_raises_and_logs_source_and_position() -> None:
    record = Record(b"{nope", "kafka:t", {"partition": 2, "offset": 41}, codec=JSON)
    with capture_logs() as logs, pytest.raises(DecodeError) as info:
        connectors.decode(record)
    assert str(info.value).startswith("malformed record from kafka:t (partition=2, offset=41)")
    (event,) = logs
    assert (event["event"], event["source"], event["partition"], event["offset"]) == (
        "connector.bad_record",
        "kafka:t",
        2,
        41,
    )
    assert event["log_level"] == "warning" and event["size"] == 5
    flagged = Record(b"", "tcp:x", {"frame": 3}, error="truncated frame")
    with pytest.raises(DecodeError, match="truncated frame"):
        connectors.decode(flagged)
    with pytest.raises(TypeError, match="expects a streamflow.connectors.Record"):
        connectors.decode(b"raw")  # type: ignore[arg-type]


# -- strict JSON (issue 13, point 4) --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"i": "\\ud800"}', "lone surrogate '\\ud800'"),
        (b'["\\udfff"]', "lone surrogate"),
        (b'["\\ud800\\u0041"]', "lone surrogate"),
        (b"[NaN]", "NaN is not JSON"),
        (b"[Infinity]", "Infinity is not JSON"),
        (b'{"a": -Infinity}', "-Infinity is not JSON"),
        (b"[1e400]", "too large for a float"),
        (b"-1E+0400", "too large for a float"),
        (b"[" * 100_000, "JSON nested 100000 deep, deeper than max_depth=256"),
        (b"[" * 257 + b"]" * 257, "JSON nested 257 deep"),
        ('{"a": 1}'.encode("utf-16"), "can't decode byte 0xff"),
        ('{"a": 1}'.encode("utf-16-le"), "Expecting property name"),  # NULs between chars
        ('{"a": 1}'.encode("utf-32"), "can't decode byte 0xff"),
        ('["\ud800"]'.encode("utf-8", "surrogatepass"), "invalid continuation byte"),
        (b"\xef\xbb\xbf\xef\xbb\xbf[1]", "Expecting value"),  # only one BOM is skipped
    ],
)
def test_json_refuses_what_it_could_not_write_back(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        JSON.decode(raw)


def test_json_accepts_valid_utf8_json_and_round_trips_it() -> None:
    assert JSON.decode(b'"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character
    assert JSON.encode(JSON.decode(b'"\\ud83d\\ude00"')) == '"\U0001f600"'.encode()
    assert JSON.decode(b"\xef\xbb\xbf[1]") == [1]  # one UTF-8 byte order mark: skipped
    assert JSON.decode(b'["[[[[", 1e-400, 1e308]') == ["[[[[", 0.0, 1e308]
    deep = b"[" * 256 + b"]" * 256
    assert JSON.encode(JSON.decode(deep)) == deep
    assert JSON.decode(b'"\\\\ud800"') == "\\ud800"  # an escaped backslash: no surrogate
    with pytest.raises(ValueError, match="nested 3 deep"):
        JsonCodec(max_depth=2).decode(b"[[[]]]")


def test_json_nan_only_when_asked() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        JSON.encode(float("nan"))
    with pytest.raises(ValueError, match="surrogates not allowed"):
        JSON.encode("\ud800")
    lenient = JsonCodec(allow_nan=True)
    value = lenient.decode(b"[NaN, Infinity, -Infinity, 1e400]")
    assert math.isnan(value[0]) and value[1:] == [math.inf, -math.inf, math.inf]
    assert lenient.encode(value) == b"[NaN,Infinity,-Infinity,Infinity]"
    assert repr(lenient) == "JsonCodec(allow_nan=True)" and repr(JSON) == "JSON"


# -- CSV and text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'"a"b,c', "malformed CSV record: ',' expected after '\"'"),
        (b"a\rb,c", "line end outside quotes"),
        (b"a,b\nc,d", "line end outside quotes"),
        (b'"a,b', "unexpected end of data"),
        (b"x" * 200_000 + b",y", "field larger than field limit"),
        (b"\xff,a", "can't decode byte 0xff"),
        (b"", "CSV row has 0 fields"),
    ],
)
def test_csv_malformed_records_raise_value_error(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CsvCodec(["a", "b"]).decode(raw)


@pytest.mark.parametrize(
    "raw",
    [b'"a\rb",c', b'a,"b\r"', b'"a\r\nb",""', b'a"b,c', b"a\x00b,\x00", b'"",', b"a,b\r\n"],
)
def test_csv_round_trips_what_it_decodes(raw: bytes) -> None:
    codec = CsvCodec(["a", "b"])
    value = codec.decode(raw)
    assert codec.decode(codec.encode(value)) == value


def test_csv_and_text_refuse_bad_settings_up_front() -> None:
    with pytest.raises(ValueError, match="delimiter must be one character"):
        CsvCodec(["a"], delimiter=",,")
    with pytest.raises(ValueError, match="delimiter must be one character"):
        CsvCodec(["a"], delimiter='"')
    with pytest.raises(LookupError):
        TextCodec("no-such-encoding")
    with pytest.raises(LookupError):
        TextCodec("rot13")  # not a text encoding


def test_text_codec_round_trips_in_other_encodings() -> None:
    utf16 = TextCodec("utf-16")
    assert utf16.decode(utf16.encode("héllo \U0001f600")) == "héllo \U0001f600"
    with pytest.raises(UnicodeDecodeError):
        utf16.decode(b"\xff\xfe\x00\xd8")  # a lone surrogate in UTF-16
    # a stateful encoding that reads escape sequences it cannot write back
    with pytest.raises(ValueError, match="does not encode back to iso2022_jp_1"):
        TextCodec("iso2022_jp_1").decode(b"{{\x1b\xf5\x11M")


# -- the tensor codec's contract (issue 13, point 5) ----------------------------------------


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    return b"SFT1" + struct.pack("<I", len(header)) + header + payload


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"dtype":"float32","shape":[0, 1180591620717411303424]}', "bad shape"),  # 2**70
        (b'{"dtype":"float32","shape":[0, 1099511627776, 1099511627776]}', "spans more than"),
        (b'{"dtype":"uint8","shape":[0, 281474976710657]}', "bad shape"),  # 2**48 + 1
        (b"[" * 100_000, "header nested 100000 deep (limit 64)"),
        (b'{"dtype":"uint8","shape":[1],"meta":' + b'{"a":' * 70 + b"1" + b"}" * 71, "nested"),
        (b'{"dtype":"uint8","shape":[true]}', "bad shape"),
        (b'{"dtype":"uint8","shape":[1.0]}', "bad shape"),
        (b'{"dtype":"uint8","shape":[' + b"1," * 64 + b"1]}", "bad shape"),  # 65 dimensions
        (b'{"dtype":["uint8"],"shape":[1]}', "unknown dtype"),
        ('{"dtype":"uint8","shape":[1]}'.encode("utf-16"), "not UTF-8 JSON"),
        (b'{"dtype":"uint8","shape":[' + b"9" * 5000 + b"]}", "JSON"),  # int too long
    ],
)
def test_tensor_decode_raises_only_tensor_format_error(
    header: bytes, message: str, framework: str
) -> None:
    with pytest.raises(TensorFormatError, match=re.escape(message)):
        decode_tensor(_frame(header, b"\x01"), framework=framework)  # type: ignore[arg-type]
    with pytest.raises(TensorFormatError, match=re.escape(message)):
        decode_tensor(_frame(header), framework=framework)  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_tensor_bool_bytes_zero_sized_and_0d(framework: str) -> None:
    bad = _frame(b'{"dtype":"bool","shape":[2]}', b"\x01\x02")
    with pytest.raises(TensorFormatError, match="bytes other than 0 and 1"):
        decode_tensor(bad, framework=framework)  # type: ignore[arg-type]
    empty, _ = decode_tensor(  # a 0 beside a large (bounded) dimension is fine
        _frame(b'{"dtype":"float32","shape":[0, 1099511627776]}'),
        framework=framework,  # type: ignore[arg-type]
    )
    assert tuple(empty.shape) == (0, 2**40)
    codec = TensorCodec(framework=framework)  # type: ignore[arg-type]
    scalar = np.array(True) if framework == "numpy" else torch.tensor(True)
    assert codec.decode(codec.encode(scalar)).shape == ()  # 0-d stays 0-d (numpy was 1-d)


def test_tensor_meta_is_never_shared_between_decodes() -> None:
    codec = TensorCodec(with_meta=True)
    raw = codec.encode(Tagged(torch.zeros(2), {"labels": [1, 2], "n": 1}))
    first = codec.decode(raw)
    first.meta["labels"].append(3)
    first.meta["n"] = 2
    assert codec.decode(raw).meta == {"labels": [1, 2], "n": 1}


def test_tensor_framework_is_checked() -> None:
    with pytest.raises(ValueError, match="framework must be"):
        TensorCodec(framework="jax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="framework must be"):
        decode_tensor(TENSOR.encode(torch.ones(1)), framework="jax")  # type: ignore[arg-type]
