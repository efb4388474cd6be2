"""Connector throughput: streamflow against hand-written loops with the same guarantees.

1. Kafka -> map(identity) -> Kafka. streamflow, two ways: ``KafkaSource`` -> ``map`` ->
   ``KafkaSink`` with ``--concurrency`` sends in flight (one task per item), and the
   recommended ``... -> batch(--batch, 5 ms) -> KafkaSink(batched=True)`` with 4 batches in
   flight. Baseline: an aiokafka loop that polls a batch,
   produces every record, waits for the broker's confirmations, then commits the batch.
   Both: consumer group with manual commits after the output is confirmed (at least once),
   producer with acks=all and idempotence, linger_ms=5, at most ``--pending`` records
   fetched and not yet confirmed.
2. TCP frames of float32 tensors of several sizes (``--elements``). streamflow, two ways:
   ``ServerSource`` -> ``map(connectors.decode)`` -> sink, a frame per item; and
   ``ServerSource(batched=True)`` -> ``map(connectors.decode_batch)`` -> sink, the frames
   that arrived together as one item. Baseline: ``asyncio.start_server`` reading frames with
   ``readexactly`` and decoding them with the same tensor codec. All read what the same
   sender writes. Small frames measure the per-item cost of a flow (a few microseconds for
   source -> map -> sink on a 2-core VM), which the batched source pays once per list; large
   ones the data path, where the source receives into the tensor's own buffer and the
   baseline copies.

Rates are messages per second from the first message handled to the last one confirmed
(Kafka) or decoded (TCP), the median of ``--repeats`` interleaved runs; the ratio is
streamflow / baseline (target >= 0.8). Needs the brokers: ``.ci/brokers.sh start``.
For figures, start Kafka with full JIT: KAFKA_JVM_OPTS="" .ci/kafka.sh start.
Run: .venv/bin/python benchmarks/kafka_throughput.py [--messages N] [--frames N]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
import uuid
from typing import Any

import torch
from _common import median, table
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import connectors
import streamflow as sf
from connectors.kafka import KafkaSink, KafkaSource
from connectors.sockets import ServerSource
from connectors.tensors import TENSOR, decode_tensor

PRODUCER = {"acks": "all", "enable_idempotence": True, "linger_ms": 5}


# -- Kafka ------------------------------------------------------------------------------


async def prepare_topic(bootstrap: str, n: int, size: int, partitions: int) -> str:
    topic = f"bench-in-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        payload = b"x" * size
        futures = [await producer.send(topic, payload, key=str(i).encode()) for i in range(n)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return topic


async def kafka_baseline(bootstrap: str, topic: str, n: int, pending: int) -> float:
    out = f"bench-out-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=out,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER)
    await consumer.start()
    await producer.start()
    try:
        done, t0 = 0, 0.0
        while done < n:
            batches = await consumer.getmany(timeout_ms=100, max_records=pending)
            if not batches:
                continue
            if not t0:
                t0 = time.perf_counter()
            futures = []
            offsets: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                futures.extend(
                    [
                        await producer.send(out, r.value, key=r.key, headers=r.headers)
                        for r in records
                    ]
                )
                offsets[tp] = records[-1].offset + 1
            await asyncio.gather(*futures)  # the broker confirmed every output
            await consumer.commit(offsets)  # only then: at least once
            done += len(futures)
        return n / (time.perf_counter() - t0)
    finally:
        await producer.stop()
        await consumer.stop()


async def kafka_streamflow(
    bootstrap: str, topic: str, n: int, pending: int, concurrency: int, batch: int = 0
) -> float:
    """``batch=0``: a per-item sink with ``concurrency`` sends in flight; otherwise a batch
    stage and a batched sink with 4 batches in flight."""
    out = f"bench-out-{uuid.uuid4().hex[:8]}"
    first: list[float] = []

    def identity(record: Any) -> Any:
        if not first:
            first.append(time.perf_counter())
        return record

    source = KafkaSource(topic, out, bootstrap, max_pending=pending)
    sink = KafkaSink(out, bootstrap, linger_ms=PRODUCER["linger_ms"], batched=batch > 0)
    flow = sf.Flow("kafka-bench")
    stream = flow.source("in", source).map("identity", identity)
    if batch:
        stream.batch("batch", batch, 0.005).sink("out", sink, concurrency=4)
    else:
        stream.sink("out", sink, concurrency=concurrency)
    async with flow.start() as running:
        while sink.sent < n:  # noqa: ASYNC110 - polling a counter is the measurement
            await asyncio.sleep(0.001)
        t1 = time.perf_counter()
        await running.stop()
    return n / (t1 - first[0])


# -- TCP frames of tensors ----------------------------------------------------------------


def encoded_frames(n: int, shape: tuple[int, ...]) -> bytes:
    frame = TENSOR.encode(torch.randn(shape))
    return (struct.pack(">I", len(frame)) + frame) * n


async def send_frames(port: int, data: bytes) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):
        writer.write(view[i : i + (1 << 20)])
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def tcp_baseline(data: bytes, n: int) -> float:
    count = 0
    finished = asyncio.Event()
    t0 = 0.0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count, t0
        try:
            while count < n:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                payload = await reader.readexactly(length)
                if not t0:
                    t0 = time.perf_counter()
                decode_tensor(payload)
                count += 1
            finished.set()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = asyncio.create_task(send_frames(port, data))
    await finished.wait()
    t1 = time.perf_counter()
    await sender
    server.close()
    await server.wait_closed()
    return n / (t1 - t0)


async def tcp_streamflow(data: bytes, n: int, *, batched: bool = False) -> float:
    """``batched=False``: a frame per item; ``True``: lists of the frames that arrived
    together, decoded with ``connectors.decode_batch``."""
    count = 0
    finished = asyncio.Event()
    first: list[float] = []
    decode_one = connectors.decode_batch if batched else connectors.decode

    def decode(record: Any) -> Any:
        if not first:
            first.append(time.perf_counter())
        return decode_one(record)

    async def done(value: Any) -> None:
        nonlocal count
        count += len(value) if batched else 1
        if count == n:
            finished.set()

    source = ServerSource(port=0, codec=TENSOR, batched=batched)
    flow = sf.Flow("tcp-bench")
    flow.source("tcp", source).map("decode", decode).sink("count", done)
    async with flow.start() as running:
        await source.wait_listening()
        port = source.port
        sender = asyncio.create_task(send_frames(port, data))
        await finished.wait()
        t1 = time.perf_counter()
        await sender
        await running.stop()
    return n / (t1 - first[0])


# -- main ---------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--messages", type=int, default=100_000, help="Kafka messages per run")
    parser.add_argument("--size", type=int, default=100, help="Kafka message bytes")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--pending", type=int, default=1000, help="records in flight")
    parser.add_argument("--concurrency", type=int, default=256, help="per-item sink sends")
    parser.add_argument("--batch", type=int, default=500, help="batch size, batched sink")
    parser.add_argument("--frames", type=int, default=200_000, help="TCP frames per run (max)")
    parser.add_argument(
        "--elements",
        type=int,
        nargs="+",
        default=[256, 1024, 4096, 16384, 262144],
        help="float32/frame",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-kafka", action="store_true")
    args = parser.parse_args()
    sf.configure_logging(level="warning")

    rows: list[tuple[str, float, float, float]] = []
    if not args.skip_kafka:
        topic = await prepare_topic(args.bootstrap, args.messages, args.size, args.partitions)
        rates: dict[str, list[float]] = {"base": [], "item": [], "batch": []}
        for _ in range(args.repeats):  # interleaved, so drift hits every contender alike
            bootstrap, n, pending = args.bootstrap, args.messages, args.pending
            rates["base"].append(await kafka_baseline(bootstrap, topic, n, pending))
            rates["item"].append(
                await kafka_streamflow(bootstrap, topic, n, pending, args.concurrency)
            )
            rates["batch"].append(
                await kafka_streamflow(bootstrap, topic, n, pending, 4, batch=args.batch)
            )
        base = median(rates["base"])
        for key, label in (
            ("batch", f"Kafka {args.size} B: batch({args.batch}) + batched sink"),
            ("item", f"Kafka {args.size} B: per-item sink, concurrency {args.concurrency}"),
        ):
            rows.append((label, median(rates[key]), base, median(rates[key]) / base))
    for elements in args.elements:
        n = max(1000, min(args.frames, (256 << 20) // (4 * elements)))  # <= 256 MiB a run
        data = encoded_frames(n, (elements,))
        base_rates, our_rates, batched_rates = [], [], []
        for _ in range(args.repeats):
            base_rates.append(await tcp_baseline(data, n))
            our_rates.append(await tcp_streamflow(data, n))
            batched_rates.append(await tcp_streamflow(data, n, batched=True))
        label = f"TCP tensor frames, {4 * elements // 1024} KiB"
        base = median(base_rates)
        for name, rates in ((label, our_rates), (f"{label}, batched source", batched_rates)):
            rows.append((name, median(rates), base, median(rates) / base))
    print(
        f"Kafka: {args.messages:,} messages x {args.repeats} runs, {args.partitions} partitions, "
        f"{args.pending} pending; TCP: up to {args.frames:,} frames x {args.repeats} runs; "
        "ratio = streamflow / hand-written loop (target >= 0.8)"
    )
    print(table(["path", "streamflow msg/s", "baseline msg/s", "ratio"], rows))


if __name__ == "__main__":
    asyncio.run(main())
