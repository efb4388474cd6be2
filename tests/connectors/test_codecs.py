"""Codecs, the tensor wire format, the in-order ack rule and the decode stage (no I/O)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

import connectors
from connectors import JSON, TEXT, CsvCodec, DecodeError, Record
from connectors._inorder import InOrder
from connectors.tensors import TENSOR, Tagged, TensorCodec, TensorFormatError, decode_tensor


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
    with pytest.raises(TypeError, match="expects a connectors.Record"):
        connectors.decode(b"raw")  # type: ignore[arg-type]
