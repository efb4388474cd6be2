"""The tensor wire format shared by sockets, Kafka and files: a small header and raw bytes.

Layout of one encoded tensor (all integers little-endian)::

    b"SFT1"                 4 bytes   magic and format version
    header length H         4 bytes   uint32
    header                  H bytes   UTF-8 JSON {"dtype": "float32", "shape": [2, 3],
                                      "meta": {...}} padded with spaces so the data
                                      starts at a multiple of 64 bytes
    data                    the elements in C order, exactly prod(shape) * itemsize bytes

Decoding checks every field and that the data has exactly the size the header announces, so
a header that lies about its size is a :class:`TensorFormatError`, never a bad read. On any
bytes at all, decoding returns a tensor or raises :class:`TensorFormatError`, nothing else:
the header is at most :data:`MAX_HEADER` bytes of UTF-8 JSON, an object nested at most
:data:`MAX_HEADER_DEPTH` deep (checked before parsing); ``dtype`` is a name from the table;
``shape`` is a list of at most :data:`MAX_NDIM` ints (not bools, not floats), each ``>= 0``,
whose product (a 0 counted as 1) times the item size is at most :data:`MAX_NBYTES`; ``meta``
is an object; a ``bool`` tensor's bytes are 0 or 1. Whatever decodes encodes back to the same
tensor and meta. Nothing is ever pickled.

Encoding a contiguous CPU tensor copies nothing (:meth:`TensorCodec.encode_parts`
hands out a view of its memory); decoding into torch copies nothing when the buffer is
writable (a ``bytearray``, as the socket connectors produce) and copies once from ``bytes``
(Kafka, MQTT) or when the data is not aligned to its item size (the encoder always aligns
it); decoding into numpy never copies (the array is read-only over ``bytes``).
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .codecs import Buffer, json_depth

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
"""Longest header accepted, in bytes."""
MAX_HEADER_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a header (the header object is 1)."""
MAX_NDIM = 64
"""Most dimensions accepted."""
MAX_NBYTES = 1 << 48
"""Largest ``prod(shape) * itemsize`` accepted, 0-sized dimensions counted as 1 (so an empty
tensor cannot claim dimensions whose strides overflow)."""
_FRAMEWORKS = ("torch", "numpy")

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

    ``buf`` is any bytes-like object. Each call returns its own ``meta`` dict.

    :raises TensorFormatError: the bytes are not exactly one valid encoded tensor (see the
        module docstring for what is checked); this is the only exception for any bytes.
    :raises ValueError: ``framework`` is neither ``"torch"`` nor ``"numpy"``.
    """
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.c_contiguous and view.ndim else memoryview(view.tobytes())
    elif not view.c_contiguous:  # a strided slice
        view = memoryview(view.tobytes())
    dtype, shape, meta, start, nbytes = _parse(view)
    if dtype == "bool" and bytes(view[start:]).translate(None, b"\0\1"):
        raise TensorFormatError("bool tensor holds bytes other than 0 and 1")
    if framework == "numpy":
        return _to_numpy(view, dtype, shape, start, nbytes), meta
    if framework != "torch":
        raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
    import torch

    tdtype = getattr(torch, dtype)
    try:
        if nbytes == 0:
            return torch.empty(shape, dtype=tdtype), meta
        itemsize = _DTYPES[dtype][0]
        if view.readonly or start % itemsize:  # torch cannot alias immutable memory: copy once
            view = memoryview(bytearray(view[start : start + nbytes]))  # (and aligned)
            start = 0
        tensor = torch.frombuffer(view, dtype=tdtype, count=nbytes // itemsize, offset=start)
        # frombuffer gives the 1-D tensor already; reshape costs about 1 us even when a no-op
        return (tensor if len(shape) == 1 else tensor.reshape(shape)), meta
    except (RuntimeError, TypeError, ValueError) as exc:  # a guard: _parse admits no such shape
        if isinstance(exc, TensorFormatError):
            raise
        raise TensorFormatError(f"cannot build a {dtype}{list(shape)} tensor: {exc}") from exc


def _to_numpy(
    view: memoryview, dtype: str, shape: tuple[int, ...], start: int, nbytes: int
) -> np.ndarray[Any, Any]:
    import numpy as np

    numpy_name = _DTYPES[dtype][1]
    if numpy_name is None:
        raise TensorFormatError(f"dtype {dtype} has no numpy equivalent; decode with torch")
    try:
        array = np.frombuffer(
            view,
            dtype=np.dtype(numpy_name).newbyteorder("<"),
            count=nbytes // _DTYPES[dtype][0],
            offset=start,
        )
        return array.reshape(shape)
    except (TypeError, ValueError) as exc:  # e.g. more dimensions than this numpy allows
        if isinstance(exc, TensorFormatError):
            raise
        raise TensorFormatError(f"cannot build a {dtype}{list(shape)} array: {exc}") from exc


_Header = tuple[str, tuple[int, ...], dict[str, Any], int]
_HEADERS: dict[bytes, _Header] = {}
_HEADER_CACHE = 256  # streams repeat a few headers: parse each JSON header once
_SCALARS = (str, int, float, bool, type(None))


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
        # cache only headers whose meta a caller cannot change for the next decode: a shallow
        # copy of flat meta is a fresh value, nested lists and dicts would be shared
        if all(type(v) in _SCALARS for v in parsed[2].values()):
            if len(_HEADERS) >= _HEADER_CACHE:
                _HEADERS.clear()
            _HEADERS[key] = parsed
            meta = dict(parsed[2]) if parsed[2] else {}
        else:
            meta = parsed[2]
    else:
        meta = dict(parsed[2]) if parsed[2] else {}
    dtype, shape, _, nbytes = parsed
    if nbytes != len(view) - start:
        raise TensorFormatError(
            f"header says {dtype}{list(shape)} = {nbytes} bytes of data, "
            f"the buffer holds {len(view) - start}"
        )
    return dtype, shape, meta, start, nbytes


def _parse_header(text: bytes) -> _Header:
    if text.count(b"[") + text.count(b"{") > MAX_HEADER_DEPTH:
        depth = json_depth(text)
        if depth > MAX_HEADER_DEPTH:
            raise TensorFormatError(f"header nested {depth} deep (limit {MAX_HEADER_DEPTH})")
    try:
        header = json.loads(text.decode())  # UTF-8 only: json.loads(bytes) would guess
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise TensorFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFormatError("header is not a JSON object")
    dtype, shape, meta = header.get("dtype"), header.get("shape"), header.get("meta", {})
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise TensorFormatError(f"unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d <= MAX_NBYTES for d in shape)
    ):
        raise TensorFormatError(f"bad shape {_short(shape)}")
    itemsize = _DTYPES[dtype][0]
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_NBYTES:
        raise TensorFormatError(f"shape {_short(shape)} spans more than {MAX_NBYTES} bytes")
    if not isinstance(meta, dict):
        raise TensorFormatError("meta is not a JSON object")
    return dtype, tuple(shape), meta, math.prod(shape) * itemsize


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    shape = list(a.shape)  # before ascontiguousarray, which makes a 0-d array 1-d
    return name, shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


class TensorCodec:
    """Codec for the tensor wire format (see the module docstring).

    ``decode`` returns a torch tensor (``framework="numpy"``: a numpy array); with
    ``with_meta=True`` it returns :class:`Tagged` ``(tensor, meta)``. On any bytes it raises
    only :class:`TensorFormatError` (a ``ValueError``). ``encode`` takes a tensor, an array or a
    :class:`Tagged` (``TypeError`` for anything else), and accepts whatever ``decode`` returned.
    """

    name = "tensor"

    def __init__(
        self, *, framework: Literal["torch", "numpy"] = "torch", with_meta: bool = False
    ) -> None:
        if framework not in _FRAMEWORKS:
            raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
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
