"""Calling a part's layers one after another with less Python per layer.

``nn.Module.__call__`` goes through two Python frames and packs ``*args``/``**kwargs`` before
it reaches ``forward`` even when no hook is registered. At batch 1 that is a noticeable share
of a small layer's time, and pipeline parts run on threads that share one GIL, so it is paid
twice. :func:`layer_chain` calls each layer's ``forward`` directly, but only while the checks
``__call__`` itself makes (hooks on the layer, global hooks, ``torch.compile``, tracing) find
nothing; otherwise the layer is called as usual, so hooks registered at any time still run.

For the common layers whose ``forward`` is one torch operator (``Linear``, convolutions,
``ReLU``, ``GELU``, ``Tanh``, ``Sigmoid``, ``Flatten``, ``Identity``; exactly these classes,
not subclasses), the chain calls that operator itself with the layer's current parameters and
settings: the same call ``forward`` makes, without its frame and its ``self.weight`` lookups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["layer_call", "layer_chain"]

_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
_LAYER_ATTRS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_compiled_call_impl",
)
_CONV: dict[type[nn.Module], Callable[..., Any]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
_UNARY: dict[type[nn.Module], Callable[[Any], Any]] = {
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
}
_has_torch_function = torch._C._has_torch_function_unary
_linear, _gelu, _relu = F.linear, F.gelu, torch.relu


def layer_chain(module: nn.Module) -> Callable[[Any], Any]:
    """``module`` itself, or for a plain ``nn.Sequential`` a function equal to ``module(x)``
    that skips ``__call__``'s bookkeeping for layers without hooks."""
    layers = list(module) if type(module) is nn.Sequential else []
    is_tracing = getattr(torch._C, "_is_tracing", None)
    if (
        not layers
        or is_tracing is None
        or not all(hasattr(_module, name) for name in _GLOBAL_HOOKS)
        or not all(hasattr(m, a) for m in (module, *layers) for a in _LAYER_ATTRS)
        or any(type(m).__call__ is not nn.Module.__call__ for m in layers)
    ):
        return module  # another torch than the one this was written for: the plain call
    hooks = [getattr(_module, name) for name in _GLOBAL_HOOKS]  # dicts torch mutates in place
    steps = [(m, _direct(m) or m.forward) for m in layers]

    def chain(x: Any) -> Any:
        if any(hooks) or is_tracing() or _hooked(module):
            return module(x)
        for m, step in steps:  # _hooked(m), inlined: this is the per-layer cost being saved
            if (
                m._forward_hooks
                or m._forward_pre_hooks
                or m._backward_hooks
                or m._backward_pre_hooks
                or m._compiled_call_impl is not None
            ):
                x = m(x)
            else:
                x = step(x)
        return x

    return chain


def layer_call(m: nn.Module) -> Callable[[Any], Any]:
    """What a part calls for layer ``m`` as things stand (the profiler times this)."""
    return m if _hooked(m) else _direct(m) or m.forward


def _direct(m: nn.Module) -> Callable[[Any], Any] | None:
    """The one torch call ``m.forward`` makes, reading ``m``'s parameters and settings at
    each call as ``forward`` does; None for any other layer."""
    kind = type(m)
    layer: Any = m  # its settings are read at each call, as forward reads them
    params: dict[str, Any] = m._parameters
    if kind is nn.Linear:

        def linear(x: Any) -> Any:
            if "weight" not in params or "bias" not in params:  # replaced by a buffer, say
                return layer.forward(x)
            return _linear(x, params["weight"], params["bias"])

        return linear
    conv = _CONV.get(kind)
    if conv is not None:

        def convolve(x: Any) -> Any:
            if layer.padding_mode != "zeros" or "weight" not in params or "bias" not in params:
                return layer.forward(x)
            return conv(
                x,
                params["weight"],
                params["bias"],
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )

        return convolve
    if kind is nn.ReLU:  # F.relu is Python: it hands tensor subclasses to __torch_function__
        return lambda x: layer.forward(x) if layer.inplace or _has_torch_function(x) else _relu(x)
    if kind is nn.GELU:
        return lambda x: _gelu(x, approximate=layer.approximate)
    unary = _UNARY.get(kind)
    if unary is not None:
        return unary
    if kind is nn.Flatten:
        return lambda x: x.flatten(layer.start_dim, layer.end_dim)
    if kind is nn.Identity:
        return lambda x: x
    return None


def _hooked(m: nn.Module) -> bool:
    """What makes ``m.__call__`` do more than call ``m.forward``."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or m._compiled_call_impl is not None
    )
