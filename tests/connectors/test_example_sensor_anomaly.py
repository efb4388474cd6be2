"""examples/sensor_anomaly end to end against the real brokers."""

from __future__ import annotations

import json

import pytest
from streamflow.connectors.mqtt import MqttSink

from examples.sensor_anomaly.app import Settings, build
from examples.sensor_anomaly.sensors import publish_readings

from ._kafka import read_all
from ._wait import until

pytestmark = pytest.mark.asyncio


async def test_anomalies_published_over_mqtt_reach_the_kafka_topic(
    kafka: str, mqtt_port: int, name: str
) -> None:
    settings = Settings(prefix=name, topic=f"{name}-anomalies", mqtt_port=mqtt_port, kafka=kafka)
    flow, source = build(settings)
    async with flow.start() as running:
        await source.wait_subscribed()
        async with MqttSink(f"{name}/s9/reading", port=mqtt_port) as raw:
            await raw.send(b"{not json")  # a broken sensor: skipped, logged
        injected = await publish_readings(
            name, sensors=4, readings=100, anomalies=5, port=mqtt_port
        )
        await until(lambda: running.metrics()["validate"].items_in == 400, within=30)
        await running.stop()
    metrics = flow.metrics()
    assert metrics["decode"].skipped == 1
    assert metrics["score"].items_in >= 400 // settings.window
    found = await read_all(kafka, settings.topic, len(injected))
    flagged = {(v["sensor"], v["seq"]) for v in (json.loads(r.value) for r in found)}
    assert flagged == injected
    assert metrics["kafka"].items_out == len(injected)
    assert {r.key for r in found} <= {b"s0", b"s1", b"s2", b"s3"}
    assert source.stats.acked == 401  # every QoS 1 reading acked after its window was done
