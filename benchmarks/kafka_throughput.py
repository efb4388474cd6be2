"""Connector throughput: streamflow against hand-written loops with the same guarantees.

1. Kafka -> map(identity) -> Kafka. streamflow, two ways: ``KafkaSource`` -> ``map`` ->
   ``KafkaSink`` with ``--concurrency`` sends in flight (the sink takes each run of queued
   items in one ``send_run`` call, no task per item), and the
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

Every contender runs twice per round (``--gc both``): with the garbage collector as Python
starts it, and with ``gc.freeze()`` after setup, what a long-running service does once its
models are loaded (see docs/ARCHITECTURE.md, Garbage collection): after ``import torch``
each full collection traverses several hundred thousand objects, and a consumer that keeps
thousands of records alive triggers many of them.

Rates are messages per second from the first message handled to the last one confirmed
(Kafka) or decoded (TCP), the median of ``--repeats`` interleaved runs; the ratio is
streamflow / baseline under the same collector settings (target >= 0.8). Needs the brokers:
``.ci/brokers.sh start``.
For figures, start Kafka with full JIT: KAFKA_JVM_OPTS="" .ci/kafka.sh start.
Run: .venv/bin/python benchmarks/kafka_throughput.py [--messages N] [--frames N] [--gc MODE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from _common import median, table
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from streamflow.connectors.kafka import KafkaSink, KafkaSource
from streamflow.connectors.sockets import ServerSource
from streamflow.connectors.tensors import TENSOR, decode_tensor

import streamflow as sf
from streamflow import connectors

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
    parser.add_argument("--batch", type=int, default=128, help="batch size, batched sink")
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
    parser.add_argument("--skip-tcp", action="store_true")
    parser.add_argument(
        "--gc",
        choices=["default", "frozen", "both"],
        default="both",
        help="the garbage collector as Python starts it, frozen after setup, or both",
    )
    args = parser.parse_args()
    sf.configure_logging(level="warning")

    modes = {"default": [False], "frozen": [True], "both": [False, True]}[args.gc]
    rows: list[tuple[str, str, float, float, float]] = []
    if not args.skip_kafka:
        rows += await kafka_rows(args, modes)
    if not args.skip_tcp:
        rows += await tcp_rows(args, modes)
    print(
        f"Kafka: {args.messages:,} messages x {args.repeats} runs, {args.partitions} partitions, "
        f"{args.pending} pending; TCP: up to {args.frames:,} frames x {args.repeats} runs; "
        "gc: the collector as Python starts it, or frozen after setup (gc.freeze(), see "
        "docs/ARCHITECTURE.md); ratio = streamflow / hand-written loop (target >= 0.8)"
    )
    print(table(["path", "gc", "streamflow msg/s", "baseline msg/s", "ratio"], rows))


@contextlib.contextmanager
def collector(frozen: bool) -> Iterator[None]:
    """``frozen``: move every object alive now out of the collector's reach (``gc.freeze()``,
    what a service does once its models are loaded) for the duration."""
    if frozen:
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


async def kafka_rows(
    args: argparse.Namespace, modes: list[bool]
) -> list[tuple[str, str, float, float, float]]:
    topic = await prepare_topic(args.bootstrap, args.messages, args.size, args.partitions)
    bootstrap, n, pending = args.bootstrap, args.messages, args.pending
    rates: dict[tuple[bool, str], list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits every contender alike
        for frozen in modes:
            with collector(frozen):
                for key, run in (
                    ("base", lambda: kafka_baseline(bootstrap, topic, n, pending)),
                    (
                        "item",
                        lambda: kafka_streamflow(bootstrap, topic, n, pending, args.concurrency),
                    ),
                    (
                        "batch",
                        lambda: kafka_streamflow(bootstrap, topic, n, pending, 4, batch=args.batch),
                    ),
                ):
                    rates.setdefault((frozen, key), []).append(await run())
    rows = []
    for frozen in modes:
        base = median(rates[frozen, "base"])
        for key, label in (
            ("batch", f"Kafka {args.size} B: batch({args.batch}) + batched sink"),
            ("item", f"Kafka {args.size} B: per-item sink, concurrency {args.concurrency}"),
        ):
            ours = median(rates[frozen, key])
            rows.append((label, _mode(frozen), ours, base, ours / base))
    return rows


async def tcp_rows(
    args: argparse.Namespace, modes: list[bool]
) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for elements in args.elements:
        n = max(1000, min(args.frames, (256 << 20) // (4 * elements)))  # <= 256 MiB a run
        data = encoded_frames(n, (elements,))
        rates: dict[tuple[bool, str], list[float]] = {}
        for _ in range(args.repeats):
            for frozen in modes:
                with collector(frozen):
                    rates.setdefault((frozen, "base"), []).append(await tcp_baseline(data, n))
                    rates.setdefault((frozen, "item"), []).append(await tcp_streamflow(data, n))
                    rates.setdefault((frozen, "batched"), []).append(
                        await tcp_streamflow(data, n, batched=True)
                    )
        label = f"TCP tensor frames, {4 * elements // 1024} KiB"
        for frozen in modes:
            base = median(rates[frozen, "base"])
            for key, name in (("item", label), ("batched", f"{label}, batched source")):
                ours = median(rates[frozen, key])
                rows.append((name, _mode(frozen), ours, base, ours / base))
    return rows


def _mode(frozen: bool) -> str:
    return "frozen" if frozen else "default"


if __name__ == "__main__":
    asyncio.run(main())
