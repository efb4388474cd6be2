"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

:class:`FrameReader` is a buffered protocol. Frames that fit in its receive buffer (the
*ring*, 256 KiB) are cut out of it; a frame too large for the ring is received straight into
its own ``bytearray`` (no copy: a tensor decoded from it aliases the socket's data).

Memory is bounded by what was received, never by what a peer claims. A connection holds its
ring and, while a frame too large for the ring arrives, that frame's buffer: created only
when the frame's bytes reach the end of the ring, sized for the bytes received (those the
kernel holds for the socket count) and doubled in place as more come, so it is never larger
than twice the bytes received plus 1 MiB, and the copies cost amortised O(n). A prefix
announcing ``max_frame`` bytes costs at most 1 MiB beyond the ring until those bytes come
(nothing, unless it ends exactly at the ring's end): 64 connections that each sent one hold
their 64 rings (16 MiB), whatever ``max_frame`` is.

One callback cuts at most 1024 frames, and no more than the :class:`Inbox` has room for;
the rest waits in the ring, reading paused, for a later turn of the event loop. So a burst of
tiny frames neither holds the loop nor turns into an unbounded pile of records. When the
inbox is full, the reader stops reading the socket; the kernel buffers fill and TCP's flow
control slows the sender.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from streamflow._logging import get_logger

from .._record import Record
from ..codecs import Buffer, Codec

__all__ = ["LENGTH", "FrameReader", "Inbox", "encode_frame"]

log = get_logger("streamflow")

LENGTH = struct.Struct(">I")
_RING = 256 * 1024  # receive buffer: frames that fit are cut out of it
_CHUNK = 1024 * 1024  # a large frame's buffer: at most this (and 2x the data received)
_BATCH = 1024  # most frames cut in one callback

if sys.platform != "win32":
    import fcntl
    import termios

    def _queued(transport: asyncio.BaseTransport | None) -> int:
        """Bytes waiting in the kernel's receive buffer of ``transport``'s socket: they have
        arrived, so a frame's buffer may be sized for them (0 when it cannot tell)."""
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return 0
        try:
            answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):  # (closed meanwhile)
            return 0
        queued: int = struct.unpack("i", answer)[0]
        return queued

else:

    def _queued(transport: asyncio.BaseTransport | None) -> int:
        return 0


def encode_frame(item: Any, codec: Codec[Any]) -> list[Buffer]:
    """The buffers of one frame for ``item``: a :class:`Record` is sent raw; a codec with
    ``encode_parts`` (the tensor codec) is written without joining its parts."""
    if isinstance(item, Record):
        if item.raw is None:
            raise ValueError(f"the record from {item.where()} is a tombstone: it has no frame")
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

    Bounded by ``capacity`` records, plus a frame or two per connection (one that came when
    the inbox was full, an error record): readers cut no more frames than there is room for,
    and pause their socket when it is full; they resume when the flow took some.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Record] = deque()
        self._ready = asyncio.Event()
        self._paused: set[FrameReader] = set()
        self._closed = False
        self.error: BaseException | None = None

    @property
    def room(self) -> int:
        """How many records fit before the inbox is full (``<= 0`` when it is)."""
        return self.capacity - len(self._items)

    def put(self, records: list[Record], reader: FrameReader | None) -> None:
        """Add ``records``; when the inbox is full, pause ``reader`` (if given)."""
        items = self._items
        if records:
            items.extend(records)
            self._ready.set()
        if reader is not None and len(items) >= self.capacity:
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

    ``ring`` (the receive buffer's size), ``chunk`` (how far a large frame's buffer may run
    ahead of its data, besides doubling) and ``batch`` (most frames cut per callback) are
    there for tests; the defaults suit every use.
    """

    def __init__(
        self,
        inbox: Inbox,
        source: str,
        codec: Codec[Any],
        max_frame: int,
        on_close: Callable[[FrameReader, BaseException | None], None] | None = None,
        *,
        ring: int = _RING,
        chunk: int = _CHUNK,
        batch: int = _BATCH,
    ) -> None:
        if ring < 8 or chunk < 1 or batch < 1:
            raise ValueError(
                f"need ring >= 8, chunk >= 1, batch >= 1; got {ring}, {chunk}, {batch}"
            )
        self.inbox = inbox
        self.source = source
        self.codec = codec
        self.max_frame = max_frame
        self.on_close = on_close
        self.peer = "?"
        self.frames = 0
        self.transport: asyncio.Transport | None = None
        self.clean_eof = False
        self._ring = bytearray(ring)
        self._view = memoryview(self._ring)
        self._start = 0  # the ring holds received bytes not cut yet at [_start, _end)
        self._end = 0
        self._chunk = chunk
        self._batch = batch
        self._big: bytearray | None = None  # the buffer of a frame too large for the ring
        self._big_length = 0  # that frame's length (the buffer grows up to it)
        self._big_filled = 0  # bytes of it received
        self._held = False  # the inbox is full
        self._backlog = False  # the ring may hold complete frames not cut yet
        self._scheduled = False  # a call to cut them is scheduled
        self._broken = False
        self._lost = False

    @property
    def held_bytes(self) -> int:
        """The bytes of the buffers this reader holds: its ring and a large frame's buffer."""
        return len(self._ring) + (len(self._big) if self._big is not None else 0)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        log.info("connector.connected", source=self.source, peer=self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        big = self._big
        if big is not None:
            if self._big_filled == len(big):
                big = self._grow()
            return memoryview(big)[self._big_filled :]
        if self._end == len(self._ring):
            self._cut_all()  # (asyncio's transports do not read while paused: others might)
            if self._too_large_for_ring():
                return memoryview(self._spill())[self._big_filled :]
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled == self._big_length:
                frame, self._big = self._big, None
                self._deliver(frame)
            return
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool:
        self._cut_all()
        self._check_truncated("the peer closed the connection")
        self.clean_eof = not self._broken
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            self._cut_all()
            self._check_truncated(f"the connection was lost ({exc!r})")
        self.inbox.forget(self)
        if self.on_close is not None:
            self.on_close(self, exc)

    # -- flow control --------------------------------------------------------------------

    def pause(self) -> None:
        """The inbox is full: read nothing more until :meth:`resume`."""
        self._held = True
        self._update()

    def resume(self) -> None:
        """The inbox has room again."""
        self._held = False
        self._update()

    def _update(self) -> None:
        """Read the socket only while the ring holds no complete frame and the inbox has
        room; cut the ring's backlog on a later turn of the loop, once there is room."""
        if self._backlog and not (self._held or self._scheduled or self._lost or self._broken):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._cut_backlog)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        reading = not (self._held or self._backlog)
        if reading != transport.is_reading():
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _cut_backlog(self) -> None:
        self._scheduled = False
        if self._backlog and not (self._held or self._lost or self._broken):
            self._parse()

    def _cut_all(self) -> None:
        """Cut every complete frame of the backlog now, however full the inbox: at the end of
        the connection (reading was paused while there was a backlog, so this is rare)."""
        if self._backlog and not self._broken:
            self._parse(limit=len(self._ring))

    # -- framing -------------------------------------------------------------------------

    def _parse(self, limit: int | None = None) -> None:
        """Cut complete frames out of the ring and hand them over together: at most
        ``batch`` of them and no more than the inbox has room for (or ``limit``)."""
        if limit is None:
            limit = min(self._batch, max(1, self.inbox.room))
        ring, view = self._ring, self._view
        start, end, max_frame = self._start, self._end, self.max_frame
        unpack, source, codec, peer = LENGTH.unpack_from, self.source, self.codec, self.peer
        records: list[Record] = []
        n = self.frames
        while end - start >= 4 and n - self.frames < limit:
            (length,) = unpack(ring, start)
            if length > max_frame:
                self.frames = n
                self.inbox.put(records, None)
                self._start = self._end = 0
                self._backlog = False
                self._bad(
                    view[start : min(end, start + 4 + 64)].tobytes(),
                    f"frame of {length} bytes exceeds max_frame={max_frame}",
                )
                return
            if end - start - 4 < length:
                break
            n += 1
            frame = bytearray(view[start + 4 : start + 4 + length])
            records.append(Record(frame, source, {"peer": peer, "frame": n}, codec=codec))
            start += 4 + length
        self._backlog = n - self.frames >= limit and end - start >= 4
        self.frames = n
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        self.inbox.put(records, self)
        self._update()

    def _too_large_for_ring(self) -> bool:
        """Whether the frame at the ring's start can never fit in the ring."""
        if self._end - self._start < 4:
            return False
        length: int = LENGTH.unpack_from(self._ring, self._start)[0]
        return length + 4 > len(self._ring)

    def _spill(self) -> bytearray:
        """Move the frame at the ring's start, too large for the ring, to a buffer of its own,
        sized for the bytes that arrived, never for the length the prefix announces: at most
        twice those bytes plus ``chunk``. The size is the frame's length halved ``k`` times
        (rounding up), so that doubling it reaches that length with no resize besides."""
        start, end = self._start, self._end
        length = self._big_length = LENGTH.unpack_from(self._ring, start)[0]
        have = end - start - 4
        size, affordable = length, 2 * (have + _queued(self.transport)) + self._chunk
        while size > affordable:
            size = (size + 1) // 2
        big = self._big = bytearray(size)
        big[:have] = self._view[start + 4 : end]
        self._big_filled = have
        self._start = self._end = 0
        return big

    def _grow(self) -> bytearray:
        """The large frame's buffer is full and the frame is not: double the buffer in place
        (the allocator can often move its pages rather than copy them), up to the length."""
        big = self._big
        assert big is not None
        try:
            big *= 2
        except BufferError:  # (a view of it is still alive: copy it instead)
            big = self._big = big * 2
        if len(big) > self._big_length:
            del big[self._big_length :]
        return big

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
            got, want = self._big_filled, self._big_length
            raw = LENGTH.pack(want) + memoryview(self._big)[:got]  # as in the ring: prefixed
            self._big = None
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
