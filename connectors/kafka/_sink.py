"""KafkaSink and DeadLetterTopic: produce with acks=all and idempotence, ack after the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    UnknownProducerId,
)

import streamflow as sf
from streamflow._logging import get_logger

from .._backoff import Backoff
from .._deadletter import dead_letter_entry
from .._errors import ConnectorError
from .._record import Record
from ..codecs import BYTES, Codec, as_bytes
from ._security import Security
from ._start import start_client

__all__ = ["DeadLetterTopic", "KafkaMessage", "KafkaSink"]

log = get_logger("streamflow")

# the idempotent producer's state is lost (e.g. after a broker restart): start a new one
_PRODUCER_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerClosed)


@dataclass(frozen=True, slots=True)
class KafkaMessage:
    """An item with explicit Kafka fields, for :class:`KafkaSink`: ``value`` goes through the
    sink's codec (``None`` produces a tombstone: a null value, the delete marker of a
    compacted topic); ``topic``/``partition`` override the sink's when given."""

    value: Any
    key: bytes | str | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    topic: str | None = None
    partition: int | None = None


_Prepared = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]
"""topic, value, key, headers, partition"""


class KafkaSink:
    """Produce each item to ``topic``; ``send`` returns once the broker confirmed it.

    The producer runs with ``acks="all"`` and idempotence on, so an item is acked (and its
    source may commit) only when every in-sync replica has it. Items may be:

    - a :class:`~streamflow.connectors.Record` (from any source of this package): produced raw, with
      its key and headers (a tombstone, ``raw is None``, stays a tombstone);
    - a :class:`KafkaMessage`: explicit key, headers, topic, partition;
    - anything else: encoded with ``codec``, keyed by ``key(item)`` when given.

    For throughput, either give the sink stage ``concurrency`` (e.g. 64-256 sends in flight,
    each acked on its own confirmation), or put a ``batch`` stage in front and set
    ``batched=True``: ``send`` then takes a list, produces every element and returns when the
    broker confirmed them all (the fastest way: one wait per batch, not one task per item).
    A broker that is unreachable is retried with backoff; after ``reconnect_timeout`` seconds
    the flow fails with :class:`~streamflow.connectors.BrokerUnavailable`. Retrying after a timeout may
    write an item twice (at least once).
    """

    def __init__(
        self,
        topic: str,
        bootstrap_servers: str | Sequence[str] = "127.0.0.1:9092",
        *,
        codec: Codec[Any] = BYTES,
        key: Callable[[Any], bytes | str | None] | None = None,
        linger_ms: int = 5,
        batched: bool = False,
        reconnect_timeout: float | None = 60.0,
        close_timeout: float = 30.0,
        security: Security | None = None,
        **producer_options: Any,
    ) -> None:
        self.topic = topic
        self.batched = batched
        self.bootstrap_servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        )
        self.codec = codec
        self.key = key
        self.linger_ms = linger_ms
        self.reconnect_timeout = reconnect_timeout
        self.close_timeout = close_timeout
        self.security = security
        self.producer_options = producer_options
        self.sent = 0
        self._producer: AIOKafkaProducer | None = None
        self._retired: list[AIOKafkaProducer] = []
        self._starting: asyncio.Lock | None = None

    def _what(self) -> str:
        return f"kafka sink {self.topic} ({self.bootstrap_servers})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.topic!r})"

    async def __aenter__(self) -> KafkaSink:
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Flush what is queued and close the producer."""
        producers = [p for p in (self._producer, *self._retired) if p is not None]
        self._producer, self._retired = None, []
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            for producer in producers:
                await producer.stop()

    async def _start(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._producer is not None:
                return self._producer
            kwargs: dict[str, Any] = {
                "bootstrap_servers": self.bootstrap_servers,
                "acks": "all",
                "enable_idempotence": True,
                "linger_ms": self.linger_ms,
                **(self.security.client_kwargs() if self.security else {}),
                **self.producer_options,
            }
            producer = await start_client(
                lambda: AIOKafkaProducer(**kwargs), self._what(), self.reconnect_timeout, kwargs
            )
            self._producer = producer
            log.info("connector.start", connector=self._what())
            return producer

    def _prepare(self, item: Any) -> _Prepared:
        if isinstance(item, Record):
            raw = None if item.raw is None else bytes(item.raw)
            return self.topic, raw, item.key, list(item.headers), None
        if isinstance(item, KafkaMessage):
            key = as_bytes(item.key) if item.key is not None else None
            return (
                item.topic or self.topic,
                None if item.value is None else self.codec.encode(item.value),
                key,
                list(item.headers),
                item.partition,
            )
        k = self.key(item) if self.key is not None else None
        return self.topic, self.codec.encode(item), as_bytes(k) if k is not None else None, [], None

    async def send(self, item: Any) -> None:
        """Produce ``item`` and wait for the broker's acknowledgement.

        :raises BrokerUnavailable: the broker stayed unreachable for ``reconnect_timeout``.
        :raises ConnectorError: the broker rejected the record (too large, not authorised...).
        """
        if self.batched:
            if not isinstance(item, list):
                raise TypeError(f"{self!r} is batched: put a batch stage before it")
            errors = await self._produce_many([self._prepare(x) for x in item])
            failed = next((e for e in errors if e is not None), None)
            if failed is not None:
                raise failed
            return
        await self._produce(*self._prepare(item))

    async def send_run(self, items: list[Any]) -> list[BaseException | None]:
        """Produce a run of items at once and wait for the broker's confirmations: the
        sink stage calls this for each run of queued items (no task per item). Per item,
        ``None`` once the broker has it, or the error it failed with (an item the codec
        cannot encode, a record the broker rejected): that item alone meets the stage's
        error policy."""
        outcomes: list[BaseException | None] = [None] * len(items)
        prepared: list[tuple[int, _Prepared]] = []  # (the item it belongs to, the record)
        for i, item in enumerate(items):
            try:
                if not self.batched:
                    prepared.append((i, self._prepare(item)))
                elif not isinstance(item, list):
                    raise TypeError(f"{self!r} is batched: put a batch stage before it")
                else:
                    prepared.extend([(i, self._prepare(x)) for x in item])
            except Exception as exc:
                outcomes[i] = exc
        errors = await self._produce_many([record for _, record in prepared])
        for (i, _), error in zip(prepared, errors, strict=True):
            if error is not None and outcomes[i] is None:
                outcomes[i] = error  # a batch fails with the first record that failed
        return outcomes

    async def _produce_many(self, records: list[_Prepared]) -> list[BaseException | None]:
        """Produce ``records`` at once (one wait for all the confirmations); the ones that
        fail are produced again one by one, with backoff. Per record, ``None`` or the
        error it finally failed with."""
        producer = self._producer or await self._start()
        futures: list[asyncio.Future[Any]] = []
        try:
            for topic, value, key, headers, partition in records:
                futures.append(
                    await producer.send(
                        topic, value, key=key, headers=headers or None, partition=partition
                    )
                )
        except KafkaError:
            pass  # the rest go through _produce below
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors: list[BaseException | None] = []
        for i, record in enumerate(records):
            if i < len(results) and not isinstance(results[i], BaseException):
                self.sent += 1
                errors.append(None)
            else:
                errors.append(await _outcome(self._produce(*record)))
        return errors

    async def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None,
    ) -> None:
        backoff: Backoff | None = None
        while True:
            producer = self._producer or await self._start()
            try:
                future = await producer.send(
                    topic, value, key=key, headers=headers or None, partition=partition
                )
                await future
            except KafkaError as exc:
                if isinstance(exc, _PRODUCER_LOST) or producer is not self._producer:
                    self._retire(producer, exc)
                elif not exc.retriable:
                    raise ConnectorError(
                        f"{self._what()}: the broker rejected a record for {topic!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if backoff is None:
                    backoff = Backoff(self._what(), give_up_after=self.reconnect_timeout)
                await backoff.wait(exc)
                continue
            if backoff is not None:
                backoff.reset()
            self.sent += 1
            return

    def _retire(self, producer: AIOKafkaProducer, error: KafkaError) -> None:
        """Replace a producer whose idempotence state is gone; its records are sent again."""
        if self._producer is producer:
            self._producer = None
            self._retired.append(producer)
            log.warning("connector.producer_reset", connector=self._what(), error=repr(error))


class DeadLetterTopic(KafkaSink):
    """A dead-letter sink for ``sf.DeadLetter(...)``: each failed item is produced to
    ``topic`` with its raw bytes as the value (and its original key), and headers
    ``dlq.reason``, ``dlq.flow``, ``dlq.stage``, ``dlq.source``, ``dlq.position`` (JSON) and
    ``dlq.attempts``.
    """

    async def send_run(self, items: list[Any]) -> list[BaseException | None]:
        """One by one: each failed item gets its own record with its headers."""
        return [await _outcome(self.send(item)) for item in items]

    async def send(self, item: Any) -> None:
        if not isinstance(item, sf.FailedItem):
            await super().send(item)
            return
        entry = dead_letter_entry(item)
        headers = [(f"dlq.{name}", text.encode()) for name, text in entry.fields().items()]
        await self._produce(self.topic, entry.raw, entry.key, headers, None)


async def _outcome(sending: Awaitable[None]) -> Exception | None:
    """``None`` when ``sending`` finished, else the exception it raised."""
    try:
        await sending
    except Exception as exc:
        return exc
    return None
