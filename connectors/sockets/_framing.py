"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

:class:`FrameReader` is a buffered protocol: small frames are cut out of one receive buffer,
a large frame is received straight into its own ``bytearray`` (no copy, so a tensor decoded
from it aliases the socket's data). When the :class:`Inbox` is full, the reader stops reading
the socket; the kernel buffers fill and TCP's flow control slows the sender.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from .._record import Record
from ..codecs import Buffer, Codec

__all__ = ["LENGTH", "FrameReader", "Inbox", "encode_frame"]

log = structlog.get_logger("streamflow")

LENGTH = struct.Struct(">I")
_RING = 256 * 1024  # receive buffer for small frames
_BIG = 64 * 1024  # frames at least this large get their own buffer


def encode_frame(item: Any, codec: Codec[Any]) -> list[Buffer]:
    """The buffers of one frame for ``item``: a :class:`Record` is sent raw; a codec with
    ``encode_parts`` (the tensor codec) is written without joining its parts."""
    if isinstance(item, Record):
        parts: list[Buffer] = [item.raw]
    else:
        encode_parts = getattr(codec, "encode_parts", None)
        parts = list(encode_parts(item)) if encode_parts is not None else [codec.encode(item)]
    size = sum(memoryview(p).nbytes for p in parts)
    if size > 0xFFFFFFFF:
        raise ValueError(f"a frame holds at most 4 GiB, got {size} bytes")
    return [LENGTH.pack(size), *parts]


class Inbox:
    """Frames waiting for the flow, shared by the connections of one source.

    Bounded by ``capacity`` records (plus at most one receive buffer's worth per connection):
    readers pause their socket when it is full and resume when the flow took some.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Record] = deque()
        self._ready = asyncio.Event()
        self._paused: set[FrameReader] = set()
        self._closed = False
        self.error: BaseException | None = None

    def put(self, records: list[Record], reader: FrameReader | None) -> None:
        """Add ``records``; when the inbox is full, pause ``reader`` (if given)."""
        if records:
            self._items.extend(records)
            self._ready.set()
            if reader is not None and len(self._items) >= self.capacity:
                reader.pause()
                self._paused.add(reader)

    def forget(self, reader: FrameReader) -> None:
        self._paused.discard(reader)

    def close(self, error: BaseException | None = None) -> None:
        """No more frames: ``get`` raises ``StopAsyncIteration`` (or ``error``) once empty."""
        self._closed = True
        if error is not None and self.error is None:
            self.error = error
        self._ready.set()

    def get_nowait(self) -> Record | None:
        """The next record if one is waiting (``None`` otherwise)."""
        items = self._items
        if not items:
            return None
        record = items.popleft()
        if self._paused and len(items) < self.capacity // 2 + 1:
            self._resume_all()
        return record

    def take(self, limit: int) -> list[Record]:
        """The records waiting, oldest first: all of them, or the first ``limit``."""
        items = self._items
        if len(items) <= limit:
            taken = list(items)
            items.clear()
        else:
            pop = items.popleft
            taken = [pop() for _ in range(limit)]
        if self._paused and len(items) < self.capacity // 2 + 1:
            self._resume_all()
        return taken

    def _resume_all(self) -> None:
        paused, self._paused = self._paused, set()
        for reader in paused:
            reader.resume()

    async def wait(self) -> None:
        """Until a record waits; ``StopAsyncIteration`` (or the error) once closed and empty."""
        items = self._items
        while not items:
            if self.error is not None:
                raise self.error
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    async def get(self) -> Record:
        await self.wait()
        record = self.get_nowait()
        assert record is not None
        return record

    def __len__(self) -> int:
        return len(self._items)


class FrameReader(asyncio.BufferedProtocol):
    """Reads frames from one connection into an :class:`Inbox` as :class:`Record` values.

    A frame longer than ``max_frame`` or cut short by the end of the connection becomes a
    record with ``error`` set (the decode stage sends it to its error policy) and the
    connection is closed: a peer that broke the framing cannot be trusted to resynchronise.
    """

    def __init__(
        self,
        inbox: Inbox,
        source: str,
        codec: Codec[Any],
        max_frame: int,
        on_close: Callable[[FrameReader, BaseException | None], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.source = source
        self.codec = codec
        self.max_frame = max_frame
        self.on_close = on_close
        self.peer = "?"
        self.frames = 0
        self.transport: asyncio.Transport | None = None
        self.clean_eof = False
        self._ring = bytearray(_RING)
        self._view = memoryview(self._ring)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._big_filled = 0
        self._reading = True
        self._broken = False

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        log.info("connector.connected", source=self.source, peer=self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big_view is not None:
            return self._big_view[self._big_filled :]
        if self._end == len(self._ring):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled == len(self._big):
                frame, self._big, self._big_view = self._big, None, None
                self._deliver(frame)
            return
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool:
        self._check_truncated("the peer closed the connection")
        self.clean_eof = not self._broken
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._check_truncated(f"the connection was lost ({exc!r})")
        self.inbox.forget(self)
        if self.on_close is not None:
            self.on_close(self, exc)

    # -- flow control --------------------------------------------------------------------

    def pause(self) -> None:
        if self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = True
            self.transport.resume_reading()

    # -- framing -------------------------------------------------------------------------

    def _parse(self) -> None:
        """Cut every complete frame out of the receive buffer; hand them over together."""
        ring, view = self._ring, self._view
        start, end, max_frame = self._start, self._end, self.max_frame
        unpack, source, codec, peer = LENGTH.unpack_from, self.source, self.codec, self.peer
        records: list[Record] = []
        n = self.frames
        while end - start >= 4:
            (length,) = unpack(ring, start)
            if length > max_frame:
                self.frames = n
                self.inbox.put(records, self)
                self._start = self._end = 0
                self._bad(
                    view[start : min(end, start + 4 + 64)].tobytes(),
                    f"frame of {length} bytes exceeds max_frame={max_frame}",
                )
                return
            if end - start - 4 >= length:
                n += 1
                frame = bytearray(view[start + 4 : start + 4 + length])
                records.append(Record(frame, source, {"peer": peer, "frame": n}, codec=codec))
                start += 4 + length
                continue
            if length >= _BIG:  # receive the rest straight into the frame's own buffer
                have = end - start - 4
                self._big = bytearray(length)
                self._big[:have] = view[start + 4 : end]
                self._big_view = memoryview(self._big)
                self._big_filled = have
                start = end = 0
            break
        self.frames = n
        self.inbox.put(records, self)
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _compact(self) -> None:
        n = self._end - self._start
        self._ring[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    def _deliver(self, frame: bytearray) -> None:
        self.frames += 1
        position = {"peer": self.peer, "frame": self.frames}
        self.inbox.put([Record(frame, self.source, position, codec=self.codec)], self)

    def _bad(self, raw: bytes, reason: str) -> None:
        self._broken = True
        self.frames += 1
        position = {"peer": self.peer, "frame": self.frames}
        record = Record(raw, self.source, position, codec=self.codec, error=reason)
        log.warning("connector.bad_frame", source=self.source, **position, reason=reason)
        self.inbox.put([record], None)
        if self.transport is not None:
            self.transport.close()

    def _check_truncated(self, why: str) -> None:
        if self._broken:
            return
        if self._big is not None:
            got, want = self._big_filled, len(self._big)
            raw = bytes(self._big[:got])
            self._big = self._big_view = None
        elif self._end > self._start:
            raw = bytes(self._view[self._start : self._end])
            want = LENGTH.unpack_from(self._ring, self._start)[0] if len(raw) >= 4 else -1
            got = len(raw) - 4
        else:
            return
        self._start = self._end = 0
        if want < 0:
            reason = f"truncated frame: {len(raw)} of 4 length bytes, then {why}"
        else:
            reason = f"truncated frame: header says {want} bytes, got {max(got, 0)}, then {why}"
        self._bad(raw, reason)
