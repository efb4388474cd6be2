"""The aiostream extra: a stream as a source, operators inside a stage, kept out of the core."""

import subprocess
import sys

import pytest
from aiostream import pipe, stream

import streamflow as sf
from streamflow.contrib.aiostream import each, source
from streamflow.testing import MemorySource


@pytest.mark.asyncio
async def test_aiostream_stream_as_source() -> None:
    out: list[int] = []
    xs = stream.range(10) | pipe.filter(lambda x: x % 2 == 0)
    flow = sf.Flow("f")
    flow.source("xs", source(xs)).map("sq", lambda x: x * x).sink("o", sf.collect(out))
    await flow.run()
    assert out == [0, 4, 16, 36, 64]


@pytest.mark.asyncio
async def test_aiostream_operators_inside_a_stage_keep_acks() -> None:
    out: list[str] = []
    src = MemorySource(["a b", "c", ""])
    flow = sf.Flow("f")
    flow.source("s", src).flat_map(
        "words", each(lambda s: stream.iterate(s.split()) | pipe.map(str.upper))
    ).sink("o", sf.collect(out))
    await flow.run()
    assert out == ["A", "B", "C"]
    assert src.acked == {0: sf.Outcome.DELIVERED, 1: sf.Outcome.DELIVERED, 2: sf.Outcome.FILTERED}


def test_core_does_not_import_aiostream() -> None:
    code = "import sys, streamflow; print('aiostream' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
