"""Child process for the crash test: consume a topic into a lines file until killed.

Run: python -m tests.connectors._crash_child BOOTSTRAP TOPIC GROUP OUTFILE
"""

from __future__ import annotations

import asyncio
import sys

from streamflow.connectors.files import LinesSink
from streamflow.connectors.kafka import KafkaSource

import streamflow as sf
from streamflow import connectors


async def pace(value: bytes) -> bytes:
    """About 3000 items/s, so the kill comes after a few periodic commits."""
    if int(value) % 3 == 0:
        await asyncio.sleep(0.001)
    return value


async def main(bootstrap: str, topic: str, group: str, out: str) -> None:
    source = KafkaSource(
        topic, group, bootstrap, max_pending=500, commit_interval=0.5, session_timeout_ms=6000
    )
    flow = sf.Flow("crash-child")
    flow.source("kafka", source).map("decode", connectors.decode).map("pace", pace).sink(
        "out", LinesSink(out, codec=connectors.BYTES)
    )
    await flow.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
