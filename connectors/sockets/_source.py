"""Socket sources: a server that accepts senders, and a client that connects to one."""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import Any

import anyio

from streamflow._logging import get_logger

from .._background import Background
from .._backoff import Backoff
from .._record import Record
from ..codecs import BYTES, Codec
from ._address import Address, Listening
from ._framing import FrameReader, Inbox

__all__ = ["ClientSource", "ServerSource"]

log = get_logger("streamflow")

DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class _InboxReader:
    """Reading the frames an :class:`Inbox` holds: the flow's source protocol. ``batched``:
    each item is a list of the frames waiting (at most ``max_batch``) instead of one frame."""

    _inbox: Inbox | None
    batched: bool
    max_batch: int

    def __aiter__(self) -> _InboxReader:
        return self

    def receive_nowait(self) -> Record | list[Record]:
        """Frames already received (the flow's fast path); ``asyncio.QueueEmpty`` if none."""
        inbox = self._inbox
        if inbox is not None and self.batched:
            if len(inbox):
                return inbox.take(self.max_batch)
            raise asyncio.QueueEmpty
        record = inbox.get_nowait() if inbox is not None else None
        if record is None:  # (a Record may be empty, so falsy: compare with None)
            raise asyncio.QueueEmpty
        return record

    async def __anext__(self) -> Record | list[Record]:
        inbox = self._inbox
        if inbox is None:
            raise RuntimeError(f"{self!r} was not started: the flow enters it as a context")
        if self.batched:
            await inbox.wait()
            return inbox.take(self.max_batch)
        record = inbox.get_nowait()  # fast path, no coroutine (a Record may be empty: falsy)
        return record if record is not None else await inbox.get()


def _check_max_batch(max_batch: int) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    return max_batch


class ServerSource(_InboxReader, Listening):
    """Listen on ``host``/``port`` (TCP, ``127.0.0.1`` by default; ``port=0`` picks a free
    one) or ``path`` (Unix socket) and yield every length-prefixed frame any client sends, as
    :class:`~streamflow.connectors.Record` values (``position``: ``peer`` and ``frame`` number).

    Frames of one connection stay in order. At most ``max_connections`` clients at once (more
    are accepted and closed at once, logged as ``connector.connection_refused``); frames above
    ``max_frame`` bytes, and frames cut short, become records with ``error`` set and close that
    connection. When ``max_buffered`` frames wait for the flow, reading stops, so TCP's own
    flow control slows the senders. There are no acknowledgements on the wire: a frame read
    and not yet processed is lost if the process dies. Runs until the flow stops it.

    ``batched=True``: each item is a list of the frames received and not yet taken (at least
    one, at most ``max_batch``), so the flow's per-item work is paid once per list rather
    than once per frame; decode it with :func:`streamflow.connectors.decode_batch`. Frames wait for
    nothing: a list holds what arrived while the flow was busy with the one before. Lists
    of a few dozen frames are best: the objects of a longer list live long enough for
    Python's garbage collector to move them to an older generation, and collecting those
    costs more than the lists save.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        path: str | os.PathLike[str] | None = None,
        codec: Codec[Any] = BYTES,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_connections: int = 64,
        max_buffered: int = 256,
        batched: bool = False,
        max_batch: int = 64,
    ) -> None:
        self._address = Address.of(host, port, path)
        self.codec = codec
        self.batched = batched
        self.max_batch = _check_max_batch(max_batch)
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_buffered = max_buffered
        self.refused = 0
        self.name = self._address.label()
        self._server: asyncio.Server | None = None
        self._readers: set[FrameReader] = set()
        self._inbox: Inbox | None = None
        self._bound: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"ServerSource({self.name})"

    async def wait_listening(self) -> tuple[str, int] | str:
        """Wait until the flow started the server; return :attr:`address`."""
        if self._bound is None:
            self._bound = asyncio.Event()
        await self._bound.wait()
        return self.address

    @property
    def connections(self) -> int:
        return len(self._readers)

    async def __aenter__(self) -> ServerSource:
        loop = asyncio.get_running_loop()
        self._inbox = Inbox(self.max_buffered)
        if self._address.path is not None:
            self._server = await loop.create_unix_server(self._protocol, self._address.path)
        else:
            self._server = await loop.create_server(
                self._protocol, self._address.host, self._address.port
            )
        self.name = self._bound_label()
        for reader in self._readers:
            reader.source = self.name
        if self._bound is None:
            self._bound = asyncio.Event()
        self._bound.set()
        log.info("connector.start", connector=self.name, max_connections=self.max_connections)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with anyio.CancelScope(shield=True):
            server.close()
            for reader in list(self._readers):
                if reader.transport is not None:
                    reader.transport.abort()
            await server.wait_closed()
            await asyncio.sleep(0)  # let connection_lost run
        self._remove_socket_file()
        log.info("connector.stop", connector=self.name)

    def _protocol(self) -> asyncio.BaseProtocol:
        assert self._inbox is not None
        if len(self._readers) >= self.max_connections:
            self.refused += 1
            return _Refuse(self.name, self.max_connections)
        reader = FrameReader(
            self._inbox, self.name, self.codec, self.max_frame, on_close=self._closed
        )
        self._readers.add(reader)
        return reader

    def _closed(self, reader: FrameReader, exc: BaseException | None) -> None:
        self._readers.discard(reader)
        log.info("connector.disconnected", source=self.name, peer=reader.peer, frames=reader.frames)


class _Refuse(asyncio.Protocol):
    """Closes a connection over the limit at once."""

    def __init__(self, source: str, limit: int) -> None:
        self.source = source
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        log.warning(
            "connector.connection_refused",
            source=self.source,
            peer=str(peer),
            reason=f"max_connections={self.limit} reached",
        )
        transport.close()


class ClientSource(_InboxReader):
    """Connect to ``host``/``port`` (or the Unix socket ``path``) and yield the frames the
    server sends, as :class:`~streamflow.connectors.Record` values.

    The stream ends when the server closes the connection at a frame boundary. A refused or
    broken connection is retried with backoff; after ``reconnect_timeout`` seconds without a
    connection the flow fails with :class:`~streamflow.connectors.BrokerUnavailable`. Framing errors,
    backpressure, ``batched`` and ``max_batch`` work as for :class:`ServerSource`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        path: str | os.PathLike[str] | None = None,
        codec: Codec[Any] = BYTES,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_buffered: int = 256,
        reconnect_timeout: float | None = 30.0,
        batched: bool = False,
        max_batch: int = 64,
    ) -> None:
        self._address = Address.of(host, port, path)
        self.codec = codec
        self.batched = batched
        self.max_batch = _check_max_batch(max_batch)
        self.max_frame = max_frame
        self.max_buffered = max_buffered
        self.reconnect_timeout = reconnect_timeout
        self.name = self._address.label()
        self._inbox: Inbox | None = None
        self._background = Background(f"socket source {self.name}", self._fail)
        self._transport: asyncio.Transport | None = None

    def __repr__(self) -> str:
        return f"ClientSource({self.name})"

    def _fail(self, error: BaseException) -> None:
        if self._inbox is not None:
            self._inbox.close(error)

    async def __aenter__(self) -> ClientSource:
        self._inbox = Inbox(self.max_buffered)
        self._background.start(self._run(self._inbox), self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._background.running:
            return
        await self._background.stop()
        with anyio.CancelScope(shield=True):
            if self._transport is not None:
                self._transport.abort()
                await asyncio.sleep(0)

    async def _run(self, inbox: Inbox) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(f"socket source {self.name}", give_up_after=self.reconnect_timeout)
        while True:
            closed: asyncio.Future[BaseException | None] = loop.create_future()

            def factory(closed: asyncio.Future[BaseException | None] = closed) -> FrameReader:
                def on_close(reader: FrameReader, exc: BaseException | None) -> None:
                    if not closed.done():
                        closed.set_result(exc)

                return FrameReader(inbox, self.name, self.codec, self.max_frame, on_close)

            try:
                if self._address.path is not None:
                    transport, reader = await loop.create_unix_connection(
                        factory, self._address.path
                    )
                else:
                    assert self._address.port is not None
                    transport, reader = await loop.create_connection(
                        factory, self._address.host, self._address.port
                    )
            except OSError as exc:
                await backoff.wait(exc)  # gives up with BrokerUnavailable: the source's error
                continue
            backoff.reset()
            self._transport = transport
            lost = await closed
            self._transport = None
            if lost is None and reader.clean_eof:
                inbox.close()
                return
            log.warning("connector.disconnected", source=self.name, error=repr(lost))
