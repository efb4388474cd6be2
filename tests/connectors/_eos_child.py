"""Child process of the exactly-once test: Kafka -> map -> Kafka, transactional, checkpointed.

Run: python -m tests.connectors._eos_child BOOTSTRAP IN_TOPIC OUT_TOPIC DIR

It runs until it is killed; each checkpoint commits the output since the one before in one
transaction, together with the input offsets.
"""

from __future__ import annotations

import asyncio
import sys

from streamflow.connectors.kafka import KafkaSink, KafkaSource

import streamflow as sf


async def tag(record: sf.Message) -> bytes:  # type: ignore[type-arg]
    await asyncio.sleep(0.0002)  # about 3000 records/s: kills land between checkpoints
    return b"out-" + record.raw  # type: ignore[attr-defined, no-any-return]


async def main(bootstrap: str, topic: str, out: str, where: str) -> None:
    source = KafkaSource(
        topic, topic, bootstrap, group_instance_id=f"{topic}-member", session_timeout_ms=6000
    )
    sink = KafkaSink(out, bootstrap, transactional=True, transactional_id=f"{out}-eos")
    flow = sf.Flow("eos", checkpoints=sf.Checkpoints(where, every=0.3, keep=3))
    flow.source("in", source).map("tag", tag).sink("out", sink)
    await flow.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
