"""Every connector's whole life cycle under ``sf.configure_logging(json=True)``: no log event
fails a flow, and every line written is one JSON object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from streamflow.connectors.files import JsonLinesSink, JsonLinesSource
from streamflow.connectors.kafka import KafkaSink, KafkaSource
from streamflow.connectors.mqtt import MqttSink, MqttSource
from streamflow.connectors.sockets import ClientSink, ServerSource

import streamflow as sf
from streamflow import connectors

from ._kafka import create_topic
from ._wait import until

pytestmark = pytest.mark.asyncio


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """stderr, captured; each test configures JSON logging onto it, as an application does
    (inside the test: the captured stream is only open there)."""
    try:
        yield capsys
    finally:
        structlog.reset_defaults()


def _json_logging() -> None:
    sf.configure_logging(json=True, level="debug")


def _events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # each line is one JSON object
    assert all(isinstance(e, dict) and "event" in e for e in events)
    return events


async def test_kafka_source_and_sink(
    kafka: str, name: str, json_logs: pytest.CaptureFixture[str]
) -> None:
    _json_logging()
    await create_topic(kafka, name, partitions=2)
    produce = sf.Flow("produce")
    produce.source("items", [{"i": i} for i in range(10)]).sink(
        "kafka", KafkaSink(name, kafka, codec=connectors.JSON)
    )
    await produce.run()
    out: list[Any] = []
    flow = sf.Flow("consume")
    source = KafkaSource(name, name, kafka, codec=connectors.JSON)
    flow.source("kafka", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await until(lambda: len(out) == 10)
        await running.stop()
    events = _events(json_logs)
    stop = next(e for e in events if e["event"] == "connector.stop" and "committed" in e)
    assert sum(stop["committed"].values()) == 10  # (topic, partition) keys became strings
    assert {k.rpartition(":")[0] for k in stop["committed"]} == {name}
    assert [e["reason"] for e in events if e["event"] == "flow.stop"] == ["completed", "stopped"]


async def test_mqtt_source_and_sink(
    mqtt_port: int, name: str, json_logs: pytest.CaptureFixture[str]
) -> None:
    _json_logging()
    source = MqttSource(f"{name}/#", port=mqtt_port, codec=connectors.JSON)
    out: list[Any] = []
    flow = sf.Flow("sensors")
    flow.source("mqtt", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await source.wait_subscribed()
        publish = sf.Flow("publish")
        publish.source("items", [{"i": i} for i in range(5)]).sink(
            "mqtt", MqttSink(f"{name}/x", port=mqtt_port, codec=connectors.JSON)
        )
        await publish.run()
        await until(lambda: len(out) == 5)
        await running.stop()
    assert {e["event"] for e in _events(json_logs)} >= {"flow.start", "flow.stop"}


async def test_sockets_with_a_bad_frame(json_logs: pytest.CaptureFixture[str]) -> None:
    _json_logging()
    source = ServerSource(port=0, codec=connectors.JSON)
    out: list[Any] = []
    flow = sf.Flow("recv")
    flow.source("tcp", source).map("decode", connectors.decode, errors="skip").sink(
        "out", sf.collect(out)
    )
    async with flow.start() as running:
        await source.wait_listening()
        send = sf.Flow("send")
        send.source("items", [b'{"i": 1}', b"\xff not json", b'{"i": 2}']).sink(
            "tcp", ClientSink(port=source.port, codec=connectors.BYTES)
        )
        await send.run()
        await until(lambda: len(out) == 2)
        await running.stop()
    events = _events(json_logs)
    assert any(e["event"] == "connector.bad_record" for e in events)


async def test_files_with_a_bad_line(tmp_path: Path, json_logs: pytest.CaptureFixture[str]) -> None:
    _json_logging()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"i": 1}\n{broken\n{"i": 2}\n')
    out = tmp_path / "out.jsonl"
    flow = sf.Flow("files")
    flow.source("file", JsonLinesSource(path, checkpoint=tmp_path / "pos.json")).map(
        "decode", connectors.decode, errors="skip"
    ).sink("out", JsonLinesSink(out))
    await flow.run()
    assert out.read_text().splitlines() == ['{"i":1}', '{"i":2}']
    events = _events(json_logs)
    assert any(e["event"] == "connector.bad_record" and e["line"] == 2 for e in events)


async def test_a_value_no_renderer_can_take_never_fails_a_flow(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    """A stage error whose item and meta hold what JSON cannot (tuple keys, objects whose
    repr raises) is still logged, and the flow reports the stage's own error."""
    _json_logging()

    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    def boom(item: Any) -> Any:
        raise ValueError("bad item")

    flow = sf.Flow("opaque")
    items = [sf.Message({(1, 2): Opaque()}, meta={("a", 1): Opaque(), "x": {1, 2}})]
    flow.source("items", items).map("boom", boom).sink("out", sf.collect())
    with pytest.raises(sf.StageError, match="bad item"):
        await flow.run()
    events = _events(json_logs)
    assert any(e["event"] == "stage.error" for e in events)
