"""MqttSink: publish each item; with QoS 1 it is acked once the broker confirmed it."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import aiomqtt
import anyio

from streamflow._logging import get_logger

from .._backoff import Backoff
from .._record import Record
from ..codecs import BYTES, Codec
from ._refused import raise_if_refused

__all__ = ["MqttMessage", "MqttSink"]

log = get_logger("streamflow")


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """An item with its own ``topic`` (and optionally ``qos``/``retain``) for
    :class:`MqttSink`; ``value`` goes through the sink's codec."""

    topic: str
    value: Any
    qos: Literal[0, 1] | None = None
    retain: bool | None = None


class MqttSink:
    """Publish each item to ``topic`` (or to an :class:`MqttMessage`'s own topic).

    QoS 1 (default): ``send`` returns once the broker acknowledged the message (PUBACK), so the
    item is acked only then; QoS 0 returns once the message is handed to the socket. A lost
    connection is re-established with backoff and the message published again (at least
    once); after ``reconnect_timeout`` seconds the flow fails with
    :class:`~streamflow.connectors.BrokerUnavailable`; a refused login, or a broker certificate that
    ``tls_context`` does not trust, fails at once with :class:`~streamflow.connectors.AuthenticationFailed`.
    ``timeout`` bounds the wait for one PUBACK.
    """

    def __init__(
        self,
        topic: str | None = None,
        *,
        hostname: str = "127.0.0.1",
        port: int = 1883,
        qos: Literal[0, 1] = 1,
        retain: bool = False,
        codec: Codec[Any] = BYTES,
        client_id: str | None = None,
        reconnect_timeout: float | None = 60.0,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        **client_options: Any,
    ) -> None:
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, got {qos!r}")
        self.topic = topic
        self.hostname = hostname
        self.port = port
        self.qos = qos
        self.retain = retain
        self.codec = codec
        self.client_id = client_id
        self.reconnect_timeout = reconnect_timeout
        self.timeout = timeout
        self.client_kwargs: dict[str, Any] = {
            "username": username,
            "password": password,
            "tls_context": tls_context,
            **client_options,
        }
        self.name = f"mqtt:{hostname}:{port}"
        self.sent = 0
        self._client: aiomqtt.Client | None = None

    def _what(self) -> str:
        return f"mqtt sink {self.topic} ({self.hostname}:{self.port})"

    def __repr__(self) -> str:
        return f"MqttSink({self.topic!r}, {self.hostname}:{self.port})"

    async def __aenter__(self) -> MqttSink:
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
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            lost = client._disconnected  # read it, or asyncio logs "never retrieved"
            if lost.done() and not lost.cancelled():
                lost.exception()

    async def _connect(self) -> aiomqtt.Client:
        backoff = Backoff(self._what(), give_up_after=self.reconnect_timeout)
        while True:
            client = aiomqtt.Client(
                self.hostname,
                self.port,
                identifier=self.client_id,
                timeout=self.timeout,
                **self.client_kwargs,
            )
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                raise_if_refused(exc, self._what())
                await backoff.wait(exc)
                continue
            backoff.reset()
            self._client = client
            return client

    def _prepare(self, item: Any) -> tuple[str, bytes, int, bool]:
        if isinstance(item, MqttMessage):
            qos = self.qos if item.qos is None else item.qos
            retain = self.retain if item.retain is None else item.retain
            return item.topic, self.codec.encode(item.value), qos, retain
        if self.topic is None:
            raise ValueError(f"{self!r} has no topic: send MqttMessage items or set topic=")
        payload = item.data() if isinstance(item, Record) else self.codec.encode(item)
        return self.topic, payload, self.qos, self.retain

    async def send(self, item: Any) -> None:
        """Publish ``item`` (waiting for the broker's PUBACK with QoS 1).

        :raises BrokerUnavailable: no connection for ``reconnect_timeout`` seconds.
        """
        topic, payload, qos, retain = self._prepare(item)
        backoff: Backoff | None = None
        while True:
            client = self._client or await self._connect()
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=self.timeout)
            except aiomqtt.MqttError as exc:
                await self._close()
                if backoff is None:
                    backoff = Backoff(self._what(), give_up_after=self.reconnect_timeout)
                await backoff.wait(exc)
                continue
            if backoff is not None:
                backoff.reset()
            self.sent += 1
            return
