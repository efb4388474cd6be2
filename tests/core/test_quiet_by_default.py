"""The library prints nothing below warning unless the application configures logging."""

from __future__ import annotations

import subprocess
import sys

FLOW = """
import asyncio
import streamflow as sf

def halve(n: int) -> int:
    if n == 7:
        raise ValueError("seven")
    return n // 2

async def main() -> None:
    out: list[int] = []
    flow = sf.Flow("quiet")
    flow.source("n", sf.iterate(range(20))).map("halve", halve, errors="skip").sink(
        "out", sf.collect(out)
    )
    await flow.run()
    assert len(out) == 19

asyncio.run(main())
"""


def run(prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", prefix + FLOW], capture_output=True, text=True, timeout=60
    )


def test_a_flow_without_logging_configured_prints_only_warnings() -> None:
    result = run("")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no flow.start / flow.stop
    # the skipped item is a warning: the stdlib's last-resort handler shows it, and only it
    assert result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("stage.error")
    ]
    assert "flow.start" not in result.stderr and "stage.error" in result.stderr


def test_configured_stdlib_logging_shows_info_events() -> None:
    result = run("import logging; logging.basicConfig(level=logging.INFO)\n")
    assert result.returncode == 0, result.stderr
    assert "INFO:streamflow:flow.start flow='quiet'" in result.stderr
    assert "WARNING:streamflow:stage.error" in result.stderr


def test_configure_logging_turns_the_events_on() -> None:
    result = run("import streamflow as sf; sf.configure_logging(level='info')\n")
    assert result.returncode == 0, result.stderr
    assert "flow.start" in result.stderr and "flow.stop" in result.stderr
