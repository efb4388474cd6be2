"""KafkaSource: a consumer-group member that commits only what the flow has finished."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Literal

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

import streamflow as sf
from streamflow._logging import get_logger

from .._background import Background
from .._backoff import Backoff
from .._buffered import BufferedSource
from .._inorder import InOrder
from .._record import Record
from ..codecs import BYTES, Codec
from ._security import Security
from ._start import start_client

__all__ = ["KafkaSource", "KafkaSourceStats"]

log = get_logger("streamflow")

_PROBE_EVERY = 2.0  # seconds without any broker round trip before a liveness probe
_OP_TIMEOUT = 10.0  # a commit or probe that takes longer counts as failed


@dataclass
class KafkaSourceStats:
    """Counters of a :class:`KafkaSource` (read them any time)."""

    fetched: int = 0
    """Records received from the broker."""
    yielded: int = 0
    """Records handed to the flow."""
    acked: int = 0
    """Records the flow finished (any outcome but ``ABORTED``)."""
    commits: int = 0
    """Successful offset commits."""
    pauses: int = 0
    """Times the partitions were paused because ``max_pending`` records were pending."""
    peak_pending: int = 0
    """Most records pending at once (fetched and not yet released by a commit point)."""
    assignments: int = 0
    """Partition assignments received (1 when nothing rebalanced)."""
    revocations: int = 0
    """Partition revocations handled."""
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    """The last committed offset per ``(topic, partition)``: every record below it is done."""


class _Partition:
    __slots__ = ("active", "committable", "committed", "tp", "tracker")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.active = True  # False once revoked: late acks no longer count
        self.tracker: InOrder[int, int] = InOrder()
        self.committable: int | None = None  # next offset to read: all below are done
        self.committed: int | None = None


class KafkaSource(BufferedSource[tuple[_Partition, ConsumerRecord[Any, Any]]]):
    """Consume ``topics`` as a member of consumer group ``group_id``, at least once.

    Yields :class:`streamflow.Message` envelopes around :class:`~streamflow.connectors.Record` (raw
    value, key, headers, timestamp; ``position`` is ``topic``/``partition``/``offset``);
    decode them with a ``map(..., streamflow.connectors.decode)`` stage so malformed values meet its
    error policy.

    Delivery: offsets are committed only up to the first record the flow has not finished, per
    partition, every ``commit_interval`` seconds, on partition revoke and on exit. A slow
    record holds its partition's commit point back; a record after it finishing early never
    lets a commit skip it. A crash delivers every uncommitted record again (duplicates are
    possible, losses are not).

    Memory: at most ``max_pending`` records are fetched and not yet released (buffered here or
    in the flow); then the source takes no more until a quarter of them are done. When the
    flow pushes back for longer than a second (or a quarter of ``max_poll_interval_ms``), the
    partitions are paused and the source keeps polling the paused consumer, so it stays in
    its group for as long as the flow pushes back.

    Outages: aiokafka reconnects by itself; a broker that stays unreachable (no fetch, commit
    or metadata probe succeeds) for ``reconnect_timeout`` seconds fails the flow with
    :class:`~streamflow.connectors.BrokerUnavailable`. ``security`` passes TLS/SASL settings; any other
    ``AIOKafkaConsumer`` option goes in ``**consumer_options``. Single use: one flow run.
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        group_id: str,
        bootstrap_servers: str | Sequence[str] = "127.0.0.1:9092",
        *,
        codec: Codec[Any] = BYTES,
        max_pending: int = 1000,
        commit_interval: float = 1.0,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        reconnect_timeout: float | None = 60.0,
        revoke_timeout: float = 10.0,
        close_timeout: float = 10.0,
        security: Security | None = None,
        **consumer_options: Any,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("KafkaSource needs at least one topic")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.group_id = group_id
        self.bootstrap_servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        )
        self.codec = codec
        self.max_pending = max_pending
        self.commit_interval = commit_interval
        self.auto_offset_reset = auto_offset_reset
        self.reconnect_timeout = reconnect_timeout
        self.revoke_timeout = revoke_timeout
        self.close_timeout = close_timeout
        self.security = security
        self.consumer_options = consumer_options
        max_poll = consumer_options.get("max_poll_interval_ms", 300_000) / 1000
        self.pause_after = min(1.0, max_poll / 4)
        self.name = "kafka:" + ",".join(self.topics)
        self.stats = KafkaSourceStats()
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[TopicPartition, _Partition] = {}
        self._buffer: deque[tuple[_Partition, ConsumerRecord[Any, Any]]] = deque()
        self._pending = 0
        self._paused = False
        self._room_at = -1  # while waiting for room: wake up at this many pending
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._acked = asyncio.Event()
        self._error: BaseException | None = None
        self._background = Background(self._what(), self._fail)
        self._last_contact = 0.0
        self._health = Backoff(self._what(), give_up_after=reconnect_timeout)

    def _what(self) -> str:
        return f"kafka source {self.name} (group {self.group_id!r}, {self.bootstrap_servers})"

    def __repr__(self) -> str:
        return f"KafkaSource({self.topics!r}, group_id={self.group_id!r})"

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> KafkaSource:
        if self._consumer is not None:
            raise RuntimeError(f"{self!r} is already running; create one source per flow run")
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            **(self.security.client_kwargs() if self.security else {}),
            **self.consumer_options,
        }
        consumer = await start_client(
            lambda: AIOKafkaConsumer(**kwargs), self._what(), self.reconnect_timeout, kwargs
        )
        consumer.subscribe(self.topics, listener=_Listener(self))
        self._consumer = consumer
        self._last_contact = time.monotonic()
        self._background.start(self._poll_loop(), f"{self.name}:poll")
        self._background.start(self._commit_loop(), f"{self.name}:commit")
        log.info("connector.start", connector=self._what())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop polling, commit what the flow finished, leave the group, close."""
        consumer = self._consumer
        if consumer is None:
            return
        await self._background.stop()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.close_timeout):
                await self._commit(list(self._parts.values()), final=True)
            with anyio.move_on_after(self.close_timeout):
                await consumer.stop()
        self._buffer.clear()
        log.info("connector.stop", connector=self._what(), committed=self.stats.committed)

    # -- the flow's side -----------------------------------------------------------------

    def _running(self) -> bool:
        return self._consumer is not None

    def _next(self) -> sf.Message[Record]:
        part, rec = self._buffer.popleft()
        self.stats.yielded += 1
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        record = Record(
            rec.value,  # None for a tombstone
            self.name,
            {"topic": topic, "partition": partition, "offset": offset},
            codec=self.codec,
            key=rec.key,
            headers=rec.headers,
            timestamp=rec.timestamp / 1000,
        )
        meta = {"source": self.name, "topic": topic, "partition": partition, "offset": offset}
        return sf.Message(record, meta=meta, on_ack=partial(self._on_ack, part, offset))

    def _on_ack(self, part: _Partition, offset: int, outcome: sf.Outcome) -> None:
        if outcome & sf.Outcome.ABORTED:
            return  # the flow stopped before handling it: never committed, delivered again
        self.stats.acked += 1
        if not part.active:
            return
        tracker = part.tracker
        released = tracker.release(offset)
        if released:
            assert tracker.last is not None
            part.committable = tracker.last + 1
            self._pending -= released
            if self._pending <= self._room_at:
                self._room.set()
        self._acked.set()

    # -- background ----------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            room = self.max_pending - self._pending
            if room <= 0:
                await self._wait_for_room(consumer)
                continue
            batches = await consumer.getmany(timeout_ms=200, max_records=room)
            if batches:
                self._take(batches)
            else:
                await self._check_health(consumer)

    async def _wait_for_room(self, consumer: AIOKafkaConsumer) -> None:
        """``max_pending`` records are pending: stop taking more until a quarter is done.

        A short push-back only stops draining the consumer (what aiokafka prefetched stays,
        bounded by its fetch sizes). Past ``pause_after`` seconds the partitions are paused
        (dropping that prefetch) and the paused consumer is polled every 0.2 s, so the group
        sees a live member however long the flow pushes back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pause_after
        self._room_at = self.max_pending * 3 // 4
        paused = False
        try:
            while self._pending > self._room_at:
                self._room.clear()
                wait = 0.2 if paused else max(0.0, deadline - loop.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._room.wait()
                if self._pending <= self._room_at:
                    break
                if not paused:
                    paused = True
                    self._pause(consumer)
                await consumer.getmany(timeout_ms=0)  # paused: returns nothing, keeps us alive
                await self._check_health(consumer)
        finally:
            self._room_at = -1
            if paused:
                self._paused = False
                consumer.resume(*consumer.assignment())
                log.debug("connector.resume", connector=self.name, pending=self._pending)

    def _pause(self, consumer: AIOKafkaConsumer) -> None:
        self._paused = True
        self.stats.pauses += 1
        consumer.pause(*consumer.assignment())
        log.debug("connector.pause", connector=self.name, pending=self._pending)

    def _take(self, batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        self._last_contact = time.monotonic()
        self._health.reset()
        buffer, parts = self._buffer, self._parts
        n = 0
        for tp, records in batches.items():
            part = parts.get(tp)
            if part is None:
                part = parts[tp] = _Partition(tp)
            track = part.tracker.track
            for rec in records:
                track(rec.offset, rec.offset)
                buffer.append((part, rec))
            n += len(records)
        self._pending += n
        self.stats.fetched += n
        if self._pending > self.stats.peak_pending:
            self.stats.peak_pending = self._pending
        self._ready.set()

    async def _check_health(self, consumer: AIOKafkaConsumer) -> None:
        """With no broker round trip for a while, probe with a metadata request; fail the
        source once the broker has been unreachable for ``reconnect_timeout``."""
        if time.monotonic() - self._last_contact < _PROBE_EVERY:
            return
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                await consumer.topics()
        except (KafkaError, TimeoutError) as exc:
            self._last_contact = time.monotonic() - _PROBE_EVERY + 0.5  # probe again soon
            self._health.check(exc)
            log.warning(
                "connector.unreachable",
                connector=self._what(),
                error=repr(exc),
                failing_s=round(self._health.failing_for, 3),
            )
        else:
            self._contact()

    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        self._health.reset()

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            await self._commit(list(self._parts.values()))

    async def _commit(self, parts: list[_Partition], *, final: bool = False) -> bool:
        consumer = self._consumer
        assert consumer is not None
        offsets = {
            p.tp: p.committable
            for p in parts
            if p.committable is not None and p.committable != p.committed
        }
        if not offsets:
            return True
        try:
            async with asyncio.timeout(_OP_TIMEOUT):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # the group rebalanced under us: another member owns these partitions now and
            # will read their uncommitted records again
            log.warning(
                "connector.commit_failed",
                connector=self.name,
                offsets=_show(offsets),
                error=repr(exc),
                retry=False,
            )
            return False
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "connector.commit_failed",
                connector=self.name,
                offsets=_show(offsets),
                error=repr(exc),
                retry=not final,
            )
            if not final:
                self._health.check(exc)
            return False
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = offset
            self.stats.committed[(tp.topic, tp.partition)] = offset
        self.stats.commits += 1
        self._contact()
        return True

    # -- rebalances ----------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Forget unsent records of ``revoked``, give the flow ``revoke_timeout`` to finish the
        ones it holds, and commit them, before the partitions move to another member."""
        if not revoked:
            return
        self.stats.revocations += 1
        gone = [self._parts[tp] for tp in revoked if tp in self._parts]
        unsent: dict[TopicPartition, int] = {}
        for part, _ in self._buffer:
            if part.tp in revoked:
                unsent[part.tp] = unsent.get(part.tp, 0) + 1
        if unsent:  # in place: a waiting __anext__ holds this deque
            kept = [item for item in self._buffer if item[0].tp not in revoked]
            self._buffer.clear()
            self._buffer.extend(kept)
        for part in gone:
            n = unsent.get(part.tp, 0)
            part.tracker.discard_after(len(part.tracker) - n)
            self._pending -= n
        with anyio.move_on_after(self.revoke_timeout):
            while any(part.tracker for part in gone):
                self._acked.clear()
                await self._acked.wait()
        await self._commit(gone)
        for part in gone:
            part.active = False
            self._pending -= len(part.tracker)  # not finished in time: read again elsewhere
            del self._parts[part.tp]
        self._room.set()
        log.info("connector.revoked", connector=self.name, partitions=_show_tps(revoked))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.stats.assignments += 1
        for tp in assigned:
            self._parts.setdefault(tp, _Partition(tp))
        if self._paused and self._consumer is not None:
            self._consumer.pause(*assigned)
        log.info("connector.assigned", connector=self.name, partitions=_show_tps(assigned))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.source._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.source._on_assigned(assigned)


def _show(offsets: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": off for tp, off in offsets.items()}


def _show_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
