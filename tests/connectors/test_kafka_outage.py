"""Kafka goes away and comes back while a flow produces and another consumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from streamflow.connectors.kafka import KafkaSink, KafkaSource
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors

from ._kafka import create_topic
from .conftest import ROOT

pytestmark = pytest.mark.asyncio


async def _script(command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / ".ci" / "kafka.sh"),
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f".ci/kafka.sh {command} failed:\n{out.decode()}"


async def test_broker_restart_reconnects_and_loses_nothing_acked(kafka: str, name: str) -> None:
    total = 300
    await create_topic(kafka, name)

    async def readings() -> AsyncIterator[int]:
        for i in range(total):
            yield i
            await asyncio.sleep(0.01)

    sink = KafkaSink(name, kafka, codec=connectors.JSON, request_timeout_ms=5000)
    producing = sf.Flow("produce")
    producing.source("readings", readings()).sink("kafka", sink, concurrency=8)

    seen: list[int] = []
    source = KafkaSource(name, name, kafka, codec=connectors.JSON, commit_interval=0.2)
    consuming = sf.Flow("consume")
    consuming.source("kafka", source).map("decode", connectors.decode).sink("out", sf.collect(seen))
    with capture_logs() as logs:
        async with consuming.start() as running:
            producer = asyncio.create_task(producing.run())
            async with asyncio.timeout(20):
                while len(seen) < 50:
                    await asyncio.sleep(0.01)
            await _script("stop")
            await asyncio.sleep(1.0)
            await _script("start")
            await producer  # every item acked by the sink was confirmed by the broker
            async with asyncio.timeout(60):
                while len(set(seen)) < total:
                    await asyncio.sleep(0.05)
            await running.stop()
    assert sink.sent == total
    assert set(seen) == set(range(total))
    assert source.stats.committed[(name, 0)] == total
    events = {e["event"] for e in logs}
    assert {"connector.unreachable", "connector.reconnected"} <= events
