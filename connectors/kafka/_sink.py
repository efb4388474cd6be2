"""KafkaSink and DeadLetterTopic: produce with acks=all and idempotence, ack after the broker;
with ``transactional=True``, in one Kafka transaction per checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    IllegalOperation,
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
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
from ._source import _parse_offsets
from ._start import start_client

if TYPE_CHECKING:
    from streamflow._checkpoints import CheckpointInfo

__all__ = ["DeadLetterTopic", "KafkaMessage", "KafkaSink", "TransactionFailed"]

log = get_logger("streamflow")

# the idempotent producer's state is lost (e.g. after a broker restart): start a new one
_PRODUCER_LOST = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerClosed)


class TransactionFailed(ConnectorError):
    """A transactional :class:`KafkaSink`'s transaction cannot go on, so its output since the
    last checkpoint will not be committed: the producer was fenced (another producer
    started with the same ``transactional_id``, or the transaction ran longer than the
    producer's ``transaction_timeout_ms`` and the broker aborted it), its state was lost, or
    a commit failed or timed out. The message names the sink and its ``transactional_id``;
    the flow fails and, restarted, resumes at its last committed checkpoint."""


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

    ``transactional=True`` (for flows with checkpoints): with checkpoints, exactly once for
    ``read_committed`` consumers. Everything the sink produces goes into a Kafka transaction
    that is committed in :meth:`commit`, once the checkpoint that covers it is durable,
    together with the offsets of the flow's Kafka sources (so the sources' groups move
    exactly as the output does; those sources must read this cluster); output that no
    checkpoint covers is aborted when the sink exits. Consumers of ``topic`` must read it
    with ``isolation_level="read_committed"``, and they see the output only at each
    checkpoint. ``transactional_id`` (default ``"streamflow-<topic>"``) must stay the same
    across restarts of a flow (a new producer fences the old one and aborts its open
    transaction) and must differ between flows running at the same time: two running sinks
    with one id fence each other (the older fails with :class:`TransactionFailed`). The
    checkpoint interval must stay below the producer's ``transaction_timeout_ms`` (60 s by
    default; pass it in ``**producer_options``). A record that fails is not retried with
    another producer (that would lose the transaction): the item fails, and a fenced or
    failed transaction fails every item after it with :class:`TransactionFailed`.
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
        transactional: bool = False,
        transactional_id: str | None = None,
        **producer_options: Any,
    ) -> None:
        if transactional_id is not None and not transactional:
            raise ValueError("KafkaSink: transactional_id needs transactional=True")
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
        self.transactional = transactional
        """Whether output is committed only with checkpoints (the flow keeps its sources
        paused from a checkpoint's snapshot until :meth:`commit` returned)."""
        self.transactional_id = (
            (transactional_id or f"streamflow-{topic}") if transactional else None
        )
        self.commits = 0
        """Transactions committed (one per checkpoint)."""
        self._producer: AIOKafkaProducer | None = None
        self._retired: list[AIOKafkaProducer] = []
        self._starting: asyncio.Lock | None = None
        # transactional: set while a transaction is open for sends (not during a commit)
        self._txn_open = asyncio.Event()
        self._txn_error: TransactionFailed | None = None  # the transaction failed for good

    def _what(self) -> str:
        if self.transactional:
            return (
                f"kafka sink {self.topic} ({self.bootstrap_servers}, "
                f"transactional_id {self.transactional_id!r})"
            )
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
        """Flush what is queued and close the producer; a transactional sink first aborts its
        open transaction (what no checkpoint's :meth:`commit` covered is not committed)."""
        producers = [p for p in (self._producer, *self._retired) if p is not None]
        if self.transactional and self._producer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                await self._abort(self._producer)
        self._producer, self._retired = None, []
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            for producer in producers:
                await producer.stop()
        if self.transactional:
            self._txn_open.set()  # a send still waiting for a transaction fails: none comes

    async def _abort(self, producer: AIOKafkaProducer) -> None:
        self._txn_open.clear()
        if self._txn_error is not None:
            return  # fenced or failed: the broker aborts it (the newer producer did)
        txn = producer._txn_manager
        if txn is None or txn.state.name not in ("IN_TRANSACTION", "ABORTABLE_ERROR"):
            return  # none open, or fenced / failed for good: the broker aborts it
        try:
            await producer.abort_transaction()
        except (KafkaError, IllegalOperation) as exc:
            log.warning("connector.abort_failed", connector=self._what(), error=repr(exc))
            return
        if not txn.is_empty_transaction():
            log.info("connector.transaction_aborted", connector=self._what())

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
            if self.transactional:
                if self._txn_error is not None:
                    raise self._txn_error  # a new producer would not have its transaction
                kwargs["transactional_id"] = self.transactional_id
                kwargs["enable_idempotence"] = True
            producer = await start_client(
                lambda: AIOKafkaProducer(**kwargs), self._what(), self.reconnect_timeout, kwargs
            )
            if self.transactional:
                try:
                    await producer.begin_transaction()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await producer.stop()
                    raise
                self._txn_open.set()
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
        if self.transactional:
            return await self._produce_in_transaction(records)
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
        if self.transactional:
            prepared: _Prepared = (topic, value, key, headers, partition)
            error = (await self._produce_in_transaction([prepared]))[0]
            if error is not None:
                raise error
            return
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

    # -- transactions --------------------------------------------------------------------

    async def _transaction(self) -> AIOKafkaProducer:
        """The producer, with a transaction open for sends (waiting out a commit)."""
        producer = self._producer or await self._start()
        while not self._txn_open.is_set() and self._txn_error is None:
            await self._txn_open.wait()
        if self._txn_error is not None:
            raise self._txn_error
        if self._producer is not producer:
            raise self._failed("the producer was closed", None)
        return producer

    async def _produce_in_transaction(self, records: list[_Prepared]) -> list[BaseException | None]:
        """Produce ``records`` into the open transaction, once: a record that fails is not
        produced again (a new producer would not have the transaction). Per record,
        ``None`` or its error."""
        try:
            producer = await self._transaction()
        except TransactionFailed as exc:
            return [exc] * len(records)
        sending: list[asyncio.Future[Any] | ConnectorError] = []
        for topic, value, key, headers, partition in records:
            if self._txn_error is not None:
                sending.append(self._txn_error)
                continue
            try:
                sending.append(
                    await producer.send(
                        topic, value, key=key, headers=headers or None, partition=partition
                    )
                )
            except (KafkaError, IllegalOperation) as exc:  # this record only, or all after
                sending.append(self._send_error(producer, exc, topic))
        futures = [f for f in sending if isinstance(f, asyncio.Future)]
        results = iter(await asyncio.gather(*futures, return_exceptions=True))
        errors: list[BaseException | None] = []
        for record, sent in zip(records, sending, strict=True):
            if isinstance(sent, ConnectorError):
                errors.append(sent)
                continue
            result = next(results)
            if isinstance(result, KafkaError | IllegalOperation):
                errors.append(self._send_error(producer, result, record[0]))
            elif isinstance(result, BaseException):
                errors.append(result)
            else:
                self.sent += 1
                errors.append(None)
        return errors

    def _send_error(
        self, producer: AIOKafkaProducer, exc: KafkaError | IllegalOperation, topic: str
    ) -> ConnectorError:
        """What a record that failed in the transaction fails with: the transaction's
        failure (fenced, producer state lost, not open) or the broker's rejection."""
        txn = producer._txn_manager
        lost = txn is not None and txn.state.name in ("FATAL_ERROR", "ABORTABLE_ERROR")
        if lost or isinstance(exc, (ProducerFenced, IllegalOperation, *_PRODUCER_LOST)):
            return self._failed("a record could not be produced", exc)
        return ConnectorError(
            f"{self._what()}: the broker rejected a record for {topic!r}: "
            f"{type(exc).__name__}: {exc}"
        )

    def _failed(self, what: str, exc: BaseException | None) -> TransactionFailed:
        """The transaction failed for good: every later send and commit fails with it."""
        if self._txn_error is None:
            why = "" if exc is None else f": {type(exc).__name__}: {exc}"
            error = TransactionFailed(
                f"{self._what()}: the transaction failed ({what}){why}; its output since "
                "the last checkpoint is not committed"
            )
            error.__cause__ = exc
            self._txn_error = error
            self._txn_open.set()  # wake the sends waiting for a transaction: they fail
            log.error("connector.transaction_failed", connector=self._what(), error=str(error))
        return self._txn_error

    def snapshot(self) -> dict[str, Any] | None:
        """A transactional sink's ``{"transactional_id": ...}`` (``None`` otherwise): its
        output is in its open transaction, committed by :meth:`commit`."""
        if not self.transactional:
            return None
        return {"transactional_id": self.transactional_id}

    def restore(self, state: Any) -> None:
        """Nothing to restore (the broker aborted what the last run left open when this
        sink's producer started); warns when the checkpoint's ``transactional_id`` is
        another one: that producer's open transaction, if any, holds ``read_committed``
        consumers back until its ``transaction_timeout_ms``."""
        if not (self.transactional and isinstance(state, Mapping)):
            return
        before = state.get("transactional_id")
        if before is not None and before != self.transactional_id:
            log.warning(
                "connector.transactional_id_changed",
                connector=self._what(),
                checkpoint_transactional_id=before,
            )

    async def commit(self, info: CheckpointInfo) -> None:
        """Commit the open transaction (transactional sinks; nothing otherwise), with the
        offsets of every Kafka source position in ``info.positions`` sent to it, and open
        the next one. Sends arriving meanwhile wait for the next transaction.

        :raises TransactionFailed: the producer was fenced or failed, or the commit did not
            finish within ``reconnect_timeout`` seconds."""
        if not self.transactional:
            return
        producer = self._producer
        if producer is None:
            raise self._failed("commit before the sink was started", None)
        if self._txn_error is not None:
            raise self._txn_error
        self._txn_open.clear()  # sends from here on go into the next transaction
        groups = _group_offsets(info.positions)
        try:
            async with asyncio.timeout(self.reconnect_timeout):
                txn = producer._txn_manager
                if txn is None or txn.state.name != "IN_TRANSACTION":
                    state = "none" if txn is None else txn.state.name
                    raise self._failed(f"no open transaction to commit (state {state})", None)
                for i, (group, offsets) in enumerate(groups.items()):
                    if i:  # aiokafka adds one consumer group per transaction: add the next
                        txn._txn_consumer_group = None
                    await producer.send_offsets_to_transaction(offsets, group)
                await producer.commit_transaction()
        except TransactionFailed:
            raise
        except (KafkaError, IllegalOperation, TimeoutError, AssertionError) as exc:
            raise self._failed(f"checkpoint {info.number} could not be committed", exc) from exc
        self.commits += 1
        try:
            async with asyncio.timeout(self.reconnect_timeout):
                await producer.begin_transaction()
        except (KafkaError, IllegalOperation, TimeoutError, AssertionError) as exc:
            raise self._failed("the next transaction could not begin", exc) from exc
        self._txn_open.set()
        log.debug(
            "connector.transaction_committed",
            connector=self._what(),
            checkpoint=info.number,
            groups=sorted(groups),
        )

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


def _group_offsets(positions: Mapping[str, Any]) -> dict[str, dict[TopicPartition, int]]:
    """The offsets of the Kafka source positions among ``positions``, by consumer group."""
    groups: dict[str, dict[TopicPartition, int]] = {}
    for position in positions.values():
        if not (isinstance(position, Mapping) and "group" in position and "offsets" in position):
            continue
        offsets = _parse_offsets(position["offsets"])
        if offsets:
            groups.setdefault(str(position["group"]), {}).update(offsets)
    return groups


async def _outcome(sending: Awaitable[None]) -> Exception | None:
    """``None`` when ``sending`` finished, else the exception it raised."""
    try:
        await sending
    except Exception as exc:
        return exc
    return None
