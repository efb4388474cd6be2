"""KafkaSource and KafkaSink against the real broker: delivery, backpressure, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from streamflow.connectors.kafka import (
    DeadLetterTopic,
    KafkaMessage,
    KafkaSink,
    KafkaSource,
    Security,
)
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors

from ._kafka import committed, create_topic, produce, read_all
from ._wait import until
from .conftest import ROOT, answers, project_tls

pytestmark = pytest.mark.asyncio


async def test_sink_then_source_round_trip_with_keys_and_headers(kafka: str, name: str) -> None:
    await create_topic(kafka, name, partitions=2)
    items: list[Any] = [{"n": i} for i in range(50)]
    items.append(KafkaMessage({"n": 50}, key="special", headers=[("trace", b"t-1")]))
    out = sf.Flow("produce")
    sink = KafkaSink(name, kafka, codec=connectors.JSON, key=lambda v: str(v["n"] % 5))
    out.source("items", items).sink("kafka", sink, concurrency=16)
    await out.run()
    assert sink.sent == 51

    records: list[connectors.Record] = []
    source = KafkaSource(name, name, kafka, codec=connectors.JSON)
    flow = sf.Flow("consume")
    flow.source("kafka", source).sink("out", sf.collect(records))
    async with flow.start() as running:
        await until(lambda: len(records) == 51)
        await running.stop()
    values = sorted(connectors.decode(r)["n"] for r in records)
    assert values == list(range(51))
    special = next(r for r in records if r.key == b"special")
    assert special.headers == (("trace", b"t-1"),)
    assert special.source == f"kafka:{name}" and set(special.position) == {
        "topic",
        "partition",
        "offset",
    }
    assert {r.key for r in records if r is not special} == {b"0", b"1", b"2", b"3", b"4"}
    # everything finished was committed when the source closed
    assert sum(v or 0 for v in (await committed(kafka, name, name, 2)).values()) == 51
    assert sum(source.stats.committed.values()) == 51


async def test_batched_sink_acks_each_batch_after_the_broker(kafka: str, name: str) -> None:
    from streamflow.testing import MemorySource

    source = MemorySource([{"n": i} for i in range(100)])
    sink = KafkaSink(name, kafka, codec=connectors.JSON, batched=True)
    flow = sf.Flow("batched")
    flow.source("items", source).batch("b", 30, 0.01).sink("kafka", sink, concurrency=2)
    await flow.run()
    assert sink.sent == 100
    assert set(source.acked.values()) == {sf.Outcome.DELIVERED} and len(source.acked) == 100
    got = sorted(json.loads(r.value)["n"] for r in await read_all(kafka, name, 100))
    assert got == list(range(100))
    with pytest.raises(sf.StageError, match="is batched: put a batch stage before it"):
        bad = sf.Flow("unbatched")
        bad.source("items", [1]).sink("kafka", KafkaSink(name, kafka, batched=True))
        await bad.run()


async def test_tensors_travel_through_kafka_with_the_shared_codec(kafka: str, name: str) -> None:
    from streamflow.connectors.tensors import TENSOR, Tagged, TensorCodec

    tensors = [torch.randn(4, 5) for _ in range(10)]
    flow = sf.Flow("tensors-out")
    flow.source("t", [Tagged(t, {"i": i}) for i, t in enumerate(tensors)]).sink(
        "kafka", KafkaSink(name, kafka, codec=TENSOR), concurrency=4
    )
    await flow.run()
    got: list[Any] = []
    source = KafkaSource(name, name, kafka, codec=TensorCodec(with_meta=True))
    flow = sf.Flow("tensors-in")
    flow.source("kafka", source).map("decode", connectors.decode).sink("out", sf.collect(got))
    async with flow.start() as running:
        await until(lambda: len(got) == 10)
        await running.stop()
    assert all(torch.equal(g.tensor, tensors[g.meta["i"]]) for g in got)


async def test_kill_mid_stream_and_restart_loses_nothing(
    kafka: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cancel the flow's task while it consumes 10,000 messages, start it again in the same
    group: every message reaches the sink at least once."""
    total = 10_000
    await create_topic(kafka, name, partitions=3)
    await produce(kafka, name, (str(i).encode() for i in range(total)))
    seen: list[int] = []

    def make_flow() -> tuple[sf.Flow, KafkaSource]:
        source = KafkaSource(name, name, kafka, codec=connectors.JSON, max_pending=500)
        flow = sf.Flow("consume")
        flow.source("kafka", source).map("decode", connectors.decode).sink("out", sf.collect(seen))
        return flow, source

    flow, first = make_flow()
    task = asyncio.create_task(flow.run())
    await until(lambda: len(seen) >= 3000)
    task.cancel()  # the kill
    with pytest.raises(asyncio.CancelledError):
        await task
    killed_at = len(seen)
    assert killed_at < total, "the flow finished before it could be killed"

    flow, second = make_flow()
    async with flow.start() as running:
        await until(lambda: len(set(seen)) == total, within=30)
        await running.stop()
    assert set(seen) == set(range(total))  # none lost
    duplicates = len(seen) - total
    with capsys.disabled():
        print(
            f"\n[kafka kill/restart] {total} messages, killed after {killed_at} delivered: "
            f"{duplicates} duplicates on restart (first run committed "
            f"{sum(first.stats.committed.values())}, acked {first.stats.acked}, "
            f"fetched {first.stats.fetched})"
        )
    # only what was in flight when the flow was killed comes again
    assert duplicates <= first.stats.fetched - first.stats.acked
    assert sum(v or 0 for v in (await committed(kafka, name, name, 3)).values()) == total
    assert second.stats.assignments == 1


async def test_process_killed_with_sigkill_then_restarted_loses_nothing(
    kafka: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real crash: the consuming process gets SIGKILL (no final commit, no leaving the
    group). A new member of the same group re-reads from the last periodic commit."""
    total = 10_000
    await create_topic(kafka, name, partitions=3)
    await produce(kafka, name, (str(i).encode() for i in range(total)))
    out = tmp_path / "child.txt"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.connectors._crash_child",
        kafka,
        name,
        name,
        str(out),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until(lambda: out.exists() and out.stat().st_size > 15_000, within=30)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert child.returncode == -9, "the child ended before it was killed"
    first = [int(line) for line in out.read_text().splitlines()]
    assert 0 < len(first) < total

    seen: list[int] = []
    source = KafkaSource(name, name, kafka, codec=connectors.JSON, session_timeout_ms=6000)
    flow = sf.Flow("restart")
    flow.source("kafka", source).map("decode", connectors.decode).sink("out", sf.collect(seen))
    async with flow.start() as running:
        await until(lambda: len(set(first) | set(seen)) == total, within=40)
        await running.stop()
    assert set(first) | set(seen) == set(range(total))  # none lost
    duplicates = len(first) + len(seen) - total
    with capsys.disabled():
        print(
            f"\n[kafka SIGKILL/restart] {total} messages, process killed after {len(first)} "
            f"written: {duplicates} duplicates on restart (redelivered since the last commit)"
        )
    assert duplicates == len(set(first) & set(seen))


async def test_a_second_member_takes_partitions_without_losing_any(kafka: str, name: str) -> None:
    """A rebalance mid-stream: the first member commits what it finished on revoke, forgets
    what it had not handed out, and the second member continues from there."""
    total = 2000
    await create_topic(kafka, name, partitions=4)
    await produce(kafka, name, (str(i).encode() for i in range(total)))
    got_a: list[int] = []
    got_b: list[int] = []

    async def slowly(value: Any) -> int:
        await asyncio.sleep(0.002)
        return int(value)

    def member(out: list[int]) -> tuple[sf.Flow, KafkaSource]:
        source = KafkaSource(
            name,
            name,
            kafka,
            codec=connectors.JSON,
            max_pending=100,
            commit_interval=0.2,
            heartbeat_interval_ms=300,  # notice the rebalance quickly
        )
        flow = sf.Flow("member")
        flow.source("kafka", source).map("decode", connectors.decode).map("slow", slowly).sink(
            "out", sf.collect(out)
        )
        return flow, source

    flow_a, a = member(got_a)
    flow_b, b = member(got_b)
    async with flow_a.start() as running_a:
        await until(lambda: len(got_a) >= 200)
        async with flow_b.start() as running_b:
            await until(lambda: len(set(got_a) | set(got_b)) == total, within=40)
            await running_b.stop()
        await running_a.stop()
    assert set(got_a) | set(got_b) == set(range(total))
    assert a.stats.revocations >= 1 and b.stats.assignments >= 1 and got_b
    duplicates = len(got_a) + len(got_b) - total
    assert duplicates <= 100  # at most what was in flight on revoke (usually none)


class _StallingSink:
    """Stalls once for ``stall`` seconds on item ``at``; records everything."""

    def __init__(self, at: int, stall: float) -> None:
        self.at, self.stall = at, stall
        self.items: list[Any] = []

    async def send(self, item: Any) -> None:
        if len(self.items) == self.at:
            await asyncio.sleep(self.stall)
        self.items.append(item)


async def test_slow_sink_pauses_bounded_and_stays_in_group(kafka: str, name: str) -> None:
    """A sink stalled for longer than max_poll_interval: the source pauses at max_pending
    records, keeps polling, and keeps its partitions (no rebalance, no duplicates)."""
    await create_topic(kafka, name, partitions=2)
    await produce(kafka, name, (str(i).encode() for i in range(400)))
    source = KafkaSource(
        name,
        name,
        kafka,
        max_pending=40,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=1500,
    )
    sink = _StallingSink(at=10, stall=3.0)
    flow = sf.Flow("slow")
    flow.source("kafka", source).map("decode", connectors.decode, capacity=4).sink(
        "slow", sink, capacity=4
    )
    async with flow.start() as running:
        await until(lambda: len(sink.items) == 400, within=30)
        await running.stop()
    stats = source.stats
    assert sorted(int(v) for v in sink.items) == list(range(400))  # exactly once here
    assert stats.pauses >= 1
    assert stats.peak_pending <= 40
    assert (stats.assignments, stats.revocations) == (1, 0)  # never left the group


async def test_commit_never_skips_a_slow_message(kafka: str, name: str) -> None:
    await create_topic(kafka, name)
    await produce(kafka, name, (str(i).encode() for i in range(30)))
    release = asyncio.Event()

    async def work(record: connectors.Record) -> int:
        n = int(connectors.decode(record))
        if n == 5:
            await release.wait()
        return n

    out: list[int] = []
    source = KafkaSource(name, name, kafka, commit_interval=0.05)
    flow = sf.Flow("unordered")
    flow.source("kafka", source).map("work", work, concurrency=8, ordered=False).sink(
        "out", sf.collect(out)
    )
    async with flow.start() as running:
        await until(lambda: len(out) == 29)
        await asyncio.sleep(0.3)  # several commit intervals with offset 5 still in flight
        assert source.stats.committed.get((name, 0), 0) == 5
        assert (await committed(kafka, name, name))[0] in (None, 5)
        release.set()
        await until(lambda: len(out) == 30)
        await running.stop()
    assert source.stats.committed[(name, 0)] == 30


@pytest.mark.parametrize("batched", [False, True], ids=["per-record", "batched"])
async def test_malformed_values_go_to_a_dead_letter_topic(
    kafka: str, name: str, batched: bool
) -> None:
    """Per record, or in batches through decode_batch: only the bad records fail, each is
    dead-lettered with its own position and acked, so the commit moves past them."""
    await create_topic(kafka, name)
    values = [json.dumps({"n": i}).encode() for i in range(20)]
    values[4] = b'{"n": 4'  # broken JSON
    values[11] = b"\xff\xfe not json"
    await produce(kafka, name, values)
    dlq = f"{name}-dlq"
    out: list[Any] = []
    source = KafkaSource(name, name, kafka, codec=connectors.JSON)
    flow = sf.Flow("bad")
    dead_letter = sf.DeadLetter(DeadLetterTopic(dlq, kafka))
    stream = flow.source("kafka", source)
    if batched:
        stream = (
            stream.batch("batch", 8, 0.05)
            .map("decode", connectors.decode_batch, errors=dead_letter)
            .unbatch("split")
        )
    else:
        stream = stream.map("decode", connectors.decode, errors=dead_letter)
    stream.sink("out", sf.collect(out))
    with capture_logs() as logs:
        async with flow.start() as running:
            await until(lambda: len(out) == 18)
            await running.stop()
    assert [v["n"] for v in out] == [i for i in range(20) if i not in (4, 11)]
    assert source.stats.committed[(name, 0)] == 20  # the flow kept going past them
    bad = [e for e in logs if e["event"] == "connector.bad_record"]
    assert [(e["source"], e["partition"], e["offset"]) for e in bad] == [
        (f"kafka:{name}", 0, 4),
        (f"kafka:{name}", 0, 11),
    ]
    assert "JSONDecodeError" in bad[0]["reason"]
    dead = await read_all(kafka, dlq, 2)
    assert [d.value for d in dead] == [values[4], values[11]]
    headers = dict(dead[0].headers)
    assert b"JSONDecodeError" in headers["dlq.reason"]
    assert json.loads(headers["dlq.position"]) == {"topic": name, "partition": 0, "offset": 4}
    assert headers["dlq.stage"] == b"decode" and headers["dlq.flow"] == b"bad"
    decode = flow.metrics()["decode"]
    assert decode.errors == 2
    assert decode.items_in < 20 if batched else decode.items_in == 20


async def test_unreachable_broker_fails_the_flow_with_a_clear_error(brokers: None) -> None:
    source = KafkaSource("t", "g", "127.0.0.1:1", reconnect_timeout=0.5)
    flow = sf.Flow("nowhere")
    flow.source("kafka", source).sink("out", sf.collect())
    t0 = time.monotonic()
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert isinstance(info.value.cause, connectors.BrokerUnavailable)
    assert "kafka source kafka:t" in str(info.value) and "unreachable for" in str(info.value)
    assert time.monotonic() - t0 < 10

    sink = KafkaSink("t", "127.0.0.1:1", reconnect_timeout=0.5)
    flow = sf.Flow("nowhere-out")
    flow.source("n", [b"x"]).sink("kafka", sink)
    with pytest.raises(sf.StageError, match="kafka sink t .*unreachable for"):
        await flow.run()


async def _round_trip(kafka: str, secured: str, name: str, security: Security) -> None:
    """20 messages through a sink and a source that use ``secured`` with ``security``."""
    await create_topic(kafka, name)
    sent = [f"m{i}".encode() for i in range(20)]
    out = sf.Flow("produce")
    out.source("items", sent).sink("kafka", KafkaSink(name, secured, security=security))
    await out.run()
    records: list[connectors.Record] = []
    flow = sf.Flow("consume")
    flow.source("kafka", KafkaSource(name, name, secured, security=security)).sink(
        "out", sf.collect(records)
    )
    async with flow.start() as running:
        await until(lambda: len(records) == len(sent))
        await running.stop()
    assert sorted(bytes(r.raw) for r in records) == sorted(sent)


async def test_sasl_plain_against_the_real_broker(kafka: str, name: str) -> None:
    """The project's Kafka has a SASL/PLAIN listener (.ci/kafka.sh); good credentials carry
    data both ways, wrong ones fail the flow at once, saying why."""
    port = int(os.environ.get("KAFKA_SASL_PORT", "9094"))
    if not answers(port):
        pytest.skip(f"the running Kafka has no SASL listener on {port} (not .ci/kafka.sh's)")
    sasl = f"127.0.0.1:{port}"
    good = Security(
        "SASL_PLAINTEXT", mechanism="PLAIN", username="streamflow", password="streamflow-secret"
    )
    await _round_trip(kafka, sasl, name, good)

    bad = Security(
        "SASL_PLAINTEXT", mechanism="PLAIN", username="streamflow", password="not-the-password"
    )
    for stage in ("source", "sink"):
        flow = sf.Flow(f"bad-{stage}")
        if stage == "source":
            source = KafkaSource(name, f"{name}-bad", sasl, security=bad, reconnect_timeout=60)
            flow.source("kafka", source).sink("out", sf.collect())
        else:
            sink = KafkaSink(name, sasl, security=bad, reconnect_timeout=60)
            flow.source("items", [b"x"]).sink("kafka", sink)
        t0 = time.monotonic()
        with pytest.raises(sf.StageError) as info:
            await flow.run()
        assert isinstance(info.value.cause, connectors.AuthenticationFailed)
        assert "Authentication failed" in str(info.value) and "not-the-password" not in str(
            info.value
        )
        assert time.monotonic() - t0 < 30  # at once, not after reconnect_timeout


async def test_tls_against_the_real_broker(kafka: str, name: str) -> None:
    """The project's Kafka has a TLS listener with a self-signed certificate: trusting it
    carries data; the system trust store refuses it at once, saying why."""
    port = int(os.environ.get("KAFKA_SSL_PORT", "9095"))
    ca = project_tls("kafka", port)
    tls = f"127.0.0.1:{port}"
    trusted = Security("SSL", ssl_context=ssl.create_default_context(cafile=str(ca)))
    await _round_trip(kafka, tls, name, trusted)

    flow = sf.Flow("untrusted")
    sink = KafkaSink(name, tls, security=Security("SSL"), reconnect_timeout=60)
    flow.source("items", [b"x"]).sink("kafka", sink)
    t0 = time.monotonic()
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    assert isinstance(info.value.cause, connectors.AuthenticationFailed)
    assert "the TLS handshake failed" in str(info.value)
    assert "certificate verify failed" in str(info.value)
    assert time.monotonic() - t0 < 30


async def test_security_options_pass_through() -> None:
    sasl = Security("SASL_SSL", mechanism="SCRAM-SHA-512", username="u", password="secret")
    kwargs = sasl.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "u" and kwargs["sasl_plain_password"] == "secret"
    assert kwargs["ssl_context"] is not None
    assert "secret" not in repr(sasl)
    with pytest.raises(ValueError, match="needs a SASL mechanism"):
        Security("SASL_PLAINTEXT")
    with pytest.raises(ValueError, match="needs username and password"):
        Security("SASL_PLAINTEXT", mechanism="PLAIN")
