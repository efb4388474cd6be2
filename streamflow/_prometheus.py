"""Prometheus metrics of running flows: a collector for an application's own registry, and a
small HTTP endpoint serving it (what ``streamflow run --metrics`` uses).

Needs ``prometheus-client`` (``pip install "streamflow[prometheus]"``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._logging import get_logger
from ._observe import FlowSnapshot, snapshot

if TYPE_CHECKING:
    from ._runtime import RunningFlow

__all__ = ["FlowCollector", "MetricsServer", "serve_metrics"]

log = get_logger("streamflow.prometheus")

# StageMetrics field -> (metric name without _total, help)
_COUNTERS = (
    ("items_in", "streamflow_stage_items_in", "Items the stage took from its input."),
    ("items_out", "streamflow_stage_items_out", "Items the stage passed on (sinks: delivered)."),
    ("errors", "streamflow_stage_errors", "Items the stage's function raised on."),
    ("dropped", "streamflow_stage_dropped", "Items dropped by the stage's inbox overflow."),
    ("skipped", "streamflow_stage_skipped", "Items skipped by the stage's error policy."),
    ("retries", "streamflow_stage_retries", "Retries of the stage's function."),
)
_STATES = ("starting", "running", "draining", "stopped", "failed")


class FlowCollector(Collector):
    """A prometheus-client collector over running flows: register it in the application's
    registry (``registry.register(FlowCollector(running))``) and its ``/metrics`` includes
    every stage's counters, gauges and latency histograms, labelled ``flow`` and ``stage``.

    Metrics are read on the event loop the flow runs on: a scrape from another thread (a
    WSGI server, ``prometheus_client.start_http_server``) waits for the loop to take the
    snapshot (at most ``timeout`` seconds; then it gets no streamflow metrics). A stopped
    flow keeps reporting its last counts until it is removed.
    """

    def __init__(self, *flows: RunningFlow, timeout: float = 5.0) -> None:
        self._flows: list[RunningFlow] = []
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        for running in flows:
            self.add(running)

    def add(self, running: RunningFlow) -> None:
        """Report one more flow (its stage names are told apart by the ``flow`` label).
        Called on the flow's event loop, it remembers that loop for scrapes from other
        threads; a collector may be created empty (at import) and given flows later."""
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._flows.append(running)

    def remove(self, running: RunningFlow) -> None:
        """Stop reporting a flow."""
        self._flows.remove(running)

    def collect(self) -> Iterable[Metric]:
        """The metric families, for the registry (a scrape calls this)."""
        return _families(self._snapshots())

    def _snapshots(self) -> list[FlowSnapshot]:
        flows = list(self._flows)
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or _on(loop):
            return [snapshot(f) for f in flows]
        done: concurrent.futures.Future[list[FlowSnapshot]] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result([snapshot(f) for f in flows])
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return done.result(self._timeout)
        except concurrent.futures.TimeoutError:
            log.warning("metrics.timeout", flows=[f.name for f in flows], timeout=self._timeout)
            return []


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _families(snaps: list[FlowSnapshot]) -> Iterator[Metric]:
    stage_labels = ["flow", "stage"]
    counters = {
        field: CounterMetricFamily(name, doc, labels=stage_labels) for field, name, doc in _COUNTERS
    }
    info = GaugeMetricFamily(
        "streamflow_stage_info", "The stage's kind and device (always 1).",
        labels=["flow", "stage", "kind", "device"],
    )  # fmt: skip
    depth = GaugeMetricFamily(
        "streamflow_stage_queue_depth", "Items waiting in the stage's inbox.", labels=stage_labels
    )
    capacity = GaugeMetricFamily(
        "streamflow_stage_queue_capacity", "Capacity of the stage's inbox.", labels=stage_labels
    )
    busy = GaugeMetricFamily(
        "streamflow_stage_busy_ratio",
        "Fraction of the stage's running time spent inside its function.",
        labels=stage_labels,
    )
    latency = HistogramMetricFamily(
        "streamflow_stage_latency_seconds",
        "Time the stage spent on an item.",
        labels=stage_labels,
    )
    e2e = HistogramMetricFamily(
        "streamflow_end_to_end_latency_seconds",
        "Time from leaving the source to reaching this sink.",
        labels=stage_labels,
    )
    acks = CounterMetricFamily(
        "streamflow_source_acks",
        "Source items acknowledged, by outcome (flags joined with '|').",
        labels=["flow", "stage", "outcome"],
    )
    total = GaugeMetricFamily(
        "streamflow_source_length", "Items the source will yield in all.", labels=stage_labels
    )
    state = GaugeMetricFamily(
        "streamflow_flow_state", "1 for the flow's current state.", labels=["flow", "state"]
    )
    held = GaugeMetricFamily(
        "streamflow_stage_state",
        "What a keyed stage holds: keys, windows_open, items_held; late and expired so far.",
        labels=["flow", "stage", "what"],
    )
    trainer = {
        name: GaugeMetricFamily(name, doc, labels=stage_labels)
        for name, doc in (
            ("streamflow_trainer_loss", "Mean loss of the trainer's last window of items."),
            ("streamflow_trainer_accuracy", "Prequential accuracy over every row so far."),
            ("streamflow_trainer_recent_accuracy", "Prequential accuracy, last window."),
        )
    }
    samples = CounterMetricFamily(
        "streamflow_trainer_samples", "Rows the trainer learned from.", labels=stage_labels
    )
    updates = CounterMetricFamily(
        "streamflow_trainer_updates",
        "Optimizer steps per part of the trainer.",
        labels=["flow", "stage", "part"],
    )
    flow_labels = ["flow"]
    taken = CounterMetricFamily(
        "streamflow_checkpoints", "Checkpoints written in this run.", labels=flow_labels
    )
    skipped = CounterMetricFamily(
        "streamflow_checkpoints_skipped",
        "Checkpoints given up: the flow was not quiet within the timeout.",
        labels=flow_labels,
    )
    failed = CounterMetricFamily(
        "streamflow_checkpoints_failed",
        "Checkpoints whose write failed (the one before still holds).",
        labels=flow_labels,
    )
    size = GaugeMetricFamily(
        "streamflow_checkpoint_bytes", "Size of the newest checkpoint.", labels=flow_labels
    )
    pause = GaugeMetricFamily(
        "streamflow_checkpoint_pause_seconds",
        "How long the sources were paused for the newest checkpoint.",
        labels=flow_labels,
    )
    write = GaugeMetricFamily(
        "streamflow_checkpoint_write_seconds",
        "How long writing the newest checkpoint took (on a worker thread).",
        labels=flow_labels,
    )
    for snap in snaps:
        flow = snap.flow
        ck = snap.checkpoints
        if ck is not None:
            taken.add_metric([flow], ck.taken)
            skipped.add_metric([flow], ck.skipped)
            failed.add_metric([flow], ck.failed)
            if ck.last is not None:
                size.add_metric([flow], ck.last_bytes)
            if ck.pauses_s:
                pause.add_metric([flow], ck.pauses_s[-1])
            if ck.writes_s:
                write.add_metric([flow], ck.writes_s[-1])
        if snap.state is not None:
            for name in _STATES:
                state.add_metric([flow, name], 1.0 if snap.state == name else 0.0)
        for name, m in snap.stages.items():
            labels = [flow, name]
            device = snap.devices.get(name)
            info.add_metric([flow, name, m.kind, device or ""], 1.0)
            for field, family in counters.items():
                family.add_metric(labels, getattr(m, field))
            if m.kind != "source":
                if m.kind != "part":
                    depth.add_metric(labels, m.queue_depth)
                    capacity.add_metric(labels, m.capacity)
                latency.add_metric(labels, _buckets(m.latency_buckets), m.latency_sum_s)
            busy.add_metric(labels, m.busy)
            if m.kind == "sink":
                e2e.add_metric(labels, _buckets(m.end_to_end_buckets), m.end_to_end_sum_s)
            for outcome, count in sorted(m.outcomes.items()):
                acks.add_metric([flow, name, outcome], count)
            if name in snap.totals:
                total.add_metric(labels, snap.totals[name])
            for what, count in sorted(m.state.items()):
                held.add_metric([flow, name, what], count)
        for name, t in snap.trainers.items():
            labels = [flow, name]
            for value, gauge in zip(
                (t.loss, t.accuracy, t.recent_accuracy), trainer.values(), strict=True
            ):
                if value is not None and math.isfinite(value):
                    gauge.add_metric(labels, value)
            samples.add_metric(labels, t.samples)
            for part, steps in enumerate(t.updates):
                updates.add_metric([flow, name, str(part)], steps)
    families: list[Metric] = [state, info, *counters.values(), depth, capacity, busy]
    families += [latency, e2e, acks, total, held, *trainer.values(), samples, updates]
    families += [taken, skipped, failed, size, pause, write]
    yield from (family for family in families if family.samples)


def _buckets(pairs: tuple[tuple[float, int], ...]) -> list[tuple[str, float]]:
    if not pairs:  # no item yet: an empty histogram
        return [("+Inf", 0.0)]
    return [(_bound(bound), float(count)) for bound, count in pairs]


def _bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """Where :func:`serve_metrics` listens: ``url`` is ``http://host:port/metrics``."""

    host: str
    port: int
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


@contextlib.asynccontextmanager
async def serve_metrics(
    running: RunningFlow,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[MetricsServer]:
    """Serve the flow's metrics over HTTP (``GET /metrics``, Prometheus text or OpenMetrics
    as the scraper asks) while the block runs; ``port=0`` picks a free port, which the
    yielded :class:`MetricsServer` tells. Bound to loopback unless ``host`` says otherwise.
    With ``registry``, the flow's collector is added to it for the block and the whole
    registry is served. Scrapes are answered on the event loop; leaving the block closes
    the socket.

    :raises OSError: the address cannot be bound.
    """
    own = registry if registry is not None else CollectorRegistry()
    collector = FlowCollector(running)
    own.register(collector)
    try:
        server = await asyncio.start_server(lambda r, w: _answer(own, r, w), host, port)
        try:
            bound = server.sockets[0].getsockname()
            where = MetricsServer(host=str(bound[0]), port=int(bound[1]), registry=own)
            log.info("metrics.serve", flow=running.name, url=where.url)
            yield where
        finally:
            server.close()
            await server.wait_closed()
    finally:
        own.unregister(collector)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _answer(
    registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One HTTP/1.1 exchange, then close."""
    try:
        async with asyncio.timeout(10):
            request = (await reader.readline()).decode("latin-1").split()
            accept = ""
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
        body, kind = b"", "text/plain; charset=utf-8"
        if len(request) < 2:
            status = 400
        elif request[0] not in ("GET", "HEAD"):
            status = 405
        elif request[1].split("?")[0] not in ("/metrics", "/"):
            status = 404
        else:
            encode, kind = choose_encoder(accept)
            status, body = 200, encode(registry)
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if request[:1] == ["HEAD"] else body))
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
