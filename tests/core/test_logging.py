"""The library's logger never raises, whatever the application's structlog set-up does."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from streamflow._logging import get_logger, jsonable


@pytest.fixture
def strict_renderer() -> Iterator[list[dict[str, Any]]]:
    """An application's structlog set-up whose renderer refuses anything but str values."""
    seen: list[dict[str, Any]] = []

    def strict(_logger: Any, _method: str, event: dict[str, Any]) -> str:
        if not all(isinstance(v, str) for v in event.values()):
            raise TypeError("only str values")
        seen.append(dict(event))
        return repr(event)

    structlog.configure(
        processors=[strict],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    try:
        yield seen
    finally:
        structlog.reset_defaults()


def test_a_value_the_renderer_refuses_is_logged_as_its_repr(
    strict_renderer: list[dict[str, Any]],
) -> None:
    get_logger().warning("connector.stop", committed={("t", 0): 3})
    assert strict_renderer == [
        {
            "event": "connector.stop",
            "committed": "{('t', 0): 3}",
            "log_error": "TypeError('only str values')",
        }
    ]


def test_a_renderer_that_always_raises_falls_back_to_stdlib_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_logger: Any, _method: str, event: dict[str, Any]) -> str:
        raise RuntimeError("renderer down")

    structlog.configure(processors=[broken], cache_logger_on_first_use=False)
    try:
        with caplog.at_level(logging.WARNING, logger="streamflow"):
            get_logger().error("stage.error", stage="s")
    finally:
        structlog.reset_defaults()
    assert "stage.error" in caplog.text and "renderer down" in caplog.text


def test_jsonable_turns_every_key_into_text() -> None:
    assert jsonable({("t", 1): {2: [("a", {None: 1})]}}) == {"t:1": {"2": [["a", {"None": 1}]]}}
