"""Socket sinks: a client that connects to a receiver, and a server that receivers join."""

from __future__ import annotations

import asyncio
import contextlib
import os
from types import TracebackType
from typing import Any

import anyio

from streamflow._logging import get_logger

from .._backoff import Backoff
from ..codecs import BYTES, Buffer, Codec
from ._address import Address, Listening
from ._framing import encode_frame

__all__ = ["ClientSink", "ServerSink"]

log = get_logger("streamflow")


class ClientSink:
    """Connect to ``host``/``port`` (or the Unix socket ``path``) and write each item as one
    length-prefixed frame (a :class:`~streamflow.connectors.Record` raw, anything else with ``codec``;
    tensors are written from their own memory, without a joined copy).

    ``send`` returns once the frame is handed to the kernel and the write buffer is below its
    high-water mark, so a slow receiver pushes back on the flow. That is all TCP promises:
    there is no application-level acknowledgement, and a frame written just before the
    connection broke may be lost. On a broken connection the sink reconnects with backoff and
    writes the frame again; after ``reconnect_timeout`` seconds it fails the flow with
    :class:`~streamflow.connectors.BrokerUnavailable`.

    ``batched=True``: ``send`` takes a list (put a ``batch`` stage before the sink), writes
    one frame per element and waits for the write buffer once for the whole list; after a
    broken connection the whole list is written again.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        path: str | os.PathLike[str] | None = None,
        codec: Codec[Any] = BYTES,
        reconnect_timeout: float | None = 30.0,
        batched: bool = False,
    ) -> None:
        self._address = Address.of(host, port, path)
        self.codec = codec
        self.batched = batched
        self.reconnect_timeout = reconnect_timeout
        self.name = self._address.label()
        self.sent = 0
        self._writer: asyncio.StreamWriter | None = None

    def __repr__(self) -> str:
        return f"ClientSink({self.name})"

    async def __aenter__(self) -> ClientSink:
        await self._connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> asyncio.StreamWriter:
        backoff = Backoff(f"socket sink {self.name}", give_up_after=self.reconnect_timeout)
        while True:
            try:
                if self._address.path is not None:
                    _, writer = await asyncio.open_unix_connection(self._address.path)
                else:
                    _, writer = await asyncio.open_connection(
                        self._address.host, self._address.port
                    )
            except OSError as exc:
                await backoff.wait(exc)
                continue
            backoff.reset()
            self._writer = writer
            return writer

    async def send(self, item: Any) -> None:
        """Write ``item`` as one frame (a list as one frame per element, if ``batched``).

        :raises BrokerUnavailable: no connection for ``reconnect_timeout`` seconds.
        """
        frames = _frames(self, item)
        while True:
            writer = self._writer or await self._connect()
            try:
                _write(writer, frames)
                await writer.drain()
            except OSError as exc:
                log.warning("connector.disconnected", sink=self.name, error=repr(exc))
                await self._close()
                continue
            self.sent += len(frames)
            return


def _frames(sink: ClientSink | ServerSink, item: Any) -> list[list[Buffer]]:
    """The frames ``sink.send(item)`` writes: one, or one per element of a batched list."""
    if not sink.batched:
        return [encode_frame(item, sink.codec)]
    if not isinstance(item, list | tuple):
        raise TypeError(
            f"{sink!r} is batched and takes lists, got {type(item).__name__}: put a batch "
            "stage before it, or make it with batched=False"
        )
    return [encode_frame(x, sink.codec) for x in item]


def _write(writer: asyncio.StreamWriter, frames: list[list[Buffer]]) -> None:
    if writer.is_closing():
        raise ConnectionResetError("the connection is closed")
    for parts in frames:
        if len(parts) == 2 and len(parts[1]) < 4096:  # a small frame: one write
            writer.write(bytes(parts[0]) + bytes(parts[1]))
        else:
            for part in parts:
                writer.write(part)


class ServerSink(Listening):
    """Listen on ``host``/``port`` (TCP, ``127.0.0.1`` by default) or ``path`` and write each
    item as one frame to every connected client (a broadcast).

    ``send`` waits until at least one client is connected, then returns once every client's
    write buffer is below its high-water mark, so the slowest client pushes back on the flow.
    A client whose connection breaks is dropped (logged); at most ``max_connections`` clients.
    No acknowledgements on the wire (see :class:`ClientSink`). ``batched=True``: ``send``
    takes a list and writes one frame per element, as for :class:`ClientSink`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        path: str | os.PathLike[str] | None = None,
        codec: Codec[Any] = BYTES,
        max_connections: int = 64,
        batched: bool = False,
    ) -> None:
        self._address = Address.of(host, port, path)
        self.codec = codec
        self.batched = batched
        self.max_connections = max_connections
        self.name = self._address.label()
        self.sent = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._joined = asyncio.Event()

    def __repr__(self) -> str:
        return f"ServerSink({self.name})"

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def __aenter__(self) -> ServerSink:
        if self._address.path is not None:
            self._server = await asyncio.start_unix_server(self._accept, self._address.path)
        else:
            self._server = await asyncio.start_server(
                self._accept, self._address.host, self._address.port
            )
        self.name = self._bound_label()
        log.info("connector.start", connector=self.name)
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
            for writer in list(self._writers):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._writers.clear()
            await server.wait_closed()
        self._remove_socket_file()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._writers) >= self.max_connections:
            log.warning(
                "connector.connection_refused",
                sink=self.name,
                peer=str(peer),
                reason=f"max_connections={self.max_connections} reached",
            )
            writer.close()
            return
        self._writers.add(writer)
        self._joined.set()
        log.info("connector.connected", sink=self.name, peer=str(peer))

    async def send(self, item: Any) -> None:
        """Write ``item`` to every connected client (waiting for the first one to join); a
        list as one frame per element if ``batched``."""
        frames = _frames(self, item)
        while not self._writers:
            self._joined.clear()
            await self._joined.wait()
        for writer in list(self._writers):
            try:
                _write(writer, frames)
                await writer.drain()
            except OSError as exc:
                log.warning(
                    "connector.disconnected",
                    sink=self.name,
                    peer=str(writer.get_extra_info("peername")),
                    error=repr(exc),
                )
                self._writers.discard(writer)
                writer.close()
        self.sent += len(frames)
