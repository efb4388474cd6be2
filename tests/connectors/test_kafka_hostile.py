"""Kafka against what other producers send and what the libraries log: tombstones stay
tombstones, and a SASL password never reaches a log record."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaProducer
from streamflow.connectors.kafka import KafkaMessage, KafkaSink, KafkaSource, Security

import streamflow as sf
from streamflow import connectors

from ._kafka import create_topic, read_all
from ._wait import until
from .conftest import answers

pytestmark = pytest.mark.asyncio


async def test_a_tombstone_stays_a_tombstone_through_a_flow(kafka: str, name: str) -> None:
    """A null value (a delete marker on a compacted topic) is not an empty value: it reaches
    the flow as a record whose raw is None, decodes to None, and is produced as null again."""
    source_topic, out_topic = f"{name}-in", f"{name}-out"
    await create_topic(kafka, source_topic)
    await create_topic(kafka, out_topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        for key, value in ((b"a", b'{"v":1}'), (b"b", None), (b"c", b""), (b"d", None)):
            await (await producer.send(source_topic, value, key=key))
    finally:
        await producer.stop()

    records: list[connectors.Record] = []
    flow = sf.Flow("tombstones")
    read = flow.source("kafka", KafkaSource(source_topic, name, kafka, codec=connectors.JSON))
    read.sink("seen", sf.collect(records))
    read.sink("forward", KafkaSink(out_topic, kafka))
    async with flow.start() as running:
        await until(lambda: len(records) == 4)
        await running.stop()
    by_key = {r.key: r for r in records}
    assert by_key[b"b"].raw is None and by_key[b"d"].raw is None
    assert by_key[b"c"].raw == b""
    assert connectors.decode(by_key[b"b"]) is None  # whatever the codec
    assert connectors.decode_batch([by_key[b"a"], by_key[b"d"]]) == [{"v": 1}, None]
    assert "tombstone" in repr(by_key[b"b"]) and len(by_key[b"b"]) == 0
    with pytest.raises(ValueError, match="tombstone"):
        by_key[b"b"].data()

    produced = {r.key: r.value for r in await read_all(kafka, out_topic, 4)}
    assert produced == {b"a": b'{"v":1}', b"b": None, b"c": b"", b"d": None}

    # a KafkaMessage with value None produces a tombstone for its key
    explicit = f"{name}-explicit"
    await create_topic(kafka, explicit)
    flow = sf.Flow("delete")
    flow.source("items", [KafkaMessage(None, key="gone"), KafkaMessage({"v": 2}, key="kept")]).sink(
        "kafka", KafkaSink(explicit, kafka, codec=connectors.JSON)
    )
    await flow.run()
    assert {r.key: r.value for r in await read_all(kafka, explicit, 2)} == {
        b"gone": None,
        b"kept": b'{"v":2}',
    }


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


@pytest.fixture
def aiokafka_debug() -> Iterator[_Records]:
    """Standard-library DEBUG logging on aiokafka's loggers, captured."""
    handler = _Records()
    logger = logging.getLogger("aiokafka")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


async def test_the_sasl_password_never_reaches_aiokafkas_debug_log(
    kafka: str, name: str, aiokafka_debug: _Records
) -> None:
    port = int(os.environ.get("KAFKA_SASL_PORT", "9094"))
    if not answers(port):
        pytest.skip(f"the running Kafka has no SASL listener on {port} (not .ci/kafka.sh's)")
    sasl = f"127.0.0.1:{port}"
    secret = "streamflow-secret"
    security = Security("SASL_PLAINTEXT", mechanism="PLAIN", username="streamflow", password=secret)
    await create_topic(kafka, name)
    flow = sf.Flow("produce")
    flow.source("items", [b"x", b"y"]).sink("kafka", KafkaSink(name, sasl, security=security))
    await flow.run()
    out: list[connectors.Record] = []
    flow = sf.Flow("consume")
    flow.source("kafka", KafkaSource(name, name, sasl, security=security)).sink(
        "out", sf.collect(out)
    )
    async with flow.start() as running:
        await until(lambda: len(out) == 2)
        await running.stop()

    sasl_lines = [m for m in aiokafka_debug.messages if "SaslAuthenticateRequest" in m]
    assert sasl_lines, "aiokafka logged no SASL request: the test would prove nothing"
    assert all("***" in m for m in sasl_lines)
    assert not [m for m in aiokafka_debug.messages if secret in m]
