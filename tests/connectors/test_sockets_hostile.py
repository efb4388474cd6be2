"""Hostile input on the socket connectors: peers that announce frames they never send, byte
streams cut anywhere, floods of tiny frames.

A reader's memory follows the bytes it received, never what a peer claims; the frames it
yields are those of a plain reference parser, whatever the chunking; and no callback holds
the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import socket
import struct
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamflow.connectors.sockets import ServerSource
from streamflow.connectors.sockets._framing import _CHUNK, _RING, FrameReader, Inbox
from streamflow.connectors.sockets._source import DEFAULT_MAX_FRAME

import streamflow as sf
from streamflow import connectors
from streamflow.testing import loop_lag

from ._wait import until

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024
PEERS = 64
PATTERN = random.Random(13).randbytes(8 * MiB)  # frame payloads are slices of it


def _rss() -> int | None:
    statm = Path("/proc/self/statm")
    return (
        int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else None
    )


# -- 64 peers that each announce max_frame bytes ---------------------------------------------


@pytest.mark.parametrize("max_frame", [DEFAULT_MAX_FRAME, 256 * MiB], ids=["default", "256MiB"])
async def test_peers_announcing_huge_frames_cost_only_what_they_send(max_frame: int) -> None:
    """64 connections send a prefix claiming ``max_frame`` bytes and hold the connection:
    the source allocates its 64 receive buffers and next to nothing else (the old reader
    allocated the 64 frames at once: 1 GiB by default, 16 GiB with a 256 MiB max_frame).
    Then the peers send part of their frame (two of them, with the default max_frame, all
    of it) and close: whole frames arrive intact, the others as truncated-frame records."""
    source = ServerSource(port=0, max_frame=max_frame, max_connections=PEERS)
    records: list[connectors.Record] = []
    flow = sf.Flow("claims")
    flow.source("tcp", source).sink("out", sf.collect(records))
    whole = 2 if max_frame <= len(PATTERN) * 2 else 0  # peers that send their whole frame
    payload = (PATTERN * 2)[:max_frame] if whole else b""
    part = [3 * MiB if i == whole else 300 * 1024 if i % 2 else 1000 for i in range(PEERS)]
    bound = PEERS * (_RING + _CHUNK) + 16 * MiB  # what 64 readers may hold before data comes
    async with flow.start() as running:
        await source.wait_listening()
        tracemalloc.start()
        try:
            base, rss0 = tracemalloc.get_traced_memory()[0], _rss()
            peers = [await asyncio.open_connection("127.0.0.1", source.port) for _ in range(PEERS)]
            for _, writer in peers:
                writer.write(struct.pack(">I", max_frame))
            await until(lambda: source.connections == PEERS)
            await asyncio.sleep(0.2)  # the readers read the prefixes; the peers hold on
            held = tracemalloc.get_traced_memory()[0] - base
            rss = _rss()
            assert held < bound, f"64 bare prefixes hold {held / MiB:.0f} MiB (traced)"
            if rss is not None and rss0 is not None:
                assert rss - rss0 < bound + 64 * MiB, f"RSS grew by {(rss - rss0) / MiB:.0f} MiB"
            # the peak since the start covers anything the readers allocated for a prefix and
            # freed since; the truncated records below prove that they read them
            tracemalloc.reset_peak()
            sent = 0
            for i, (_, writer) in enumerate(peers):
                data = payload if i < whole else PATTERN[: part[i]]
                writer.write(data)
                sent += len(data)
            for _, writer in peers:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            await until(lambda: len(records) == PEERS, within=30)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        await running.stop()
    # what was sent lies in the senders' buffers, then in the records: count it 4 times over
    assert peak < bound + 4 * sent, f"peak {peak / MiB:.0f} MiB for {sent / MiB:.0f} MiB sent"
    by_peer = {r.position["peer"]: r for r in records}
    ports = [f"127.0.0.1:{w.get_extra_info('sockname')[1]}" for _, w in peers]
    assert sorted(by_peer) == sorted(ports)
    for i, port in enumerate(ports):
        record = by_peer[port]
        assert record.position["frame"] == 1
        if i < whole:
            assert record.error is None and record.raw == payload
        else:
            assert record.error is not None
            assert f"truncated frame: header says {max_frame} bytes, got {part[i]}" in record.error
            assert record.raw == struct.pack(">I", max_frame) + PATTERN[: part[i]]  # as received


# -- any byte stream, cut anywhere, against a reference parser -------------------------------


def reference(stream: bytes, max_frame: int) -> tuple[list[bytes], list[int], str | None]:
    """The frames of ``stream`` read the obvious way, the offsets where frames start, and
    how the stream ends badly (``"oversized"``, ``"truncated"``), if it does."""
    frames: list[bytes] = []
    starts: list[int] = []
    at = 0
    while at < len(stream):
        starts.append(at)
        if len(stream) - at < 4:
            return frames, starts, "truncated"
        (length,) = struct.unpack_from(">I", stream, at)
        if length > max_frame:
            return frames, starts, "oversized"
        if len(stream) - at - 4 < length:
            return frames, starts, "truncated"
        frames.append(stream[at + 4 : at + 4 + length])
        at += 4 + length
    return frames, starts, None


@dataclass
class Case:
    layout: str  # the stream, in words (for hypothesis's report)
    stream: bytes = field(repr=False)
    max_frame: int
    cuts: list[int]  # the sizes the stream arrives in, in turn (as far as the reader allows)
    capacity: int  # the inbox's
    consume_every: int  # the flow takes records every this many reads (and when paused)
    take: int  # and at most this many
    ring: int = _RING
    chunk: int = _CHUNK
    batch: int = 1024

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis shows it
        printer.text(repr(self))  # (the layout, not the stream's bytes)


@st.composite
def cases(draw: st.DrawFn, *, small: bool) -> Case:
    """A stream of valid frames, maybe ended by an oversized or a truncated one. ``small``:
    the reader's ring, chunk and batch are tiny (drawn), so short streams reach every path:
    frames cut from the ring, compaction, spilling into a frame's buffer, doubling it, a
    backlog of complete frames; otherwise they are the defaults and frames are up to 3 MiB."""
    if small:
        ring = draw(st.integers(8, 64))
        geometry = {
            "ring": ring,
            "chunk": draw(st.integers(1, 48)),
            "batch": draw(st.integers(1, 6)),
        }
        largest = 3 * ring
    else:
        geometry, ring, largest = {}, _RING, 3 * MiB
    max_frame = draw(st.sampled_from([largest, 2 * ring, 2**32 - 1]))
    size = st.one_of(st.integers(0, 3), st.integers(0, min(max_frame, ring)))
    if small or max_frame > ring:
        size = st.one_of(size, st.integers(0, min(max_frame, largest)))
    sizes = draw(st.lists(size, max_size=10 if small else 6))
    parts = []
    for i, n in enumerate(sizes):
        at = (i * 7919 + n) % (len(PATTERN) - n)
        parts += [struct.pack(">I", n), PATTERN[at : at + n]]
    layout = f"frames of {sizes} bytes"
    tail = draw(st.sampled_from(["none", "oversized", "truncated", "truncated-prefix"]))
    if tail == "oversized" and max_frame < 2**32 - 1:
        claim = draw(st.integers(max_frame + 1, 2**32 - 1))
        junk = draw(st.binary(max_size=16))
        parts += [struct.pack(">I", claim), junk]
        layout += f", then a prefix of {claim} and {len(junk)} bytes"
    elif tail == "truncated":
        claim = draw(st.integers(1, max_frame))  # up to max_frame: 4 GiB, announced
        got = draw(st.integers(0, min(claim - 1, largest)))
        parts += [struct.pack(">I", claim), PATTERN[:got]]
        layout += f", then a prefix of {claim} and {got} bytes"
    elif tail == "truncated-prefix":
        cut = draw(st.integers(1, 3))
        parts += [struct.pack(">I", draw(st.integers(0, 2**32 - 1)))[:cut]]
        layout += f", then {cut} bytes of a prefix"
    stream = b"".join(parts)
    cuts = draw(st.lists(st.integers(1, 3 * ring if small else 4 * MiB), min_size=1, max_size=8))
    floor = len(stream) // 1000  # (at most some thousand reads)
    return Case(
        layout=layout,
        stream=stream,
        max_frame=max_frame,
        cuts=[max(floor, c) for c in cuts],
        capacity=draw(st.integers(1, 8)),
        consume_every=draw(st.integers(1, 5)),
        take=draw(st.integers(1, 10)),
        **geometry,
    )


async def feed(
    case: Case, cuts: list[int], *, check_bound: bool
) -> tuple[list[connectors.Record], FrameReader]:
    """Run a :class:`FrameReader` on a real transport (over a socket pair) and hand it
    ``case.stream`` through the BufferedProtocol interface as the transport would, in reads
    of ``cuts`` bytes in turn (or fewer: what ``get_buffer`` has room for): a read only while
    the transport reads, the buffer kept alive during ``buffer_updated``, EOF at the end.
    The flow's side takes records as it goes. ``check_bound``: after every read, the reader
    holds at most its ring, plus ``chunk`` and twice the bytes of the frame in progress."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    inbox = Inbox(case.capacity)
    if case.ring == _RING and case.chunk == _CHUNK and case.batch == 1024:  # as sources do
        reader = FrameReader(inbox, "pair", connectors.BYTES, case.max_frame)
    else:
        reader = FrameReader(
            inbox,
            "pair",
            connectors.BYTES,
            case.max_frame,
            ring=case.ring,
            chunk=case.chunk,
            batch=case.batch,
        )
    transport, _ = await loop.create_connection(lambda: reader, sock=ours)
    starts = reference(case.stream, case.max_frame)[1]
    stream, records, at, reads, idle = case.stream, [], 0, 0, 0
    try:
        while not transport.is_closing():
            if not transport.is_reading():  # a backlog to cut, or the inbox is full
                records += inbox.take(case.take)
                await asyncio.sleep(0)
                idle += 1
                assert idle < 100_000, "the reader stopped reading for good"
                continue
            if at == len(stream):
                if not reader.eof_received():
                    transport.close()
                break
            buf = reader.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), cuts[reads % len(cuts)], len(stream) - at)
            buf[:n] = memoryview(stream)[at : at + n]
            at += n
            reads += 1
            reader.buffer_updated(n)
            del buf
            assert len(inbox) <= case.capacity + 1
            if check_bound:
                start = starts[bisect.bisect_right(starts, at - 1) - 1]
                received = max(0, at - start - 4)  # of the frame in progress
                assert reader.held_bytes <= case.ring + case.chunk + 2 * received
            if reads % case.consume_every == 0:
                records += inbox.take(case.take)
    finally:
        transport.close()
        theirs.close()
        await asyncio.sleep(0)  # connection_lost
    return records + inbox.take(len(inbox)), reader


def check_against_reference(case: Case, records: list[connectors.Record]) -> None:
    frames, _, ending = reference(case.stream, case.max_frame)
    good = [r for r in records if r.error is None]
    assert [bytes(r.raw or b"") for r in good] == frames
    assert all(isinstance(r.raw, bytearray) for r in good)
    assert [r.position["frame"] for r in records] == list(range(1, len(records) + 1))
    bad = [r for r in records if r.error is not None]
    if ending is None:
        assert bad == []
    else:
        assert len(bad) == 1 and records[-1] is bad[0]
        reason = "exceeds max_frame" if ending == "oversized" else "truncated frame"
        assert reason in (bad[0].error or "")


@settings(max_examples=600)
@given(cases(small=True), st.randoms(use_true_random=False))
async def test_frames_are_the_reference_parsers_under_any_chunking(
    case: Case, rng: random.Random
) -> None:
    """Tiny ring, chunk and batch, so short streams take every path; each stream arrives
    cut three ways (the drawn cuts, as few reads as the reader allows, random cuts). The
    reader never raises, never holds more than the bound, and yields the reference parser's
    frames, then one error record for an oversized or truncated tail."""
    ending = reference(case.stream, case.max_frame)[2]
    for cuts in (
        case.cuts,
        [len(case.stream) + 1],
        [rng.randint(1, 2 * case.ring) for _ in range(16)],
    ):
        records, reader = await feed(case, cuts, check_bound=True)
        check_against_reference(case, records)
        assert reader.clean_eof == (ending is None)


@settings(max_examples=100)
@given(cases(small=False))
async def test_the_default_reader_allocates_for_the_bytes_not_the_claims(case: Case) -> None:
    """The default reader, frames up to 3 MiB and claims up to 4 GiB, its allocations traced:
    the peak is its ring and chunk plus a few times the bytes received."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        records, _ = await feed(case, case.cuts, check_bound=False)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    check_against_reference(case, records)
    # a frame's buffer (<= 2x + chunk), the records and an error record's copy of its bytes
    assert peak <= _RING + _CHUNK + 4 * len(case.stream) + MiB


# -- a flood of tiny frames ------------------------------------------------------------------


async def test_200_000_tiny_frames_never_hold_the_loop() -> None:
    """One write of 200,000 frames of 0 to 3 bytes (some 47,000 fit in one receive buffer):
    the reader cuts them a bounded batch at a time, and the loop is never held 50 ms."""
    source = ServerSource(port=0)
    count = 0

    def counted(record: connectors.Record) -> None:
        nonlocal count
        count += 1

    flow = sf.Flow("flood")
    flow.source("tcp", source).sink("out", counted)
    data = b"".join(struct.pack(">I", i % 4) + b"x" * (i % 4) for i in range(200_000))
    async with flow.start() as running:
        await source.wait_listening()
        async with loop_lag() as lag:
            _, writer = await asyncio.open_connection("127.0.0.1", source.port)
            writer.write(data)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await until(lambda: count == 200_000, within=60)
        await running.stop()
    assert lag.samples > 10
    assert lag.worst < 0.05, lag
