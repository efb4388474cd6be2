"""Find what a ``MODULE:ATTR`` names for the ``streamflow`` command: a flow, or a model."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ._errors import describe_item
from ._graph import Flow

__all__ = ["TargetError", "UsageError", "load", "resolve_flow", "resolve_value"]


class UsageError(Exception):
    """A mistake on the command line (exit status 2)."""


class TargetError(Exception):
    """The user's code raised while it was imported or called (exit status 1); the cause
    is ``__cause__``."""


def _import(module: str) -> ModuleType:
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise UsageError(f"no such file: {module}")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = loaded
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:
            raise TargetError(f"importing {module} failed: {type(exc).__name__}: {exc}") from exc
        return loaded
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current directory first
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import module {module!r}: {exc} (looked in the current directory "
                "and sys.path)"
            ) from None
        raise TargetError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise TargetError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc


def load(target: str) -> Any:
    """The object ``MODULE:ATTR`` names (``ATTR`` may be dotted).

    :raises UsageError: not of that form, no such module or attribute.
    :raises TargetError: importing the module raised.
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:ATTR (for example app:flow), got {target!r}")
    obj: Any = _import(module_name)
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            flows = [n for n, v in vars(_import(module_name)).items() if isinstance(v, Flow)]
            hint = f" (flows there: {', '.join(flows)})" if flows else ""
            raise UsageError(f"{where} has no attribute {part!r}{hint}") from None
    return obj


def _found(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__} {describe_item(obj)}"


async def _call(target: str, fn: Any) -> Any:
    try:
        value = fn()
        if inspect.isawaitable(value):
            value = await value
    except Exception as exc:
        raise TargetError(f"calling {target} failed: {type(exc).__name__}: {exc}") from exc
    return value


async def resolve_flow(target: str) -> Flow:
    """The :class:`~streamflow.Flow` ``target`` names, or that the (sync or async) callable
    it names returns, called with no arguments on the running loop."""
    obj = load(target)
    if isinstance(obj, Flow):
        return obj
    if not callable(obj):
        raise UsageError(
            f"{target} is {_found(obj)}: expected a streamflow.Flow or a callable returning one"
        )
    flow = await _call(target, obj)
    if not isinstance(flow, Flow):
        raise UsageError(f"{target}() returned {_found(flow)}: expected a streamflow.Flow")
    return flow


async def resolve_value(target: str, kind: type, what: str) -> Any:
    """The instance of ``kind`` that ``target`` names, or that the callable it names
    returns (``what`` names the kind in errors)."""
    obj = load(target)
    if isinstance(obj, kind):
        return obj
    if not callable(obj):
        raise UsageError(f"{target} is {_found(obj)}: expected {what} or a callable returning one")
    value = await _call(target, obj)
    if not isinstance(value, kind):
        raise UsageError(f"{target}() returned {_found(value)}: expected {what}")
    return value
