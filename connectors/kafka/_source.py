"""KafkaSource: a consumer-group member that commits only what the flow has finished, or,
with checkpoints, only the offsets of checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

import streamflow as sf
from streamflow._logging import get_logger

from .._background import Background
from .._backoff import Backoff
from .._buffered import BufferedSource
from .._errors import BrokerUnavailable
from .._inorder import InOrder
from .._record import Record
from ..codecs import BYTES, Codec
from ._security import Security
from ._start import start_client

if TYPE_CHECKING:
    from streamflow._checkpoints import CheckpointInfo

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
    """Successful offset commits (with checkpoints: of checkpoints' offsets)."""
    pauses: int = 0
    """Times the partitions were paused because ``max_pending`` records were pending."""
    peak_pending: int = 0
    """Most records pending at once (fetched and not yet released by a commit point)."""
    assignments: int = 0
    """Partition assignments received (1 when nothing rebalanced)."""
    revocations: int = 0
    """Partition revocations handled."""
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    """The last committed offset per ``(topic, partition)``: every record below it is done
    (with checkpoints: is in a durable checkpoint)."""


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
    ``AIOKafkaConsumer`` option goes in ``**consumer_options`` (e.g.
    ``isolation_level="read_committed"`` to read only committed transactions, as a flow
    reading a transactional :class:`KafkaSink`'s topic should). Single use: one flow run.

    With checkpoints (the flow calls :meth:`restore`): KafkaSource resumes at the checkpoint's
    offsets and commits only checkpoints' offsets (in :meth:`commit`, once a checkpoint is
    durable; never on acks, revokes or exit), so the group's committed offsets always
    match a checkpoint. With a transactional :class:`KafkaSink` the offsets are committed in
    its transaction instead, and :meth:`is_committed` tells which checkpoint made it.
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
        # checkpoints: restore() was called; from then on commits happen only in commit()
        self._checkpointed = False
        self._closed = False  # __aexit__ stopped the consumer
        # per partition, the offset after the last record handed to the flow (and the
        # restored offsets of partitions not read again yet): the source's position
        self._offsets: dict[TopicPartition, int] = {}

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
        """Stop polling, commit what the flow finished (not with checkpoints: the last
        checkpoint's :meth:`commit` did), leave the group, close."""
        consumer = self._consumer
        if consumer is None:
            return
        await self._background.stop()
        with anyio.CancelScope(shield=True):
            if not self._checkpointed:
                with anyio.move_on_after(self.close_timeout):
                    await self._commit(list(self._parts.values()), final=True)
            with anyio.move_on_after(self.close_timeout):
                await consumer.stop()
        self._closed = True
        self._buffer.clear()
        log.info("connector.stop", connector=self._what(), committed=self.stats.committed)

    # -- the flow's side -----------------------------------------------------------------

    def _running(self) -> bool:
        return self._consumer is not None

    def _next(self) -> sf.Message[Record]:
        part, rec = self._buffer.popleft()
        self.stats.yielded += 1
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        self._offsets[part.tp] = offset + 1
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

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The source's position: ``{"group": group_id, "offsets": {"topic:partition":
        offset}}``, per partition the offset of the record after the last one handed to
        the flow (a partition restored and not read again keeps its restored offset)."""
        return {"group": self.group_id, "offsets": _offsets_state(self._offsets)}

    def restore(self, position: Mapping[str, Any] | None) -> None:
        """Enter checkpoint mode, at ``position`` (what :meth:`snapshot` returned; ``None``:
        no checkpoint yet, start at the group's committed offsets). Called after
        ``__aenter__``, before the first item.

        From here on the source commits only in :meth:`commit` (no commits on acks,
        revokes or exit), and every partition of ``position`` is read from its offset:
        when it is assigned, or at once if it is assigned already (records fetched before
        are dropped)."""
        if self._consumer is None:
            raise RuntimeError(f"{self!r}: restore() is called after __aenter__")
        if position is not None and not isinstance(position, Mapping):
            raise ValueError(f"{self!r}: not a Kafka position: {position!r}")
        offsets = {} if position is None else _parse_offsets(position.get("offsets") or {})
        self._checkpointed = True
        if position is None:
            log.info("connector.checkpoints", connector=self.name, position=None)
            return
        group = position.get("group")
        if group is not None and group != self.group_id:
            log.warning(
                "connector.restore_other_group",
                connector=self.name,
                group=self.group_id,
                checkpoint_group=group,
            )
        self._offsets.update(offsets)
        log.info("connector.resume", connector=self.name, offsets=_show(offsets))
        assigned = self._consumer.assignment() & offsets.keys()
        if assigned:
            self._seek(assigned)

    async def commit(self, info: CheckpointInfo) -> None:
        """Commit the offsets of a durable checkpoint (``info.state``, this source's
        snapshot in it) to the group: those of the partitions assigned to this member (or,
        once the source has closed, all of them, through a short-lived client, which the
        broker accepts while the group has no member). A failed commit is logged
        (``connector.commit_failed``); the next checkpoint's commit carries it."""
        if not isinstance(info.state, Mapping):
            return
        offsets = {
            tp: offset
            for tp, offset in _parse_offsets(info.state.get("offsets") or {}).items()
            if self.stats.committed.get((tp.topic, tp.partition)) != offset
        }
        if not offsets:
            return
        consumer = self._consumer
        if consumer is not None and not self._closed:
            assigned = consumer.assignment()  # aiokafka commits assigned partitions only
            mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
            await self._commit_offsets(mine, retry=True, check_health=False)
            return
        async with self._group_client() as client:
            client.assign(list(offsets))
            await self._commit_offsets(offsets, retry=True, check_health=False, client=client)

    async def is_committed(self, position: Mapping[str, Any] | None) -> bool:
        """Whether the group's committed offsets are those of ``position`` (every partition
        it names; no partition, or no position: ``True``). Asks the broker (a started
        source's consumer, or a short-lived one).

        :raises BrokerUnavailable: no answer within ``reconnect_timeout`` seconds."""
        offsets = _parse_offsets((position or {}).get("offsets") or {})
        if not offsets:
            return True
        try:
            async with asyncio.timeout(self.reconnect_timeout), self._group_client() as client:
                committed = {tp: await client.committed(tp) for tp in offsets}
        except TimeoutError:
            raise BrokerUnavailable(
                f"{self._what()}: no committed offsets within {self.reconnect_timeout} s"
            ) from None
        return all(committed[tp] == offset for tp, offset in offsets.items())

    @contextlib.asynccontextmanager
    async def _group_client(self) -> AsyncIterator[AIOKafkaConsumer]:
        """The running consumer, or (not started, or closed) a short-lived one in the group
        that subscribes to nothing."""
        consumer = self._consumer
        if consumer is not None and not self._closed:
            yield consumer
            return
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "group_id": self.group_id,
            "enable_auto_commit": False,
            **(self.security.client_kwargs() if self.security else {}),
            **self.consumer_options,
        }
        client = await start_client(
            lambda: AIOKafkaConsumer(**kwargs), self._what(), self.reconnect_timeout, kwargs
        )
        try:
            yield client
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                await client.stop()

    def _seek(self, tps: set[TopicPartition]) -> None:
        """Read each of ``tps`` (assigned) from its offset in the position: the records of
        it fetched so far are dropped, pending or not."""
        consumer = self._consumer
        assert consumer is not None
        if any(part.tp in tps for part, _ in self._buffer):  # in place: see _on_revoked
            kept = [item for item in self._buffer if item[0].tp not in tps]
            self._buffer.clear()
            self._buffer.extend(kept)
        for tp in tps:
            old = self._parts.get(tp)
            if old is not None and old.tracker:
                old.active = False  # its late acks no longer count
                self._pending -= len(old.tracker)
                self._parts[tp] = _Partition(tp)
            consumer.seek(tp, self._offsets[tp])
        self._room.set()

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
        floors = self._offsets if self._checkpointed else None
        for tp, records in batches.items():
            if floors is not None:
                # never a record before the position (fetched before a seek, say)
                floor = floors.get(tp)
                if floor is not None and records and records[0].offset < floor:
                    records = [rec for rec in records if rec.offset >= floor]
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
        while not self._checkpointed:
            await asyncio.sleep(self.commit_interval)
            if self._checkpointed:
                return  # checkpoints commit from now on
            await self._commit(list(self._parts.values()))

    async def _commit(self, parts: list[_Partition], *, final: bool = False) -> bool:
        offsets = {
            p.tp: p.committable
            for p in parts
            if p.committable is not None and p.committable != p.committed
        }
        return await self._commit_offsets(offsets, retry=not final, check_health=not final)

    async def _commit_offsets(
        self,
        offsets: dict[TopicPartition, int],
        *,
        retry: bool,
        check_health: bool,
        client: AIOKafkaConsumer | None = None,
    ) -> bool:
        """Commit ``offsets`` (with ``client``, by default the source's consumer); on
        failure log it (``retry``: a later commit carries them) and, ``check_health``,
        count it as a failed broker round trip."""
        consumer = client or self._consumer
        assert consumer is not None
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
                retry=retry,
            )
            if check_health:
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
        if not self._checkpointed:  # with checkpoints, only checkpoints commit
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
        if self._checkpointed:  # go on where the flow's position is, not at the group's
            known = assigned & self._offsets.keys()
            if known:
                self._seek(known)
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


def _offsets_state(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    """``{"topic:partition": offset}``, sorted: a position's JSON form."""
    return {f"{tp.topic}:{tp.partition}": offsets[tp] for tp in sorted(offsets)}


def _parse_offsets(state: Mapping[str, Any]) -> dict[TopicPartition, int]:
    """The offsets of a position's ``"topic:partition"`` keys (see :func:`_offsets_state`)."""
    offsets: dict[TopicPartition, int] = {}
    for key, offset in state.items():
        topic, sep, partition = str(key).rpartition(":")
        if not sep or not topic:
            raise ValueError(f"not a 'topic:partition' key in a Kafka position: {key!r}")
        offsets[TopicPartition(topic, int(partition))] = int(offset)
    return offsets


def _show(offsets: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": off for tp, off in offsets.items()}


def _show_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
