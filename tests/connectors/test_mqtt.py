"""MqttSource and MqttSink against the real mosquitto."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import ssl
import time
from typing import Any

import pytest
from streamflow.connectors.mqtt import MqttMessage, MqttSink, MqttSource
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors

from ._wait import until
from .conftest import answers, broker_script, project_tls

pytestmark = pytest.mark.asyncio


async def _publish(port: int, items: list[Any], **options: Any) -> MqttSink:
    sink = MqttSink(port=port, codec=connectors.JSON, **options)
    flow = sf.Flow("publish")
    flow.source("items", items).sink("mqtt", sink)
    await flow.run()
    return sink


async def test_wildcards_and_qos1_round_trip(mqtt_port: int, name: str) -> None:
    source = MqttSource(f"{name}/+/temp", port=mqtt_port, codec=connectors.JSON)
    out: list[Any] = []
    flow = sf.Flow("sensors")
    flow.source("mqtt", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await source.wait_subscribed()
        sink = await _publish(
            mqtt_port,
            [
                MqttMessage(f"{name}/{s}/temp", {"sensor": s, "i": i})
                for i in range(20)
                for s in "ab"
            ]
            + [MqttMessage(f"{name}/a/humidity", {"not": "matched"})],
        )
        await until(lambda: len(out) == 40)
        await asyncio.sleep(0.05)
        await running.stop()
    assert sink.sent == 41
    assert [v["i"] for v in out if v["sensor"] == "a"] == list(range(20))  # in order
    assert {v["sensor"] for v in out} == {"a", "b"}
    assert source.stats.acked == 40  # every QoS 1 message acknowledged after processing


async def test_qos1_unfinished_messages_come_again_after_a_kill(mqtt_port: int, name: str) -> None:
    """PUBACK only after processing: what the flow had not finished when it was killed is
    delivered again to the same persistent client; what it finished is not."""
    client_id = f"sf-{name}"[:60]
    topic = f"{name}/readings"
    first: list[int] = []

    async def stuck_on_5(value: Any) -> int:
        if value["i"] == 5:
            await asyncio.sleep(3600)
        return int(value["i"])

    source = MqttSource(topic, port=mqtt_port, codec=connectors.JSON, client_id=client_id)
    flow = sf.Flow("first")
    flow.source("mqtt", source).map("decode", connectors.decode).map(
        "work", stuck_on_5, concurrency=4, ordered=False
    ).sink("out", sf.collect(first))
    task = asyncio.create_task(flow.run())
    await source.wait_subscribed()
    await _publish(mqtt_port, [{"i": i} for i in range(30)], topic=topic)
    await until(lambda: len(first) >= 8)
    await asyncio.sleep(0.1)
    task.cancel()  # killed with message 5 stuck
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 5 not in first
    assert source.stats.acked == 5  # 0-4: acks go in order, so nothing after 5

    second: list[int] = []
    again = MqttSource(topic, port=mqtt_port, codec=connectors.JSON, client_id=client_id)
    flow = sf.Flow("second")
    flow.source("mqtt", again).map("decode", connectors.decode).sink("out", sf.collect(second))
    async with flow.start() as running:
        await until(lambda: {v["i"] for v in second} >= set(range(5, 30)))
        await running.stop()
    assert set(first) | {v["i"] for v in second} == set(range(30))
    assert not {v["i"] for v in second} & set(range(5))  # acked ones do not come back


async def test_qos0_drops_and_counts_when_the_flow_falls_behind(mqtt_port: int, name: str) -> None:
    release = asyncio.Event()

    async def slow(record: connectors.Record) -> connectors.Record:
        await release.wait()
        return record

    source = MqttSource(f"{name}/fast", port=mqtt_port, qos=0, max_buffered=5)
    out: list[Any] = []
    flow = sf.Flow("qos0")
    flow.source("mqtt", source).map("slow", slow, capacity=1).sink(
        "out", sf.collect(out), capacity=1
    )
    with capture_logs() as logs:
        async with flow.start() as running:
            await source.wait_subscribed()
            await _publish(mqtt_port, list(range(200)), topic=f"{name}/fast", qos=0)
            await until(lambda: source.stats.received == 200)
            release.set()
            await until(lambda: len(out) == 200 - source.stats.dropped)
            await running.stop()
    assert source.stats.dropped >= 150  # the buffer stayed at 5: the rest was dropped
    assert any(e["event"] == "connector.dropped" for e in logs)


async def test_malformed_payload_is_skipped_with_its_topic(mqtt_port: int, name: str) -> None:
    source = MqttSource(f"{name}/#", port=mqtt_port, codec=connectors.JSON)
    out: list[Any] = []
    flow = sf.Flow("bad")
    flow.source("mqtt", source).map("decode", connectors.decode, errors="skip").sink(
        "out", sf.collect(out)
    )
    with capture_logs() as logs:
        async with flow.start() as running:
            await source.wait_subscribed()
            raw = MqttSink(f"{name}/s1", port=mqtt_port)
            async with raw:
                for payload in (b'{"t": 1}', b'{"t": ', b'{"t": 3}'):
                    await raw.send(payload)
            await until(lambda: len(out) == 2)
            await running.stop()
    assert out == [{"t": 1}, {"t": 3}]
    bad = next(e for e in logs if e["event"] == "connector.bad_record")
    assert bad["source"] == f"mqtt:127.0.0.1:{mqtt_port}" and bad["topic"] == f"{name}/s1"
    assert source.stats.acked == 3  # the skipped one is finished too


async def test_broker_restart_reconnects_source_and_sink(mqtt_port: int, name: str) -> None:
    topic = f"{name}/x"
    source = MqttSource(f"{name}/#", port=mqtt_port, codec=connectors.JSON)
    got: list[int] = []
    flow = sf.Flow("outage")
    flow.source("mqtt", source).map("decode", connectors.decode).sink("out", sf.collect(got))
    sink = MqttSink(topic, port=mqtt_port, codec=connectors.JSON, timeout=1.0)
    with capture_logs() as logs:
        async with flow.start() as running, sink:
            await source.wait_subscribed()
            for i in range(10):
                await sink.send(i)
            await until(lambda: len(got) == 10)
            broker_script("mosquitto", "stop")
            sending = asyncio.create_task(_send_all(sink, range(10, 20)))
            await asyncio.sleep(0.5)
            broker_script("mosquitto", "start")
            await asyncio.wait_for(sending, 20)  # the sink reconnected and published them
            await until(lambda: source.stats.connects == 2 and source._connected.is_set())
            for i in range(20, 30):
                await sink.send(i)
            await until(lambda: set(range(20, 30)) <= set(got))
            await running.stop()
    assert sink.sent == 30
    assert set(range(10)) <= set(got)
    assert source.stats.connects == 2
    reconnected = {e["connector"] for e in logs if e["event"] == "connector.reconnected"}
    assert reconnected == {source._what(), sink._what()}


async def _send_all(sink: MqttSink, values: range) -> None:
    for value in values:
        await sink.send(value)


async def test_unreachable_broker_fails_the_flow_with_a_clear_error(brokers: None) -> None:
    flow = sf.Flow("nowhere")
    flow.source("mqtt", MqttSource("t", port=1, reconnect_timeout=0.5)).sink("out", sf.collect())
    with pytest.raises(sf.StageError, match=r"mqtt source \['t'\] \(127.0.0.1:1\): unreachable"):
        await flow.run()
    flow = sf.Flow("nowhere-out")
    flow.source("n", [json.dumps(1)]).sink("mqtt", MqttSink("t", port=1, reconnect_timeout=0.5))
    with pytest.raises(sf.StageError, match=r"mqtt sink t \(127.0.0.1:1\): unreachable"):
        await flow.run()


async def test_a_refused_login_fails_at_once_saying_so(mqtt_port: int, name: str) -> None:
    """The project's mosquitto has a listener that needs a password (.ci/mosquitto.sh)."""
    port = int(os.environ.get("MQTT_AUTH_PORT", "1884"))
    if not answers(port):
        pytest.skip(f"the running mosquitto has no password listener on {port}")
    login = {"username": "streamflow", "password": "streamflow-secret"}
    source = MqttSource(f"{name}/t", port=port, codec=connectors.JSON, **login)
    out: list[Any] = []
    flow = sf.Flow("login")
    flow.source("mqtt", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await source.wait_subscribed()
        await _publish(port, [MqttMessage(f"{name}/t", {"i": i}) for i in range(5)], **login)
        await until(lambda: len(out) == 5)
        await running.stop()

    wrong = {"username": "streamflow", "password": "not-the-password"}
    for side in ("source", "sink"):
        await _fails_at_once(
            side, f"{name}/t", port, ["refused the connection: Not authorized"], **wrong
        )


# paho-mqtt leaves the socket of a failed TLS handshake unclosed; it is collected below
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_tls_against_the_real_broker(mqtt_port: int, name: str) -> None:
    """The project's mosquitto has a TLS listener with a self-signed certificate: trusting it
    carries data; the system trust store refuses it at once, saying why."""
    port = int(os.environ.get("MQTT_TLS_PORT", "8883"))
    ca = project_tls("mosquitto", port)
    trusted = ssl.create_default_context(cafile=str(ca))
    source = MqttSource(f"{name}/t", port=port, codec=connectors.JSON, tls_context=trusted)
    out: list[Any] = []
    flow = sf.Flow("tls")
    flow.source("mqtt", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await source.wait_subscribed()
        await _publish(
            port, [MqttMessage(f"{name}/t", {"i": i}) for i in range(5)], tls_context=trusted
        )
        await until(lambda: len(out) == 5)
        await running.stop()
    assert out == [{"i": i} for i in range(5)]

    for side in ("source", "sink"):
        untrusted = ssl.create_default_context()
        await _fails_at_once(
            side,
            f"{name}/t",
            port,
            ["the TLS handshake failed", "certificate verify failed"],
            tls_context=untrusted,
        )
        gc.collect()  # here, where the leaked socket's warning is ignored


async def _fails_at_once(side: str, topic: str, port: int, why: list[str], **options: Any) -> None:
    """An MQTT source or sink with ``options`` fails its flow with AuthenticationFailed saying
    each of ``why``, well before its reconnect_timeout. (A function of its own, so that the failed
    client is garbage once it returns.)"""
    flow = sf.Flow(f"failing-{side}")
    if side == "source":
        source = MqttSource(topic, port=port, reconnect_timeout=60, **options)
        flow.source("mqtt", source).sink("out", sf.collect())
    else:
        sink = MqttSink(topic, port=port, reconnect_timeout=60, **options)
        flow.source("n", [b"x"]).sink("mqtt", sink)
    t0 = time.monotonic()
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert isinstance(info.value.cause, connectors.AuthenticationFailed)
    assert all(text in str(info.value) for text in why), str(info.value)
    assert time.monotonic() - t0 < 30  # at once, not after reconnect_timeout
