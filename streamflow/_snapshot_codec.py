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
from typing import Any

__all__ = ["StateTypeError", "decode_state", "encode_state"]

_TAG = "$sf"  # the key marking an encoded value that JSON has no type for


class StateTypeError(TypeError):
    """State of a type a checkpoint cannot store safely (it would need pickle)."""


def encode_state(state: Any, where: str) -> tuple[str, dict[str, Any]]:
    """``state`` as JSON text and the tensors it references (``{name: tensor}``).

    :raises StateTypeError: ``state`` holds a value of another type; the message names
        ``where`` (the stage) and the path to the value.
    """
    tensors: dict[str, Any] = {}

    def enc(value: Any, path: str) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
        if isinstance(value, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TAG: "tuple", "v": [enc(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if all(type(k) is str and k != _TAG for k in value):
                return {k: enc(v, f"{path}[{k!r}]") for k, v in value.items()}
            return {
                _TAG: "dict",
                "v": [[enc(k, f"{path} key"), enc(v, f"{path}[{k!r}]")] for k, v in value.items()],
            }
        if isinstance(value, bytes | bytearray):
            return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode()}
        if _is_tensor(value):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
            return {_TAG: "tensor", "v": name}
        raise StateTypeError(
            f"{where}: cannot checkpoint {path or 'the state'}: a {type(value).__qualname__} "
            "(a checkpoint holds None, bool, int, float, str, bytes, lists, tuples, dicts "
            "and tensors; convert it, e.g. in the stage's snapshot())"
        )

    return json.dumps(enc(state, "")), tensors


def decode_state(text: str, tensors: dict[str, Any]) -> Any:
    """The state :func:`encode_state` encoded (tensors looked up in ``tensors``)."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
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
