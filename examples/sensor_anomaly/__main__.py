"""Run the demo: python -m examples.sensor_anomaly [--readings N] (brokers must be up)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiokafka import AIOKafkaConsumer

import streamflow as sf

from .app import Settings, build
from .sensors import publish_readings


async def main(readings: int, anomalies: int) -> None:
    stamp = int(time.time())
    settings = Settings(prefix=f"demo-{stamp}", topic=f"sensor-anomalies-{stamp}")
    flow, source = build(settings)
    async with flow.start() as running:
        await source.wait_subscribed()
        injected = await publish_readings(  # in real time: 4 sensors at 100 Hz
            settings.prefix, readings=readings, anomalies=anomalies, rate=4 * settings.hz
        )
        total = 4 * readings
        while running.metrics()["validate"].items_in < total:  # noqa: ASYNC110 - a metric
            await asyncio.sleep(0.05)
        await running.stop()  # drain: the last windows are scored and written
    sent = flow.metrics()["kafka"].items_out
    print(f"published {4 * readings} readings with {len(injected)} anomalies injected:")
    print("   ", sorted(injected))
    print(f"flagged {sent} readings, written to Kafka topic {settings.topic!r}:")
    consumer = AIOKafkaConsumer(
        settings.topic, bootstrap_servers=settings.kafka, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        shown = 0
        async with asyncio.timeout(10):
            while shown < sent:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    for record in batch:
                        print("   ", json.loads(record.value))
                    shown += len(batch)
    finally:
        await consumer.stop()
    for name, m in flow.metrics().items():
        print(f"  {name:10} in={m.items_in:5} out={m.items_out:5} busy={m.busy:.2f}")
    print(f"  window: {flow.metrics()['window'].state} (held at the end: nothing)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=250, help="readings per sensor (4 sensors)")
    parser.add_argument("--anomalies", type=int, default=6)
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    asyncio.run(main(args.readings, args.anomalies))
