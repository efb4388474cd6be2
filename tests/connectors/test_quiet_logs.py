"""aiokafka's complaints about a topic being auto-created stay off the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

AUTO_CREATE = """
import asyncio, sys
import streamflow as sf
from streamflow.connectors.kafka import KafkaSink, KafkaSource

async def main(bootstrap: str, topic: str) -> None:
    flow = sf.Flow("auto-create")
    flow.source("n", sf.iterate(range(20))).map("b", lambda n: str(n).encode()).sink(
        "kafka", KafkaSink(topic, bootstrap)
    )
    await flow.run()
    got = []
    source = KafkaSource(topic, topic, bootstrap)
    read = sf.Flow("read")
    read.source("kafka", source).map("decode", lambda r: r.raw).sink("out", sf.collect(got))
    async with read.start() as running:
        while len(got) < 20:
            await asyncio.sleep(0.05)
        await running.stop()
    print("read", len(got))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_writing_to_an_auto_created_topic_prints_nothing(kafka: str, name: str) -> None:
    # no logging configured in the child: the stdlib's last-resort handler would print
    # aiokafka's WARNING/ERROR records on stderr
    result = subprocess.run(
        [sys.executable, "-c", AUTO_CREATE, kafka, name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "read 20\n"
    assert result.stderr == ""


def test_auto_create_records_are_still_there_at_debug(kafka: str, name: str) -> None:
    script = "import logging; logging.basicConfig(level=logging.DEBUG)\n" + AUTO_CREATE
    result = subprocess.run(
        [sys.executable, "-c", script, kafka, name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DEBUG:aiokafka.cluster:Topic" in result.stderr
    assert "ERROR:aiokafka.cluster" not in result.stderr
