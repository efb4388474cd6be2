"""The tensor wire format shared by sockets, Kafka and files: a small header and raw bytes.

Layout of one encoded tensor (all integers little-endian)::

    b"SFT1"                 4 bytes   magic and format version
    header length H         4 bytes   uint32
    header                  H bytes   UTF-8 JSON {"dtype": "float32", "shape": [2, 3],
                                      "meta": {...}} padded with spaces so the data
                                      starts at a multiple of 64 bytes
    data                    the elements in C order, exactly prod(shape) * itemsize bytes

Decoding checks every field and that the data has exactly the size the header announces, so
a header that lies about its size is a :class:`TensorFormatError`, never a bad read. Nothing is
ever pickled. Encoding a contiguous CPU tensor copies nothing (:meth:`TensorCodec.encode_parts`
hands out a view of its memory); decoding into torch copies nothing when the buffer is
writable (a ``bytearray``, as the socket connectors produce) and copies once from ``bytes``
(Kafka, MQTT); decoding into numpy never copies (the array is read-only over ``bytes``).
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .codecs import Buffer

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "MAGIC",
    "TENSOR",
    "Tagged",
    "TensorCodec",
    "TensorFormatError",
    "decode_tensor",
    "encode_tensor",
]

MAGIC = b"SFT1"
_PREFIX = struct.Struct("<4sI")
_ALIGN = 64
MAX_HEADER = 1 << 20
MAX_NDIM = 64

# wire name -> (itemsize, numpy name or None)
_DTYPES: dict[str, tuple[int, str | None]] = {
    "bool": (1, "bool"),
    "uint8": (1, "uint8"),
    "int8": (1, "int8"),
    "int16": (2, "int16"),
    "int32": (4, "int32"),
    "int64": (8, "int64"),
    "float16": (2, "float16"),
    "bfloat16": (2, None),
    "float32": (4, "float32"),
    "float64": (8, "float64"),
    "complex64": (8, "complex64"),
    "complex128": (16, "complex128"),
}


class TensorFormatError(ValueError):
    """Bytes that are not a valid encoded tensor (bad magic, header, dtype, shape or size)."""


class Tagged(NamedTuple):
    """A tensor with JSON metadata that travels in its header."""

    tensor: Any
    meta: dict[str, Any]


def encode_tensor(value: Any, meta: dict[str, Any] | None = None) -> list[Buffer]:
    """Encode a torch tensor or numpy array: ``[prefix_and_header, data]``.

    ``data`` is a zero-copy view of the tensor's memory when it is a contiguous,
    little-endian CPU tensor (otherwise of a contiguous copy). Keep the tensor unchanged until
    the parts are written. ``meta`` must be JSON-serialisable.
    """
    dtype, shape, data = _raw_view(value)
    header: dict[str, Any] = {"dtype": dtype, "shape": shape}
    if meta:
        header["meta"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    pad = -(_PREFIX.size + len(text)) % _ALIGN
    text += b" " * pad
    return [_PREFIX.pack(MAGIC, len(text)) + text, data]


def decode_tensor(
    buf: Buffer, *, framework: Literal["torch", "numpy"] = "torch"
) -> tuple[Any, dict[str, Any]]:
    """Decode one encoded tensor: ``(tensor, meta)`` (``meta`` is ``{}`` when absent).

    :raises TensorFormatError: the bytes are not exactly one valid encoded tensor.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    dtype, shape, meta, start, nbytes = _parse(view)
    if framework == "numpy":
        import numpy as np

        numpy_name = _DTYPES[dtype][1]
        if numpy_name is None:
            raise TensorFormatError(f"dtype {dtype} has no numpy equivalent; decode with torch")
        count = math.prod(shape)
        array = np.frombuffer(
            view, dtype=np.dtype(numpy_name).newbyteorder("<"), count=count, offset=start
        )
        return array.reshape(shape), meta
    import torch

    tdtype = getattr(torch, dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=tdtype), meta
    if view.readonly:  # torch cannot alias immutable memory: copy once
        view = memoryview(bytearray(view[start : start + nbytes]))
        start = 0
    tensor = torch.frombuffer(view, dtype=tdtype, count=math.prod(shape), offset=start)
    # frombuffer gives the 1-D tensor already; reshape costs about 1 us even when a no-op
    return (tensor if len(shape) == 1 else tensor.reshape(shape)), meta


_HEADERS: dict[bytes, tuple[str, tuple[int, ...], dict[str, Any], int]] = {}
_HEADER_CACHE = 256  # streams repeat a few headers: parse each JSON header once


def _parse(view: memoryview) -> tuple[str, tuple[int, ...], dict[str, Any], int, int]:
    if len(view) < _PREFIX.size:
        raise TensorFormatError(f"{len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise TensorFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(view):
        raise TensorFormatError(
            f"header length {hlen} does not fit the {len(view)}-byte buffer (limit {MAX_HEADER})"
        )
    start = _PREFIX.size + hlen
    key = bytes(view[_PREFIX.size : start])
    parsed = _HEADERS.get(key)
    if parsed is None:
        parsed = _parse_header(key)
        if len(_HEADERS) >= _HEADER_CACHE:
            _HEADERS.clear()
        _HEADERS[key] = parsed
    dtype, shape, meta, nbytes = parsed
    if nbytes != len(view) - start:
        raise TensorFormatError(
            f"header says {dtype}{list(shape)} = {nbytes} bytes of data, "
            f"the buffer holds {len(view) - start}"
        )
    return dtype, shape, dict(meta) if meta else {}, start, nbytes


def _parse_header(text: bytes) -> tuple[str, tuple[int, ...], dict[str, Any], int]:
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise TensorFormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFormatError("header is not a JSON object")
    dtype, shape, meta = header.get("dtype"), header.get("shape"), header.get("meta", {})
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise TensorFormatError(f"unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise TensorFormatError(f"bad shape {shape!r}")
    if not isinstance(meta, dict):
        raise TensorFormatError("meta is not a JSON object")
    return dtype, tuple(shape), meta, math.prod(shape) * _DTYPES[dtype][0]


def _raw_view(value: Any) -> tuple[str, list[int], memoryview]:
    module = type(value).__module__
    if module.startswith("torch"):
        return _torch_view(value)
    if module.startswith("numpy"):
        return _numpy_view(value)
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _torch_view(t: torch.Tensor) -> tuple[str, list[int], memoryview]:
    import torch

    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype {t.dtype} is not supported by the tensor codec")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    flat = t.reshape(-1).view(torch.uint8)
    return dtype, list(t.shape), flat.numpy().data


def _numpy_view(a: np.ndarray[Any, Any]) -> tuple[str, list[int], memoryview]:
    import numpy as np

    name = a.dtype.name
    if name not in _DTYPES or _DTYPES[name][1] is None:
        raise TypeError(f"dtype {a.dtype} is not supported by the tensor codec")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.ascontiguousarray(a)
    return name, list(a.shape), a.reshape(-1).view(np.uint8).data


class TensorCodec:
    """Codec for the tensor wire format (see the module docstring).

    ``decode`` returns a torch tensor (``framework="numpy"``: a numpy array); with
    ``with_meta=True`` it returns :class:`Tagged` ``(tensor, meta)``. ``encode`` takes a tensor,
    an array or a :class:`Tagged`.
    """

    name = "tensor"

    def __init__(
        self, *, framework: Literal["torch", "numpy"] = "torch", with_meta: bool = False
    ) -> None:
        self.framework = framework
        self.with_meta = with_meta

    def encode_parts(self, value: Any, /) -> list[Buffer]:
        """The encoding as buffers to write in order, without joining them (zero-copy)."""
        if isinstance(value, Tagged):
            return encode_tensor(value.tensor, value.meta)
        return encode_tensor(value)

    def encode(self, value: Any, /) -> bytes:
        return b"".join(self.encode_parts(value))

    def decode(self, raw: Buffer, /) -> Any:
        tensor, meta = decode_tensor(raw, framework=self.framework)
        return Tagged(tensor, meta) if self.with_meta else tensor

    def __repr__(self) -> str:
        return f"TensorCodec(framework={self.framework!r}, with_meta={self.with_meta})"


TENSOR = TensorCodec()
"""Tensor codec decoding to torch tensors."""
