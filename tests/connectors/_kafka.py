"""Kafka helpers for the tests: create topics, produce, read a topic back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, values: Iterable[bytes], *, keys: bool = False
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, v, key=str(i).encode() if keys else None)
            for i, v in enumerate(values)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(
    bootstrap: str, topic: str, count: int, within: float = 20.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """The first ``count`` records of ``topic`` (no group, from the beginning)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        out: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(within):
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
        return out
    finally:
        await consumer.stop()


async def committed(
    bootstrap: str, group: str, topic: str, partitions: int = 1
) -> dict[int, int | None]:
    """The group's committed offset per partition (``None``: nothing committed)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()
