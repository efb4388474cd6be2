"""Socket sources and sinks over real TCP and Unix sockets."""

from __future__ import annotations

import asyncio
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from streamflow.connectors.sockets import ClientSink, ClientSource, ServerSink, ServerSource
from streamflow.connectors.tensors import TENSOR, TensorCodec
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors

from ._wait import until

pytestmark = pytest.mark.asyncio


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def _raw_client(port: int, data: bytes) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_tensors_over_tcp_arrive_whole_and_without_copies() -> None:
    small = [torch.randn(3, 4) for _ in range(100)]
    big = torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024)  # 2 MiB
    source = ServerSource(port=0, codec=TENSOR)
    records: list[connectors.Record] = []
    flow = sf.Flow("recv")
    flow.source("tcp", source).sink("out", sf.collect(records))
    async with flow.start() as running:
        await source.wait_listening()
        port = source.port
        sender = sf.Flow("send")
        sender.source("tensors", [*small, big]).sink("tcp", ClientSink(port=port, codec=TENSOR))
        await sender.run()
        await until(lambda: len(records) == 101)
        await running.stop()
    out = [connectors.decode(r) for r in records]
    assert all(torch.equal(a, b) for a, b in zip(out[:100], small, strict=True))
    assert torch.equal(out[100], big)
    # decoding aliases the frame's buffer (which the socket filled): no copy
    raw = records[100].raw
    assert isinstance(raw, bytearray) and len(raw) == 64 + big.nbytes
    out[100][0, 1] = -7.0
    assert struct.unpack_from("<f", raw, 64 + 4)[0] == -7.0
    assert source.name.startswith("tcp:127.0.0.1:")
    assert records[0].position == {"peer": records[0].position["peer"], "frame": 1}


async def test_unix_socket_server_and_client_with_json() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sock"
        source = ServerSource(path=path, codec=connectors.JSON)
        out: list[Any] = []
        flow = sf.Flow("unix")
        flow.source("unix", source).map("decode", connectors.decode).sink("out", sf.collect(out))
        async with flow.start() as running:
            await source.wait_listening()
            sender = sf.Flow("send")
            sender.source("n", [{"i": i} for i in range(20)]).sink(
                "unix", ClientSink(path=path, codec=connectors.JSON)
            )
            await sender.run()
            await until(lambda: len(out) == 20)
            await running.stop()
        assert out == [{"i": i} for i in range(20)]
        assert not path.exists()  # the server removed its socket file


async def test_malformed_frames_are_skipped_and_logged_and_the_flow_goes_on() -> None:
    """A tensor header that lies about its size, an oversized frame, a truncated frame."""
    source = ServerSource(port=0, codec=TENSOR, max_frame=4096)
    out: list[torch.Tensor] = []
    flow = sf.Flow("bad")
    flow.source("tcp", source).map("decode", connectors.decode, errors="skip").sink(
        "out", sf.collect(out)
    )
    good = TENSOR.encode(torch.ones(4))
    header = json.dumps({"dtype": "float32", "shape": [1000]}).encode()
    liar = b"SFT1" + struct.pack("<I", len(header)) + header + b"\0" * 16  # 16 of 4000 bytes
    with capture_logs() as logs:
        async with flow.start() as running:
            await source.wait_listening()
            port = source.port
            await _raw_client(port, _frame(good) + _frame(liar) + _frame(good))
            await _raw_client(port, _frame(good) + struct.pack(">I", 1 << 20) + b"x" * 100)
            await _raw_client(port, _frame(good) + struct.pack(">I", 500) + b"y" * 10)
            await _raw_client(port, _frame(good))
            await until(lambda: running.metrics()["decode"].items_in == 8)
            await running.stop()
    assert len(out) == 5 and all(torch.equal(t, torch.ones(4)) for t in out)
    m = flow.metrics()["decode"]
    assert (m.errors, m.skipped) == (3, 3)
    bad = [e for e in logs if e["event"] == "connector.bad_record"]
    reasons = [e["reason"] for e in bad]
    assert "header says float32[1000] = 4000 bytes of data, the buffer holds 16" in reasons[0]
    assert "frame of 1048576 bytes exceeds max_frame=4096" in reasons[1]
    assert "truncated frame: header says 500 bytes, got 10" in reasons[2]
    assert all(e["source"] == source.name and "peer" in e and "frame" in e for e in bad)
    assert [e["frame"] for e in bad] == [2, 2, 2]


async def test_connection_limit_refuses_extra_clients() -> None:
    source = ServerSource(port=0, max_connections=2)
    flow = sf.Flow("limit")
    out: list[Any] = []
    flow.source("tcp", source).sink("out", sf.collect(out))
    with capture_logs() as logs:
        async with flow.start() as running:
            await source.wait_listening()
            port = source.port
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await until(lambda: source.refused == 1)
            third_reader = conns[2][0]
            assert await third_reader.read() == b""  # closed by the server
            conns[0][1].write(_frame(b"hello"))
            await conns[0][1].drain()
            await until(lambda: len(out) == 1)
            for _, writer in conns:
                writer.close()
                await writer.wait_closed()
            await running.stop()
    assert source.connections == 0
    assert any(e["event"] == "connector.connection_refused" for e in logs)


async def test_a_slow_flow_stops_reading_so_tcp_pushes_back_on_the_sender() -> None:
    release = asyncio.Event()

    async def slow(record: connectors.Record) -> int:
        await release.wait()
        return len(record)

    source = ServerSource(port=0, max_buffered=4)
    flow = sf.Flow("slow")
    flow.source("tcp", source).map("slow", slow, capacity=1).sink("out", sf.collect(), capacity=1)
    payload = b"z" * 65536
    async with flow.start() as running:
        await source.wait_listening()
        port = source.port
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = 0

        async def pump() -> None:
            nonlocal sent
            while sent < 2000:  # 128 MiB if nothing pushed back
                writer.write(_frame(payload))
                await writer.drain()
                sent += 1

        pumping = asyncio.create_task(pump())
        await asyncio.sleep(1.0)
        stuck_at = sent
        assert stuck_at < 200, f"the sender was never slowed down ({stuck_at} frames sent)"
        assert len(source._inbox or []) <= 4 + 4  # bounded: capacity plus one receive buffer
        release.set()
        await asyncio.wait_for(pumping, 30)
        writer.close()
        await writer.wait_closed()
        await until(lambda: running.metrics()["out"].items_out == 2000, within=30)
        await running.stop()


async def test_server_sink_broadcasts_to_a_client_source() -> None:
    sink = ServerSink(port=0, codec=TensorCodec(framework="numpy"))
    received: list[Any] = []
    async with sink:
        port = sink.port
        source = ClientSource(port=port, codec=TensorCodec(framework="numpy"))
        flow = sf.Flow("client")
        flow.source("tcp", source).map("decode", connectors.decode).sink(
            "out", sf.collect(received)
        )
        task = asyncio.create_task(flow.run())
        for i in range(10):
            await sink.send(torch.full((2,), float(i)))
        await until(lambda: len(received) == 10)
    await asyncio.wait_for(task, 10)  # the server closed: the client source ended
    assert [float(a[0]) for a in received] == [float(i) for i in range(10)]


async def test_client_sink_gives_up_after_reconnect_timeout() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on port now
    flow = sf.Flow("nowhere")
    flow.source("n", [b"x"]).sink("tcp", ClientSink(port=port, reconnect_timeout=0.3))
    with pytest.raises(sf.StageError, match=r"socket sink tcp:127.0.0.1:\d+: unreachable for"):
        await flow.run()


async def test_a_batched_source_yields_what_arrived_together_in_order() -> None:
    """One write of 300 small frames: the flow receives lists of them (never more than
    max_batch), every frame once and in order, and decode_batch decodes each list."""
    source = ServerSource(port=0, codec=TENSOR, batched=True, max_batch=50)
    lists: list[list[torch.Tensor]] = []
    flow = sf.Flow("batched")
    flow.source("tcp", source).map("decode", connectors.decode_batch).sink("out", sf.collect(lists))
    frames = [torch.full((4,), float(i)) for i in range(300)]
    async with flow.start() as running:
        await source.wait_listening()
        await _raw_client(source.port, b"".join(_frame(TENSOR.encode(t)) for t in frames))
        await until(lambda: sum(map(len, lists)) == 300)
        await running.stop()
    got = [t for batch in lists for t in batch]
    assert all(torch.equal(a, b) for a, b in zip(got, frames, strict=True))
    assert max(map(len, lists)) > 1 and max(map(len, lists)) <= 50
    assert flow.metrics()["decode"].items_in == len(lists) < 300
    with pytest.raises(
        TypeError, match="expects streamflow.connectors.Record values, got bytes at index 1"
    ):
        connectors.decode_batch([connectors.Record(b"", "x", {}), b"raw"])
    with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
        ClientSource(port=1, batched=True, max_batch=0)


async def test_a_malformed_frame_in_a_batch_costs_only_itself() -> None:
    """A lying tensor header and a truncated frame inside batches: decode_batch hands each
    bad frame to the stage's policy on its own, with its raw bytes; the others go on."""
    dead: list[sf.FailedItem] = []
    source = ServerSource(port=0, codec=TENSOR, batched=True)
    lists: list[list[torch.Tensor]] = []
    flow = sf.Flow("bad-batch")
    flow.source("tcp", source).map(
        "decode", connectors.decode_batch, errors=sf.DeadLetter(sf.collect(dead))
    ).sink("out", sf.collect(lists))
    good = _frame(TENSOR.encode(torch.ones(4)))
    header = json.dumps({"dtype": "float32", "shape": [1000]}).encode()
    liar = _frame(b"SFT1" + struct.pack("<I", len(header)) + header + b"\0" * 16)
    with capture_logs() as logs:
        async with flow.start() as running:
            await source.wait_listening()
            await _raw_client(source.port, good * 3 + liar + good * 3)
            await _raw_client(source.port, good * 2 + struct.pack(">I", 500) + b"y" * 10)
            await until(lambda: len(dead) == 2 and sum(map(len, lists)) == 8)
            await running.stop()
    assert all(torch.equal(t, torch.ones(4)) for batch in lists for t in batch)
    m = flow.metrics()["decode"]
    assert m.errors == 2
    entries = sorted((connectors.dead_letter_entry(d) for d in dead), key=lambda e: e.reason)
    assert "header says float32[1000]" in entries[0].reason
    assert entries[0].position["frame"] == 4 and entries[0].raw == liar[4:]
    assert "truncated frame: header says 500 bytes, got 10" in entries[1].reason
    assert entries[1].position["frame"] == 3
    bad = [e for e in logs if e["event"] == "stage.error"]
    assert len(bad) == 2 and all(isinstance(e["index"], int) for e in bad)  # place in its list


async def test_a_batched_client_source_ends_with_the_server() -> None:
    sink = ServerSink(port=0, codec=connectors.JSON)
    lists: list[list[Any]] = []
    async with sink:
        source = ClientSource(port=sink.port, codec=connectors.JSON, batched=True)
        flow = sf.Flow("client")
        flow.source("tcp", source).map("decode", connectors.decode_batch).sink(
            "out", sf.collect(lists)
        )
        task = asyncio.create_task(flow.run())
        await until(lambda: sink.connections == 1)
        for i in range(20):
            await sink.send({"i": i})
        await until(lambda: sum(map(len, lists)) == 20)
    await asyncio.wait_for(task, 10)
    assert [x["i"] for batch in lists for x in batch] == list(range(20))


async def test_batched_sinks_write_a_frame_per_element() -> None:
    """batch -> ClientSink(batched=True) -> ServerSource: every element its own frame, in
    order; a batched sink given a single item fails naming the stage."""
    source = ServerSource(port=0, codec=TENSOR)
    records: list[connectors.Record] = []
    receiver = sf.Flow("recv")
    receiver.source("tcp", source).sink("out", sf.collect(records))
    frames = [torch.full((3,), float(i)) for i in range(50)]
    async with receiver.start() as running:
        await source.wait_listening()
        sink = ClientSink(port=source.port, codec=TENSOR, batched=True)
        sender = sf.Flow("send")
        sender.source("n", frames).batch("batch", 16, 0.01).sink("tcp", sink)
        await sender.run()
        assert sink.sent == 50 and sender.metrics()["tcp"].items_in < 50
        await until(lambda: len(records) == 50)
        await running.stop()
    got = [connectors.decode(r) for r in records]
    assert all(torch.equal(a, b) for a, b in zip(got, frames, strict=True))

    broadcast = ServerSink(port=0, codec=connectors.JSON, batched=True)
    received: list[Any] = []
    async with broadcast:
        client = sf.Flow("client")
        client.source("tcp", ClientSource(port=broadcast.port, codec=connectors.JSON)).map(
            "decode", connectors.decode
        ).sink("out", sf.collect(received))
        task = asyncio.create_task(client.run())
        await broadcast.send([{"i": 0}, {"i": 1}, {"i": 2}])
        await until(lambda: len(received) == 3)
        assert broadcast.sent == 3
    await asyncio.wait_for(task, 10)
    assert received == [{"i": 0}, {"i": 1}, {"i": 2}]

    wrong = sf.Flow("wrong")
    wrong.source("n", [1]).sink("tcp", ServerSink(port=0, batched=True))
    with pytest.raises(sf.StageError, match="is batched and takes lists, got int"):
        await wrong.run()
