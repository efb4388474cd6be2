"""KafkaSource and KafkaSink as checkpoint participants, against the real broker.

The protocol methods are called directly, in the order the flow calls them: ``__aenter__``,
``restore`` (a source always, ``None`` when there is no checkpoint yet), items,
``snapshot``, and ``commit`` once the checkpoint is durable.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from streamflow.connectors.kafka import KafkaSink, KafkaSource, TransactionFailed

import streamflow as sf
from streamflow import connectors
from streamflow._checkpoints import CheckpointInfo

from ._kafka import committed, create_topic, produce, read_all
from ._wait import until
from .conftest import ROOT

pytestmark = pytest.mark.asyncio


async def take(source: KafkaSource, count: int, within: float = 20.0) -> list[sf.Message[Any]]:
    """The next ``count`` messages the source hands to the flow."""
    async with asyncio.timeout(within):
        return [await source.__anext__() for _ in range(count)]


def values(messages: list[sf.Message[Any]]) -> list[int]:
    return [int(m.value.raw) for m in messages]


async def read_committed(kafka: str, topic: str, until_value: bytes = b"end") -> list[bytes]:
    """What a ``read_committed`` consumer reads of ``topic`` up to the record ``until_value``
    (produced outside any transaction after what the test checks)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        out: list[bytes] = []
        async with asyncio.timeout(20):
            while until_value not in out:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(r.value for r in records)
        return out[: out.index(until_value)]
    finally:
        await consumer.stop()


# -- the source ---------------------------------------------------------------------------------


async def test_source_restored_at_its_snapshot_yields_exactly_the_rest(
    kafka: str, name: str
) -> None:
    await create_topic(kafka, name)
    await produce(kafka, name, (str(i).encode() for i in range(50)))

    first = KafkaSource(name, name, kafka)
    async with first:
        first.restore(None)  # checkpoints, none yet: the group's offsets (none: earliest)
        got = await take(first, 20)
        position = first.snapshot()
    assert values(got) == list(range(20))
    assert position == {"group": name, "offsets": {f"{name}:0": 20}}
    # checkpoint mode: nothing committed on exit, acked or not
    assert await committed(kafka, name, name) == {0: None}
    assert first.stats.commits == 0

    second = KafkaSource(name, name, kafka)
    async with second:
        second.restore(position)
        assert second.snapshot() == position  # restored, not read yet: still there
        rest = await take(second, 30)
        assert values(rest) == list(range(20, 50))
        after = second.snapshot()
        assert after["offsets"] == {f"{name}:0": 50}

        await second.commit(CheckpointInfo(1, position, {"src": position}))
        assert await committed(kafka, name, name) == {0: 20}
        assert second.stats.committed == {(name, 0): 20} and second.stats.commits == 1
        assert await second.is_committed(position)
        assert not await second.is_committed(after)
        assert not await second.is_committed({"group": name, "offsets": {f"{name}:0": 21}})
        assert await second.is_committed({"group": name, "offsets": {}})
        assert await second.is_committed(None)  # a checkpoint without this source
    # the last checkpoint's commit stays: exiting commits nothing more
    assert await committed(kafka, name, name) == {0: 20}


async def test_positions_cover_every_partition_and_resume_each_one(kafka: str, name: str) -> None:
    await create_topic(kafka, name, partitions=3)
    await produce(kafka, name, (str(i).encode() for i in range(90)), keys=True)

    first = KafkaSource(name, name, kafka)
    async with first:
        first.restore(None)
        got = await take(first, 40)
        position = first.snapshot()
    by_partition: dict[int, list[int]] = {}
    for m in got:
        by_partition.setdefault(m.meta["partition"], []).append(m.meta["offset"])
    assert position["offsets"] == {
        f"{name}:{p}": offsets[-1] + 1 for p, offsets in sorted(by_partition.items())
    }

    second = KafkaSource(name, name, kafka)
    async with second:
        second.restore(position)
        rest = await take(second, 50)
        with pytest.raises(TimeoutError):  # nothing more: no duplicates
            await take(second, 1, within=1.0)
        # every partition is in the position, read again or not
        assert set(second.snapshot()["offsets"]) == {f"{name}:{p}" for p in range(3)}
    assert sorted(values(got) + values(rest)) == list(range(90))


async def test_restore_after_records_were_fetched_drops_them(kafka: str, name: str) -> None:
    """The partition is assigned and records are buffered when ``restore`` comes: none of
    them is handed out, and reading starts at the restored offset."""
    await create_topic(kafka, name)
    await produce(kafka, name, (str(i).encode() for i in range(30)))
    source = KafkaSource(name, name, kafka, max_pending=10)
    async with source:
        await until(lambda: source.stats.fetched >= 10, within=20)
        source.restore({"group": name, "offsets": {f"{name}:0": 25}})
        assert values(await take(source, 5)) == [25, 26, 27, 28, 29]
        assert source.snapshot()["offsets"] == {f"{name}:0": 30}


async def test_acks_still_make_room_in_checkpoint_mode(kafka: str, name: str) -> None:
    """``max_pending`` is released by acks as without checkpoints (they commit nothing)."""
    await create_topic(kafka, name)
    await produce(kafka, name, (str(i).encode() for i in range(60)))
    seen: list[int] = []

    async def ack_all(source: KafkaSource) -> None:
        async for message in source:
            seen.append(int(message.value.raw))
            message._done(sf.Outcome.DELIVERED.value)  # what the flow does once it is handled
            if len(seen) == 60:
                return

    source = KafkaSource(name, name, kafka, max_pending=5, commit_interval=0.05)
    async with source:
        source.restore(None)
        async with asyncio.timeout(20):
            await ack_all(source)
        await asyncio.sleep(0.2)  # a commit loop would have committed by now
    assert seen == list(range(60))
    assert source.stats.acked == 60 and source.stats.peak_pending <= 5
    assert source.stats.commits == 0
    assert await committed(kafka, name, name) == {0: None}


async def test_commit_after_exit_and_is_committed_before_start(kafka: str, name: str) -> None:
    """A checkpoint's commit that comes after the source closed still commits (the group
    has no member then); ``is_committed`` works before the source is started."""
    await create_topic(kafka, name)
    await produce(kafka, name, [b"0", b"1", b"2"])
    position = {"group": name, "offsets": {f"{name}:0": 2}}
    source = KafkaSource(name, name, kafka)
    async with source:
        source.restore(None)
        await take(source, 2)
        assert source.snapshot() == position
    assert await committed(kafka, name, name) == {0: None}
    await source.commit(CheckpointInfo(1, position, {"src": position}))
    assert await committed(kafka, name, name) == {0: 2}
    assert source.stats.committed == {(name, 0): 2}
    fresh = KafkaSource(name, name, kafka)  # on restart, before __aenter__
    assert await fresh.is_committed(position)
    assert not await fresh.is_committed({"group": name, "offsets": {f"{name}:0": 3}})


async def test_commit_leaves_out_partitions_this_member_does_not_hold(
    kafka: str, name: str
) -> None:
    await create_topic(kafka, name)
    await produce(kafka, name, [b"0", b"1", b"2"])
    source = KafkaSource(name, name, kafka)
    async with source:
        source.restore(None)
        await take(source, 3)
        position = source.snapshot()
        elsewhere = {**position["offsets"], f"{name}-other:0": 5}  # not assigned here
        await source.commit(CheckpointInfo(1, {**position, "offsets": elsewhere}, {}))
        assert source.stats.committed == {(name, 0): 3}
    assert await committed(kafka, name, name) == {0: 3}


async def test_a_bad_position_is_refused(kafka: str, name: str) -> None:
    await create_topic(kafka, name)
    source = KafkaSource(name, name, kafka)
    with pytest.raises(RuntimeError, match="after __aenter__"):
        source.restore(None)
    async with source:
        with pytest.raises(ValueError, match="not a 'topic:partition' key"):
            source.restore({"group": name, "offsets": {"no-partition": 3}})
        with pytest.raises(ValueError, match="not a Kafka position"):
            source.restore([1, 2])
        await asyncio.sleep(0.1)  # let its background tasks start before they are stopped


# -- the transactional sink -----------------------------------------------------------------------


async def test_transactional_sink_commits_output_with_the_source_offsets(
    kafka: str, name: str
) -> None:
    source_topic, out = f"{name}-in", f"{name}-out"
    await create_topic(kafka, source_topic, partitions=2)
    await create_topic(kafka, out)
    position = {"group": name, "offsets": {f"{source_topic}:0": 7, f"{source_topic}:1": 3}}
    sink = KafkaSink(out, kafka, transactional=True, transactional_id=f"tx-{name}")
    assert sink.transactional is True
    async with sink:
        await sink.send(b"a")
        assert await sink.send_run([b"b", b"c"]) == [None, None]  # acked by the broker
        state = sink.snapshot()
        assert state == {"transactional_id": f"tx-{name}"}
        positions = {"src": position, "file": {"path": "/x", "offset": 3, "line": 1}}
        await sink.commit(CheckpointInfo(1, state, positions))
        assert sink.commits == 1

        await produce(kafka, out, [b"end"])
        assert await read_committed(kafka, out) == [b"a", b"b", b"c"]
        await until_committed(kafka, name, source_topic, {0: 7, 1: 3})

        await sink.send(b"d")
        await sink.send(b"e")  # no checkpoint covers these: aborted on exit
    await produce(kafka, out, [b"end 2"])
    assert await read_committed(kafka, out, b"end 2") == [b"a", b"b", b"c", b"end"]
    # they were written (and acked), only never committed
    assert [r.value for r in await read_all(kafka, out, 7)][-3:] == [b"d", b"e", b"end 2"]
    assert await committed(kafka, name, source_topic, 2) == {0: 7, 1: 3}


async def until_committed(kafka: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """The transaction's offsets become visible just after it committed."""
    async with asyncio.timeout(10):
        while await committed(kafka, group, topic, len(offsets)) != offsets:
            await asyncio.sleep(0.05)


async def test_source_and_transactional_sink_while_the_source_is_in_its_group(
    kafka: str, name: str
) -> None:
    """The sink commits the offsets of a live source's group (a member holds its
    partitions) in its transaction; the source tells that the checkpoint made it."""
    source_topic, out = f"{name}-in", f"{name}-out"
    await create_topic(kafka, source_topic)
    await create_topic(kafka, out)
    await produce(kafka, source_topic, (str(i).encode() for i in range(20)))
    source = KafkaSource(source_topic, name, kafka)
    sink = KafkaSink(out, kafka, transactional=True, transactional_id=f"tx-{name}")
    async with source, sink:
        source.restore(None)
        for message in await take(source, 12):
            await sink.send(message.value)  # a Record: produced raw
        position = source.snapshot()
        assert not await source.is_committed(position)
        await sink.commit(CheckpointInfo(1, sink.snapshot(), {"kafka": position}))
        async with asyncio.timeout(10):
            while not await source.is_committed(position):
                await asyncio.sleep(0.05)
        for message in await take(source, 3):
            await sink.send(message.value)  # after the checkpoint: aborted on exit
    assert await committed(kafka, name, source_topic) == {0: 12}
    await produce(kafka, out, [b"end"])
    assert await read_committed(kafka, out) == [str(i).encode() for i in range(12)]


async def test_one_transaction_commits_the_offsets_of_two_groups(kafka: str, name: str) -> None:
    a, b, out = f"{name}-a", f"{name}-b", f"{name}-out"
    for topic in (a, b, out):
        await create_topic(kafka, topic)
    positions = {
        "left": {"group": f"{name}-ga", "offsets": {f"{a}:0": 4}},
        "right": {"group": f"{name}-gb", "offsets": {f"{b}:0": 9}},
    }
    sink = KafkaSink(out, kafka, transactional=True, transactional_id=f"tx-{name}")
    async with sink:
        await sink.send(b"x")
        await sink.commit(CheckpointInfo(3, sink.snapshot(), positions))
    await until_committed(kafka, f"{name}-ga", a, {0: 4})
    await until_committed(kafka, f"{name}-gb", b, {0: 9})
    await produce(kafka, out, [b"end"])
    assert await read_committed(kafka, out) == [b"x"]


async def test_commit_with_nothing_sent_commits_the_offsets(kafka: str, name: str) -> None:
    source_topic, out = f"{name}-in", f"{name}-out"
    await create_topic(kafka, source_topic)
    await create_topic(kafka, out)
    sink = KafkaSink(out, kafka, transactional=True, transactional_id=f"tx-{name}")
    async with sink:
        position = {"group": name, "offsets": {f"{source_topic}:0": 5}}
        await sink.commit(CheckpointInfo(1, sink.snapshot(), {"src": position}))
        await sink.commit(CheckpointInfo(2, sink.snapshot(), {}))  # an empty one too
    await until_committed(kafka, name, source_topic, {0: 5})
    assert sink.commits == 2


_ABANDON = """
import asyncio, os, sys
from streamflow.connectors.kafka import KafkaSink

async def main(bootstrap, topic, txn):
    sink = KafkaSink(topic, bootstrap, transactional=True, transactional_id=txn)
    await sink.__aenter__()
    for i in range(5):
        await sink.send(b"lost %d" % i)
    os._exit(3)  # a crash: no commit, no abort, no close

asyncio.run(main(*sys.argv[1:4]))
"""


async def test_a_new_sink_with_the_same_id_takes_over_after_a_crash(kafka: str, name: str) -> None:
    await create_topic(kafka, name)
    txn = f"tx-{name}"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ABANDON, kafka, name, txn, cwd=ROOT
    )
    async with asyncio.timeout(30):
        assert await child.wait() == 3
    sink = KafkaSink(name, kafka, transactional=True, transactional_id=txn)
    async with sink:  # its producer aborts the open transaction the crash left
        sink.restore({"transactional_id": txn})
        for i in range(3):
            await sink.send(b"kept %d" % i)
        await sink.commit(CheckpointInfo(1, sink.snapshot(), {}))
    await produce(kafka, name, [b"end"])
    assert await read_committed(kafka, name) == [b"kept 0", b"kept 1", b"kept 2"]
    assert len(await read_all(kafka, name, 9)) == 9  # the crashed one's records are there


async def test_a_fenced_sink_fails_with_a_clear_error(kafka: str, name: str) -> None:
    """Two running sinks with one transactional_id: the newer one fences the older, whose
    sends and commit fail with TransactionFailed naming it; its exit raises nothing."""
    await create_topic(kafka, name)
    txn = f"tx-{name}"
    old = KafkaSink(name, kafka, transactional=True, transactional_id=txn)
    async with old:
        await old.send(b"old 0")
        new = KafkaSink(name, kafka, transactional=True, transactional_id=txn)
        async with new:
            with pytest.raises(TransactionFailed, match=f"kafka sink {name} .*{txn}") as info:
                await old.send(b"old 1")
            assert isinstance(info.value, connectors.ConnectorError)
            assert "ProducerFenced" in str(info.value)
            with pytest.raises(TransactionFailed):
                await old.commit(CheckpointInfo(1, old.snapshot(), {}))
            outcomes = await old.send_run([b"old 2", b"old 3"])  # per item, no raise
            assert all(isinstance(o, TransactionFailed) for o in outcomes)
            await new.send(b"new 0")
            await new.commit(CheckpointInfo(1, new.snapshot(), {}))
    await produce(kafka, name, [b"end"])
    assert await read_committed(kafka, name) == [b"new 0"]


async def test_a_record_the_broker_rejects_fails_its_item_only(kafka: str, name: str) -> None:
    await create_topic(kafka, name)
    sink = KafkaSink(
        name, kafka, transactional=True, transactional_id=f"tx-{name}", max_request_size=2000
    )
    async with sink:
        outcomes = await sink.send_run([b"ok", b"x" * 5000, b"ok too"])
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], connectors.ConnectorError)
        assert not isinstance(outcomes[1], TransactionFailed)
        await sink.commit(CheckpointInfo(1, sink.snapshot(), {}))
    await produce(kafka, name, [b"end"])
    assert await read_committed(kafka, name) == [b"ok", b"ok too"]


async def test_without_transactional_nothing_changes(kafka: str, name: str) -> None:
    await create_topic(kafka, name)
    sink = KafkaSink(name, kafka)
    assert sink.transactional is False and sink.snapshot() is None
    async with sink:
        await sink.send(b"a")
        await sink.commit(CheckpointInfo(1, None, {}))  # nothing to commit
        sink.restore(None)
    assert [r.value for r in await read_all(kafka, name, 1)] == [b"a"]
    with pytest.raises(ValueError, match="transactional_id needs transactional=True"):
        KafkaSink(name, kafka, transactional_id="x")
    assert KafkaSink(name, kafka, transactional=True).transactional_id == f"streamflow-{name}"
