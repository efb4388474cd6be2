"""Windows over a real Kafka topic: a window holds its records' acks, so the source commits
only past records whose windows were delivered; a flow stopped with open windows and
started again in the same group loses nothing, its windows re-forming from the records
the broker sends again."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from streamflow.connectors.kafka import KafkaSource

import streamflow as sf
from streamflow import connectors

from ._kafka import committed, create_topic
from ._wait import until

pytestmark = pytest.mark.asyncio

SENSORS = ["s0", "s1", "s2", "s3"]
PER_SENSOR = 60  # readings 0.5 s apart: 30 s per sensor, six 5 s windows


async def produce_readings(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i in range(PER_SENSOR):
            for sensor in SENSORS:
                value = json.dumps({"sensor": sensor, "ts": i * 0.5, "i": i}).encode()
                futures.append(await producer.send(topic, value, key=sensor.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_stopped_with_open_windows_then_restarted_loses_nothing(
    kafka: str, name: str
) -> None:
    await create_topic(kafka, name, partitions=2)
    await produce_readings(kafka, name)
    windows: list[sf.Window[Any]] = []

    def make_flow() -> sf.Flow:
        source = KafkaSource(name, name, kafka, codec=connectors.JSON, commit_interval=0.05)
        flow = sf.Flow("windows")
        flow.source("kafka", source).map("decode", connectors.decode).key_by(
            "by_sensor", lambda r: r["sensor"]
        ).window("per_5s", sf.Tumbling(5.0), time=lambda r: r["ts"], idle=0.3).sink(
            "out", windows.append
        )
        return flow

    flow = make_flow()
    async with flow.start() as running:
        # the first windows close as later readings arrive; the last ones are open
        await until(lambda: len(windows) >= 4)
        await running.stop(drain=False)  # as a crash would: open windows are not emitted
    first_run = len(windows)
    held = {(w.key, w.start) for w in windows}
    assert first_run < len(SENSORS) * 6, "every window closed before the stop"
    # a record is committed only once its window was delivered
    done = await committed(kafka, name, name, 2)
    assert sum(v or 0 for v in done.values()) <= sum(len(w.items) for w in windows)

    flow = make_flow()
    async with flow.start() as running:
        await until(lambda: {(w.key, w.start) for w in windows} >= _all_windows(), within=30)
        await running.stop()
    # every reading is in a delivered window, and each window re-formed whole
    by_window: dict[tuple[str, float], set[int]] = {}
    for w in windows:
        by_window.setdefault((w.key, w.start), set()).update(r["i"] for r in w.items)
    for (sensor, start), seen in by_window.items():
        assert seen == set(range(int(start * 2), int(start * 2) + 10)), (sensor, start)
    assert set(by_window) == _all_windows()
    assert held <= set(by_window)
    complete = [w for w in windows[first_run:] if len(w.items) == 10]
    assert len(complete) == len(windows) - first_run  # none partial after the restart


def _all_windows() -> set[tuple[str, float]]:
    return {(s, 5.0 * k) for s in SENSORS for k in range(6)}


async def test_checkpointed_windows_across_a_crash_equal_an_uninterrupted_run(
    kafka: str, name: str, tmp_path: Any
) -> None:
    """With checkpoints the open windows themselves survive (restored, not re-formed from a
    replay): together, the windows before and after the crash are exactly those of an
    uninterrupted run, a window delivered twice only at the (at-least-once) sink, whole."""
    await create_topic(kafka, name, partitions=2)
    await produce_readings(kafka, name)
    windows: list[sf.Window[Any]] = []

    def make_flow() -> sf.Flow:
        source = KafkaSource(name, name, kafka, codec=connectors.JSON)
        flow = sf.Flow("windows", checkpoints=sf.Checkpoints(tmp_path, every=0.05))
        flow.source("kafka", source).map("decode", connectors.decode).key_by(
            "by_sensor", lambda r: r["sensor"]
        ).window("per_5s", sf.Tumbling(5.0), time=lambda r: r["ts"], idle=0.3).sink(
            "out", windows.append
        )
        return flow

    async with make_flow().start() as running:
        await until(lambda: len(windows) >= 4)
        await asyncio.sleep(0.15)  # a checkpoint or two with open windows in it
        await running.stop(drain=False)  # a crash: no drain, no last checkpoint
    first_run = len(windows)
    assert first_run < len(SENSORS) * 6, "every window closed before the crash"

    async with make_flow().start() as running:
        assert running.checkpoints is not None
        await until(lambda: {(w.key, w.start) for w in windows} >= _all_windows(), within=30)
        await running.stop()
    assert running.checkpoints.restored is not None
    contents: dict[tuple[str, float], list[list[int]]] = {}
    for w in windows:
        contents.setdefault((w.key, w.start), []).append(sorted(r["i"] for r in w.items))
    assert set(contents) == _all_windows()
    for (_, start), seen in contents.items():
        whole = list(range(int(start * 2), int(start * 2) + 10))
        assert all(items == whole for items in seen)  # each delivery of a window is whole
