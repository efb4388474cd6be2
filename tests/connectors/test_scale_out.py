"""Scale-out: three ``streamflow run`` processes in one consumer group share a topic's
partitions; one is killed with SIGKILL mid-stream and a replacement joins.

What is promised, and checked here from the processes' own output files:

- nothing is lost: every produced record is in some process's output;
- one key is in one partition, so one consumer at a time handles it: in each process's
  output a key's sequence numbers only go up, and a partition's offsets too;
- per partition, in the order the records were handled (all processes together), offsets go
  up by one, except where the partition moved to another process: there the new owner starts
  at the last committed offset, so a tail the old owner had handled but not committed may be
  handled again (a step back, never a gap);
- duplicates come only from that redelivered tail, bounded by what the killed process handled
  since its last commit (``commit_interval`` = 0.5 s). A clean rebalance (a member joining or
  leaving) lets in-flight records finish and commits them before the partitions move, so it
  adds none.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from ._kafka import create_topic

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

PARTITIONS = 6
KEYS = 20
PER_KEY = 300
TOTAL = KEYS * PER_KEY
COMMIT_INTERVAL = 0.5

APP = '''
"""One member of the scale-out group: Kafka in, one JSON line per handled record out."""

import asyncio
import os
import time

import streamflow as sf
from streamflow import connectors
from streamflow.connectors.files import JsonLinesSink
from streamflow.connectors.kafka import KafkaSource


async def handle(record: connectors.Record) -> dict:
    await asyncio.sleep(0.003)  # about 300 records/s per process: the kill comes mid-stream
    value = connectors.decode(record)
    return {
        "key": value["key"],
        "seq": value["seq"],
        "partition": record.position["partition"],
        "offset": record.position["offset"],
        "t": time.time(),
    }


def flow() -> sf.Flow:
    env = os.environ
    source = KafkaSource(
        env["SF_TOPIC"],
        env["SF_GROUP"],
        env["SF_KAFKA"],
        codec=connectors.JSON,
        max_pending=200,
        commit_interval=COMMIT_INTERVAL,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    flow = sf.Flow("scale-out")
    flow.source("kafka", source).map("handle", handle).sink("out", JsonLinesSink(env["SF_OUT"]))
    return flow
'''.replace("COMMIT_INTERVAL", repr(COMMIT_INTERVAL))


class Member:
    """One ``streamflow run app.py:flow`` process writing ``out-<n>.jsonl``."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, log: Path) -> None:
        self.proc, self.out, self.log = proc, out, log

    def lines(self) -> list[dict[str, Any]]:
        """The complete lines written so far (a line being written is left for later)."""
        if not self.out.exists():
            return []
        text = self.out.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise AssertionError(
                f"{self.out.name}: exited {self.proc.returncode} early:\n{self.log.read_text()}"
            )


async def start_member(tmp_path: Path, n: int, env: dict[str, str]) -> Member:
    out, log = tmp_path / f"out-{n}.jsonl", tmp_path / f"member-{n}.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streamflow",
            "run",
            str(tmp_path / "app.py") + ":flow",
            "--no-live",
            cwd=tmp_path,
            env={**env, "SF_OUT": str(out)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    return Member(proc, out, log)


async def until(predicate: Callable[[], bool], within: float) -> None:
    """Poll every 0.1 s (reading the outputs costs CPU the members need)."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.1)


async def produce_keyed(bootstrap: str, topic: str) -> None:
    """``PER_KEY`` records for each of ``KEYS`` keys, interleaved: ``{"key", "seq"}``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, json.dumps({"key": key, "seq": seq}).encode(), key=key.encode()
            )
            for seq in range(PER_KEY)
            for key in (f"k{k:02d}" for k in range(KEYS))
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_three_members_one_killed_and_replaced_lose_nothing_and_keep_key_order(
    kafka: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await create_topic(kafka, name, partitions=PARTITIONS)
    await produce_keyed(kafka, name)
    (tmp_path / "app.py").write_text(APP)
    env = dict(os.environ, SF_KAFKA=kafka, SF_TOPIC=name, SF_GROUP=name, PYTHONUNBUFFERED="1")
    members = [await start_member(tmp_path, n, env) for n in range(3)]
    started = time.monotonic()
    try:

        def all_writing() -> bool:
            for member in members:
                member.check_alive()
            return all(len(member.lines()) >= 300 for member in members)

        await until(all_writing, within=30)
        victim = members[0]
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        killed_at = time.time()
        assert victim.proc.returncode == -signal.SIGKILL
        handled_at_kill = {(r["partition"], r["offset"]) for m in members for r in m.lines()}
        assert len(handled_at_kill) < TOTAL, "the stream ended before the kill"
        members.append(await start_member(tmp_path, 3, env))

        def all_handled() -> bool:
            for member in members[1:]:
                member.check_alive()
            return len({(r["partition"], r["offset"]) for m in members for r in m.lines()}) == TOTAL

        await until(all_handled, within=40)
        for member in members[1:]:
            member.proc.send_signal(signal.SIGTERM)  # drain, commit, leave the group: exit 0
        for member in members[1:]:
            async with asyncio.timeout(30):
                assert await member.proc.wait() == 0, member.log.read_text()
    finally:
        for member in members:
            if member.proc.returncode is None:
                member.proc.kill()
                await member.proc.wait()
    took = time.monotonic() - started

    outputs = [member.lines() for member in members]
    every = [dict(r, member=n) for n, lines in enumerate(outputs) for r in lines]
    for member in members:  # rebalances are normal operation: aiokafka's noise stays off
        assert "Heartbeat failed" not in member.log.read_text(), member.log.read_text()

    # nothing lost: every (key, seq) produced was handled
    assert {(r["key"], r["seq"]) for r in every} == {
        (f"k{k:02d}", s) for k in range(KEYS) for s in range(PER_KEY)
    }

    # one key, one partition; the topic holds a key's records in sequence order
    partition_of: dict[str, set[int]] = defaultdict(set)
    for r in every:
        partition_of[r["key"]].add(r["partition"])
    assert all(len(parts) == 1 for parts in partition_of.values()), partition_of
    by_offset = {(r["partition"], r["offset"]): (r["key"], r["seq"]) for r in every}
    for key in partition_of:
        seqs = [seq for _, (k, seq) in sorted(by_offset.items()) if k == key]
        assert seqs == list(range(PER_KEY)), key

    # within each process's output: a key's seq and a partition's offsets only go up
    for n, lines in enumerate(outputs):
        last_seq: dict[str, int] = {}
        last_offset: dict[int, int] = {}
        for r in lines:
            assert r["seq"] > last_seq.get(r["key"], -1), (n, r)
            assert r["offset"] > last_offset.get(r["partition"], -1), (n, r)
            last_seq[r["key"]] = r["seq"]
            last_offset[r["partition"]] = r["offset"]

    # per partition, in handling order across processes: +1 steps, or a step back to the
    # commit point where the partition moved to another process; never a gap
    moves = 0
    for p in range(PARTITIONS):
        handled = sorted((r for r in every if r["partition"] == p), key=lambda r: r["t"])
        assert handled and handled[0]["offset"] == 0
        for before, after in itertools.pairwise(handled):
            if after["member"] != before["member"]:
                moves += 1
                assert after["offset"] <= before["offset"] + 1, (p, before, after)
            else:
                assert after["offset"] == before["offset"] + 1, (p, before, after)

    # duplicates: only the killed process's uncommitted tail, handled just before the kill
    count: dict[tuple[int, int], int] = defaultdict(int)
    for r in every:
        count[(r["partition"], r["offset"])] += 1
    duplicates = len(every) - TOTAL
    assert duplicates == sum(c - 1 for c in count.values())
    assert all(c <= 2 for c in count.values())
    again = [r for r in outputs[0] if count[(r["partition"], r["offset"])] > 1]
    assert len(again) == duplicates, "a clean rebalance redelivered records"
    for p in {r["partition"] for r in again}:
        mine = [r["offset"] for r in outputs[0] if r["partition"] == p]
        tail = [r["offset"] for r in again if r["partition"] == p]
        assert mine[-len(tail) :] == tail, f"partition {p}: redelivered records are not a tail"
    window = killed_at - min((r["t"] for r in again), default=killed_at)
    assert window < COMMIT_INTERVAL + 2.5, f"redelivered records go back {window:.2f} s"
    with capsys.disabled():
        print(
            f"\n[kafka scale-out] {TOTAL} records, {KEYS} keys, {PARTITIONS} partitions, "
            f"3 members + 1 replacement: member 0 SIGKILLed after {len(outputs[0])} handled; "
            f"{duplicates} duplicates (its uncommitted tail, handled in the last "
            f"{window:.2f} s before the kill; commit_interval {COMMIT_INTERVAL} s), 0 lost, "
            f"{moves} partition moves, per member {[len(lines) for lines in outputs]}, "
            f"{took:.1f} s"
        )
