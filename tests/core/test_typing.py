"""Static types of the public API, checked by running mypy on small snippets."""

from __future__ import annotations

import textwrap

import pytest

api = pytest.importorskip("mypy.api")


def _mypy(code: str) -> str:
    """mypy --strict's complaints about ``code`` ("" when there are none)."""
    stdout, stderr, status = api.run(
        ["--config-file", "", "--strict", "--no-error-summary", "-c", textwrap.dedent(code)]
    )
    return stdout + stderr if status else ""


def test_a_source_of_messages_is_a_stream_of_their_values() -> None:
    """Sources that yield sf.Message envelopes (connectors, MemorySource) type their stream
    by the envelope's value, which is what the stages receive."""
    errors = _mypy(
        """
        from typing import assert_type
        import streamflow as sf
        from streamflow.testing import MemorySource

        def inc(x: int) -> int:
            return x + 1

        flow = sf.Flow("f")
        stream = flow.source("m", MemorySource([1, 2]))
        assert_type(stream, sf.Stream[int])
        stream.map("inc", inc).sink("out", print)
        assert_type(flow.source("n", [1, 2]), sf.Stream[int])
        assert_type(flow.source("e", [sf.Message("x")]), sf.Stream[str])
        """
    )
    assert errors == ""
