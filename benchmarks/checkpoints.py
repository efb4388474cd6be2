"""What checkpoints cost: throughput with a checkpoint every second against none.

1. An OnlineTrainer on Kafka: a 32 MiB model (an MLP 1024-2048-2048-1024, fp32, 8.4 M
   parameters) split over cpu:0 and cpu:1, schedule ``sync`` (mini-batches of 4), Adam (its
   two moments are in the checkpoint too: about 96 MiB a checkpoint). Each Kafka record is
   an index; ``decode`` turns it into a batch of 16 rows (from a pool of 64, so decoding
   costs nothing). Throughput is counted from the first record learned to the last (the
   group join is not in it).
2. Keyed windows with 100,000 open keys: ``sf.iterate`` of 1,000,000 readings over 100,000
   keys, all in one 10 s tumbling window per key (so every key's window stays open until the
   end), aggregate ``(sum, count)``.

Each row runs without checkpoints and with ``Checkpoints(every=1.0, keep=2)``, in rounds
that alternate which goes first (this VM's speed drifts); the ratio is per round, then the
median. Shown: rate, ratio (target: >= 0.9 for the trainer), checkpoints taken, size of one,
how long the sources were paused per checkpoint (p50/p99: the drain of what was in flight,
the snapshot and its encoding; the windows' last checkpoint, which waits for every window
to be emitted at the end of the stream, left out) and how long a write took on its worker
thread (p50/p99).

Run: .venv/bin/python benchmarks/checkpoints.py [--records N] [--rounds R] [--skip-kafka]
     (Kafka on 127.0.0.1:9092: .ci/kafka.sh start)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from typing import Any

import torch
from _common import median, table
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from streamflow.connectors.kafka import KafkaSource
from torch import nn

import streamflow as sf

BOOTSTRAP = "127.0.0.1:9092"
ROWS, WIDTH = 16, 1024


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, WIDTH)
    )  # fmt: skip


async def _topic(n: int) -> str:
    topic = f"bench-ckpt-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=5)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, str(i).encode()) for i in range(n)])
    finally:
        await producer.stop()
    return topic


def _percentiles(samples: list[float]) -> str:
    if not samples:
        return "-"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1000:.0f} / {p99 * 1000:.0f} ms"


async def trainer_run(topic: str, n: int, checkpoints: sf.Checkpoints | None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    pool = [(torch.randn(ROWS, WIDTH, generator=gen), torch.randn(ROWS, WIDTH, generator=gen))]
    pool *= 64
    trainer = sf.OnlineTrainer(
        _model(),
        ["cpu:0", "cpu:1"],
        partition=[2, 3],
        loss_fn=nn.functional.mse_loss,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-4),
        schedule="sync",
        microbatches=4,
    )
    source = KafkaSource(topic, f"{topic}-{uuid.uuid4().hex[:6]}", BOOTSTRAP, max_pending=256)
    flow = sf.Flow("bench-trainer", checkpoints=checkpoints)
    first, last = asyncio.Event(), asyncio.Event()
    seen = [0]

    def out(prediction: Any) -> None:
        seen[0] += 1
        if seen[0] == 1:
            first.set()
        elif seen[0] == n:
            last.set()

    flow.source("records", source).map("decode", lambda r: pool[int(r.raw) % 64]).map(
        "learn", trainer
    ).sink("out", out)
    async with flow.start() as running:
        await first.wait()
        t0 = time.perf_counter()
        await last.wait()
        seconds = time.perf_counter() - t0
        await running.stop(drain=False)
    return {"rate": (n - 1) / seconds, "stats": running.checkpoints}


async def windows_run(n: int, keys: int, checkpoints: sf.Checkpoints | None) -> dict[str, Any]:
    readings = [(i % keys, i * 9.0 / n) for i in range(n)]
    count = [0]

    def out(w: Any) -> None:
        count[0] += 1

    flow = sf.Flow("bench-windows", checkpoints=checkpoints)
    flow.source("readings", readings).key_by("by_key", lambda r: r[0]).window(
        "sum_10s",
        sf.Tumbling(10.0),
        time=lambda r: r[1],
        lateness=1.0,
        aggregate=(lambda: (0.0, 0), lambda a, r: (a[0] + r[1], a[1] + 1)),
    ).sink("out", out)
    t0 = time.perf_counter()
    async with flow.start() as running:
        await running.wait()
    seconds = time.perf_counter() - t0
    assert count[0] == keys
    return {"rate": n / seconds, "stats": running.checkpoints}


async def rows_for(
    label: str, run: Any, rounds: int, unit: str, *, drains: bool = False
) -> list[list[object]]:
    """Rows for one flow; ``drains``: its runs end by draining, so their last checkpoint
    waits for the end of the stream (every window emitted) and is left out of the pauses."""
    base: list[float] = []
    with_ck: list[float] = []
    ratios: list[float] = []
    stats: list[sf.CheckpointStats] = []
    for r in range(rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        got: dict[bool, float] = {}
        for checkpointed in order:
            with tempfile.TemporaryDirectory() as where:
                config = sf.Checkpoints(where, every=1.0, keep=2) if checkpointed else None
                result = await run(config)
            got[checkpointed] = result["rate"]
            if checkpointed:
                stats.append(result["stats"])
        base.append(got[False])
        with_ck.append(got[True])
        ratios.append(got[True] / got[False])
    last = -1 if drains else None
    pauses = [p for s in stats for p in s.pauses_s[1:last]]  # checkpoint 0 is at the start
    writes = [w for s in stats for w in s.writes_s[1:]]
    taken = median([s.taken for s in stats])
    size = max(s.largest_bytes for s in stats) / 2**20
    return [
        [f"{label}: none", f"{median(base):,.0f} {unit}", "1.00", "-", "-", "-", "-"],
        [
            f"{label}: every 1 s",
            f"{median(with_ck):,.0f} {unit}",
            f"{median(ratios):.2f}",
            f"{taken:g}",
            f"{size:.1f} MiB",
            _percentiles(pauses),
            _percentiles(writes),
        ],
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=600, help="trainer records per run")
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-kafka", action="store_true")
    args = parser.parse_args()
    rows: list[list[object]] = []
    if not args.skip_kafka:
        topic = await _topic(args.records)
        rows += await rows_for(
            "trainer 32 MiB on Kafka",
            lambda c: trainer_run(topic, args.records, c),
            args.rounds,
            "records/s",
        )
    rows += await rows_for(
        f"windows, {args.keys:,} open keys",
        lambda c: windows_run(args.readings, args.keys, c),
        args.rounds,
        "readings/s",
        drains=True,
    )
    headers = ["flow", "rate", "ratio", "checkpoints", "size", "pause p50/p99", "write p50/p99"]
    print(table(headers, rows))


if __name__ == "__main__":
    asyncio.run(main())
