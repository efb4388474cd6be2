"""MqttSource: subscribe to sensor topics; QoS 1 messages are acknowledged after processing."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal

import aiomqtt

import streamflow as sf
from streamflow._logging import get_logger

from .._background import Background
from .._backoff import Backoff
from .._buffered import BufferedSource
from .._inorder import InOrder
from .._record import Record
from ..codecs import BYTES, Codec
from ._refused import raise_if_refused

__all__ = ["MqttSource", "MqttSourceStats"]

log = get_logger("streamflow")


@dataclass
class MqttSourceStats:
    """Counters of an :class:`MqttSource`."""

    received: int = 0
    """Messages received from the broker."""
    acked: int = 0
    """QoS 1 messages acknowledged to the broker (PUBACK) after the flow finished them."""
    dropped: int = 0
    """QoS 0 messages dropped because ``max_buffered`` messages were waiting."""
    connects: int = 0
    """Successful connections (more than 1 means it reconnected)."""


class MqttSource(BufferedSource[tuple[int, aiomqtt.Message]]):
    """Subscribe to ``topics`` (wildcards ``+`` and ``#`` allowed) and yield each message as a
    :class:`~streamflow.connectors.Record` (``position``: ``topic``, ``mid``, ``qos``).

    QoS 1 (default): the broker's PUBLISH is acknowledged only once the flow has finished the
    message (and every message received before it: MQTT requires acknowledgements in order).
    With a fixed ``client_id`` the session persists (``clean_session=False``), so messages not
    acknowledged when the process stops are delivered again when it comes back: at least
    once. The broker's in-flight window (mosquitto: ``max_inflight_messages``, 20) bounds how
    many unacknowledged messages it sends, so a slow flow slows the broker down for this
    client. QoS 0: at most once; when ``max_buffered`` messages are waiting, new ones are
    dropped and counted (fresh readings matter more than old ones for sensors).

    A lost connection is re-established with backoff (re-subscribing); after
    ``reconnect_timeout`` seconds without one the flow fails with
    :class:`~streamflow.connectors.BrokerUnavailable`. A refused login or subscription, or a broker
    certificate that ``tls_context`` does not trust, fails it at once with
    :class:`~streamflow.connectors.AuthenticationFailed`. Messages received on the old connection and
    finished afterwards cannot be acknowledged any more; with a persistent session the broker
    sends them again.
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        *,
        hostname: str = "127.0.0.1",
        port: int = 1883,
        qos: Literal[0, 1] = 1,
        client_id: str | None = None,
        clean_session: bool | None = None,
        codec: Codec[Any] = BYTES,
        max_buffered: int = 1000,
        reconnect_timeout: float | None = 60.0,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        keepalive: int = 60,
        **client_options: Any,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("MqttSource needs at least one topic")
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        self.hostname = hostname
        self.port = port
        self.qos = qos
        self.client_id = client_id
        self.clean_session = clean_session if clean_session is not None else client_id is None
        self.codec = codec
        self.max_buffered = max_buffered
        self.reconnect_timeout = reconnect_timeout
        self.client_kwargs: dict[str, Any] = {
            "username": username,
            "password": password,
            "tls_context": tls_context,
            "keepalive": keepalive,
            **client_options,
        }
        self.name = f"mqtt:{hostname}:{port}"
        self.stats = MqttSourceStats()
        self._buffer: deque[tuple[int, aiomqtt.Message]] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._connected = asyncio.Event()
        self._error: BaseException | None = None
        self._background = Background(self._what(), self._fail)
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._acks: InOrder[int, int] = InOrder()
        self._seq = 0

    def _what(self) -> str:
        return f"mqtt source {self.topics} ({self.hostname}:{self.port})"

    def __repr__(self) -> str:
        return f"MqttSource({self.topics!r}, {self.hostname}:{self.port})"

    async def wait_subscribed(self) -> None:
        """Wait until the source is connected and subscribed (after the flow started)."""
        await self._connected.wait()

    async def __aenter__(self) -> MqttSource:
        if self._background.running:
            raise RuntimeError(f"{self!r} is already running; create one source per flow run")
        self._background.start(self._run(), self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Send the acknowledgements still due, disconnect."""
        await self._background.stop()

    async def _run(self) -> None:
        backoff = Backoff(self._what(), give_up_after=self.reconnect_timeout)
        try:
            while True:
                client = aiomqtt.Client(
                    self.hostname,
                    self.port,
                    identifier=self.client_id,
                    clean_session=self.clean_session,
                    **self.client_kwargs,
                )
                # aiomqtt has no switch for it yet: ask paho to leave PUBACKs to us
                client._client.manual_ack_set(self.qos > 0)
                try:
                    async with client:
                        wanted: list[tuple[str, int]] = [(t, int(self.qos)) for t in self.topics]
                        await client.subscribe(wanted)
                        self._client = client
                        self._generation += 1
                        self._acks = InOrder()
                        self.stats.connects += 1
                        backoff.reset()
                        self._connected.set()
                        log.info("connector.subscribed", connector=self._what(), qos=self.qos)
                        async for message in client.messages:
                            await self._put(message)
                except aiomqtt.MqttError as exc:
                    self._client = None
                    self._connected.clear()
                    raise_if_refused(exc, self._what())
                    await backoff.wait(exc)
        finally:
            self._client = None

    async def _put(self, message: aiomqtt.Message) -> None:
        self.stats.received += 1
        buffer = self._buffer
        if len(buffer) >= self.max_buffered:
            if message.qos == 0:
                self.stats.dropped += 1
                if self.stats.dropped % 1000 == 1:
                    log.warning(
                        "connector.dropped",
                        connector=self.name,
                        qos=0,
                        dropped=self.stats.dropped,
                        max_buffered=self.max_buffered,
                    )
                return
            while len(buffer) >= self.max_buffered:
                self._room.clear()
                await self._room.wait()
        buffer.append((self._generation, message))
        self._ready.set()

    def _running(self) -> bool:
        return self._background.running

    def _next(self) -> sf.Message[Record]:
        generation, m = self._buffer.popleft()
        self._room.set()
        payload = m.payload if isinstance(m.payload, bytes | bytearray) else str(m.payload).encode()
        position = {"topic": m.topic.value, "mid": m.mid, "qos": m.qos}
        record = Record(payload, self.name, position, codec=self.codec)
        meta = {"source": self.name, **position}
        if m.qos == 0:
            return sf.Message(record, meta=meta)
        self._seq += 1
        if generation == self._generation:
            self._acks.track(self._seq, m.mid)
        return sf.Message(record, meta=meta, on_ack=partial(self._ack, generation, self._seq))

    def _ack(self, generation: int, seq: int, outcome: sf.Outcome) -> None:
        if outcome & sf.Outcome.ABORTED:
            return  # the flow stopped before handling it: not acked, the broker resends it
        if generation != self._generation:
            return  # received on a connection that is gone: the broker will resend it
        client = self._client
        for mid in self._acks.done(seq):
            if client is not None:
                client._client.ack(mid, 1)
                self.stats.acked += 1
