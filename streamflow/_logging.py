"""Logging: the library's logger, which never fails a flow, and a set-up for applications.

Every module of streamflow and its connectors logs through :func:`get_logger`. A log call
never raises: if the application's processors or renderer cannot handle a value (a dict with
tuple keys under a JSON renderer, an object whose ``__repr__`` raises), the event is logged
again with every value as a safe ``repr``, and if that fails too it goes to the standard
``logging`` module. A flow must never fail because of how it was logged.

Quiet by default, the standard library's convention for libraries: until the application
configures structlog (itself, or with :func:`configure_logging`), events go to the standard
``logging`` logger of their name (``"streamflow"``) as ``event key=value ...`` lines, so
with no logging set up only warnings and errors reach stderr (through ``logging``'s
last-resort handler), and ``logging.basicConfig(level=logging.INFO)`` shows the rest.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog

__all__ = ["configure_logging"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def safe_repr(value: object) -> str:
    """``repr(value)``, or a placeholder naming its type when ``__repr__`` itself raises."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} (repr failed)>"


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` with every mapping key turned into a string, recursively (JSON has only
    string keys); values JSON cannot hold are left for the renderer's ``default``."""
    if depth > 32:
        return safe_repr(value)
    if isinstance(value, Mapping):
        return {
            k if isinstance(k, str) else _key(k): jsonable(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, depth + 1) for v in value]
    return value


def _key(key: object) -> str:
    if isinstance(key, tuple):  # (topic, partition) -> "topic:partition"
        return ":".join(str(k) for k in key)
    return str(key)


def _jsonable_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = jsonable(event)
    return result


class Logger:
    """A structlog logger whose calls never raise (see the module docstring)."""

    __slots__ = ("_log", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._log = structlog.get_logger(name)

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        if not structlog.is_configured():
            self._stdlib(method, event, fields)
            return
        try:
            getattr(self._log, method)(event, **fields)
        except Exception as exc:
            safe = {k: safe_repr(v) for k, v in fields.items()}
            try:
                getattr(self._log, method)(event, **safe, log_error=safe_repr(exc))
            except Exception:
                logging.getLogger(self._name).log(
                    _LEVELS[method], "%s %s (log_error=%s)", event, safe, safe_repr(exc)
                )

    def _stdlib(self, method: str, event: str, fields: dict[str, Any]) -> None:
        logger = logging.getLogger(self._name)
        level = _LEVELS[method]
        if logger.isEnabledFor(level):
            text = " ".join([event, *(f"{k}={safe_repr(v)}" for k, v in fields.items())])
            logger.log(level, "%s", text)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def get_logger(name: str = "streamflow") -> Logger:
    """The library's logger: structlog's, made safe."""
    return Logger(name)


def configure_logging(*, json: bool = False, level: str | int = "info") -> None:
    """Configure structlog for streamflow's events (``flow.start``, ``flow.stop``,
    ``stage.error``, ``stage.retry``): key-value lines on stderr, or JSON lines with
    ``json=True`` (mapping keys become strings, other values JSON cannot hold their
    ``repr``). Applications with their own structlog set-up need not call this.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: list[Any] = (
        [_jsonable_event, structlog.processors.JSONRenderer(default=safe_repr)]
        if json
        else [structlog.dev.ConsoleRenderer(colors=False)]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
