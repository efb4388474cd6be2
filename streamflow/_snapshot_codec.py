"""Turning stage state into bytes a checkpoint can hold, and back, without pickle.

State is plain data: ``None``, ``bool``, ``int``, ``float`` (also ``nan`` and ``inf``),
``str``, ``bytes``, ``list``, ``tuple``, ``dict`` (any hashable keys of these types) and
tensors (``torch.Tensor``). Tensors go to a safetensors file; everything else to JSON, with
tensors replaced by references. Anything else is refused with a :class:`StateTypeError`
that names where it was found, so a checkpoint never holds what it cannot restore.
"""

from __future__ import annotations

import base64
import json
import math
from itertools import chain
from typing import Any, cast

__all__ = ["StateTypeError", "decode_state", "encode_state"]

_TAG = "$sf"  # the key marking an encoded value that JSON has no type for


class StateTypeError(TypeError):
    """State of a type a checkpoint cannot store safely (it would need pickle)."""


_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN = _SCALARS | {float}
_NUMBERS = frozenset({int, float, bool})


class _Refused(Exception):
    """A value the fast encoder cannot store (the slow one finds where, for the message)."""


def encode_state(state: Any, where: str) -> tuple[str, dict[str, Any]]:
    """``state`` as JSON text and the tensors it references (``{name: tensor}``).

    Lists of plain scalars (the columns of a large state) are taken whole, without a call
    per element.

    :raises StateTypeError: ``state`` holds a value of another type; the message names
        ``where`` (the stage) and the path to the value.
    """
    tensors: dict[str, Any] = {}
    try:
        text = json.dumps(_enc(state, tensors))
        tensors.pop(_SEEN, None)
        tensors.pop(_STORAGES, None)
        return text, tensors
    except _Refused:
        tensors.clear()
        _enc_at(state, "", where)  # raises StateTypeError, naming the path
        raise AssertionError("unreachable") from None


def _enc(value: Any, tensors: dict[str, Any]) -> Any:
    t = type(value)
    if t in _SCALARS:
        return value
    if t is float:
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    if t is list:
        types = set(map(type, value))
        if types <= _SCALARS or (
            types <= _PLAIN and all(map(math.isfinite, _floats(value, types)))
        ):
            return value
        if types == {list} and _plain(list(chain.from_iterable(value))):
            return value  # a column of lists of plain values, e.g. [sum, n]
        if types == {tuple} and _plain(list(chain.from_iterable(value))):
            return {_TAG: "tuples", "v": list(map(list, value))}  # e.g. a column of (sum, n)
        return [_enc(v, tensors) for v in value]
    if t is tuple:
        return {_TAG: "tuple", "v": [_enc(v, tensors) for v in value]}
    if t is dict:
        if all(type(k) is str and k != _TAG for k in value):
            return {k: _enc(v, tensors) for k, v in value.items()}
        return {_TAG: "dict", "v": [[_enc(k, tensors), _enc(v, tensors)] for k, v in value.items()]}
    if isinstance(value, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode()}
    if _is_tensor(value):
        return {_TAG: "tensor", "v": _tensor_name(value, tensors)}
    for base in _BASES:  # a subclass (an IntEnum, an OrderedDict, ...) as its base type
        if isinstance(value, base):
            return _enc(cast(Any, base)(value), tensors)
    raise _Refused


_BASES = (bool, int, float, str, list, tuple, dict)


def _tensor_name(value: Any, tensors: dict[str, Any]) -> str:
    """The name ``value`` is stored under: the same tensor twice is stored once, and a
    tensor sharing memory with one stored already (a view) is copied (safetensors stores
    no shared memory)."""
    seen = tensors.setdefault(_SEEN, {})
    name = seen.get(id(value))
    if name is not None:
        return str(name)
    tensor = value.detach().cpu().contiguous()
    storages = tensors.setdefault(_STORAGES, set())
    ptr = tensor.untyped_storage().data_ptr()
    if ptr in storages:
        tensor = tensor.clone()
        ptr = tensor.untyped_storage().data_ptr()
    storages.add(ptr)
    name = f"t{len(tensors) - 2}"
    tensors[name] = tensor
    seen[id(value)] = name
    return name


_SEEN, _STORAGES = "$seen", "$storages"  # the encoder's bookkeeping, removed at the end


def _floats(values: list[Any], types: set[type]) -> Any:
    """The values to check for finiteness (all of them when they are all numbers)."""
    return values if types <= _NUMBERS else (v for v in values if type(v) is float)


def _plain(values: list[Any]) -> bool:
    types = set(map(type, values))
    return types <= _SCALARS or (
        types <= _PLAIN and all(map(math.isfinite, _floats(values, types)))
    )


def _enc_at(value: Any, path: str, where: str) -> None:
    """Walk ``value`` as the encoder does, and raise :class:`StateTypeError` at the first
    value it cannot store (only called once the fast encoder refused one)."""
    if value is None or isinstance(value, bool | str | int | float | bytes | bytearray):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _enc_at(v, f"{path}[{i}]", where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _enc_at(k, f"{path} key", where)
            _enc_at(v, f"{path}[{k!r}]", where)
        return
    if _is_tensor(value):
        return
    raise StateTypeError(
        f"{where}: cannot checkpoint {path or 'the state'}: a {type(value).__qualname__} "
        "(a checkpoint holds None, bool, int, float, str, bytes, lists, tuples, dicts "
        "and tensors; convert it, e.g. in the stage's snapshot())"
    )


def decode_state(text: str, tensors: dict[str, Any]) -> Any:
    """The state :func:`encode_state` encoded (tensors looked up in ``tensors``)."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            if set(map(type, value)) <= _PLAIN:
                return value
            return [dec(v) for v in value]
        if not isinstance(value, dict):
            return value
        tag = value.get(_TAG)
        if tag is None:
            return {k: dec(v) for k, v in value.items()}
        inner = value["v"]
        if tag == "float":
            return float(inner)
        if tag == "tuple":
            return tuple(dec(v) for v in inner)
        if tag == "tuples":
            return [tuple(v) for v in inner]
        if tag == "dict":
            return {_hashable(dec(k)): dec(v) for k, v in inner}
        if tag == "bytes":
            return base64.b64decode(inner)
        if tag == "tensor":
            return tensors[inner]
        raise ValueError(f"unknown encoded value {tag!r}")

    return dec(json.loads(text))


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def _is_tensor(value: Any) -> bool:
    module = type(value).__module__
    if not module.startswith("torch"):
        return False
    import torch

    return isinstance(value, torch.Tensor)
