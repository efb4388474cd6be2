"""Calling a part's layers one after another with less Python per layer.

``nn.Module.__call__`` goes through two Python frames and packs ``*args``/``**kwargs`` before
it reaches ``forward`` even when no hook is registered. At batch 1 that is a noticeable share
of a small layer's time, and pipeline parts run on threads that share one GIL, so it is paid
twice. :func:`layer_chain` calls each layer's ``forward`` directly, but only while the checks
``__call__`` itself makes (hooks on the layer, global hooks, ``torch.compile``, tracing) find
nothing; otherwise the layer is called as usual, so hooks registered at any time still run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["layer_chain"]

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

    def chain(x: Any) -> Any:
        if any(hooks) or is_tracing() or _hooked(module):
            return module(x)
        for m in layers:  # _hooked(m), inlined: this is the per-layer cost being saved
            if (
                m._forward_hooks
                or m._forward_pre_hooks
                or m._backward_hooks
                or m._backward_pre_hooks
                or m._compiled_call_impl is not None
            ):
                x = m(x)
            else:
                x = m.forward(x)
        return x

    return chain


def _hooked(m: nn.Module) -> bool:
    """What makes ``m.__call__`` do more than call ``m.forward``."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or m._compiled_call_impl is not None
    )
