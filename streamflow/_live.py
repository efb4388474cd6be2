"""A live terminal view of a running flow, drawn with rich (what ``streamflow run --live``
shows). Needs ``rich`` (``pip install "streamflow[cli]"``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ._logging import get_logger
from ._observe import FlowSnapshot, snapshot

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._runtime import RunningFlow

__all__ = ["LiveView"]

log = get_logger("streamflow.live")

_RATE_WINDOW_S = 1.0  # items/s over about the last second


class LiveView:
    """Draw a running flow's stages in the terminal while the block runs::

        async with flow.start() as running, sf.LiveView(running):
            await running.wait()

    Per stage: items/s, items in and out, inbox depth against capacity, busy fraction,
    latency p50/p99, errors, dropped; a progress bar per source whose length is known
    (``len()`` of what :class:`~streamflow.iterate` got; done counts acknowledged items);
    for an ``OnlineTrainer`` stage, its running loss and prequential accuracy.

    It redraws ``refresh_per_second`` times a second: a task on the event loop hands each
    frame (reading the metrics and drawing) to a worker thread, so the loop is not held
    while rich renders. ``console``: where to draw (default: a rich console on stdout,
    whose prints the view keeps above itself). Leaving the block draws the last frame and
    leaves it on screen. A frame that fails to draw is logged and the view stops drawing;
    it never fails the block.
    """

    def __init__(
        self,
        running: RunningFlow,
        *,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
    ) -> None:
        if not refresh_per_second > 0:
            raise ValueError(f"refresh_per_second must be > 0, got {refresh_per_second!r}")
        self.running = running
        self.console = console if console is not None else Console()
        self.interval = 1.0 / refresh_per_second
        self._own_console = console is None
        self._history: deque[tuple[float, dict[str, int]]] = deque()
        self._started = time.perf_counter()
        self._live: Live | None = None
        self._tg: TaskGroup | None = None
        self._lock = threading.Lock()  # frames come from a worker thread and from __aexit__
        self.frames = 0

    async def __aenter__(self) -> LiveView:
        self._started = time.perf_counter()
        live = Live(
            Text(),
            console=self.console,
            auto_refresh=False,  # rich's refresh thread would draw unasked: _redraw draws
            redirect_stdout=self._own_console,
            redirect_stderr=self._own_console,
        )
        live.start()
        self._live = live
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._redraw, name=f"streamflow:{self.running.name}:live")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None and self._live is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            live, self._live = self._live, None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._last, live)

    async def _redraw(self) -> None:
        while True:
            try:  # read and drawn off the loop: it only waits for the frame
                await anyio.to_thread.run_sync(self._draw)
            except Exception as exc:
                log.warning("live.error", flow=self.running.name, error=repr(exc))
                return
            await anyio.sleep(self.interval)

    def _last(self, live: Live) -> None:
        try:
            live.update(self.render())
        finally:
            live.stop()  # draws the last frame and leaves it on screen

    def _draw(self) -> None:
        live = self._live
        if live is not None:
            live.update(self.render(), refresh=True)

    def render(self) -> RenderableType:
        """One frame of the view, for the current metrics. It only reads counters, so it may
        run on a worker thread (the view draws there); a frame is about 0.3 ms per stage."""
        with self._lock:
            self.frames += 1
            snap = snapshot(self.running)
            now = time.perf_counter()
            rates = self._rates(now, snap)
        parts: list[RenderableType] = [self._header(snap, now)]
        parts.extend(self._progress(snap))
        parts.append(self._table(snap, rates))
        if snap.trainers:
            parts.append(self._trainers(snap))
        return Group(*parts)

    def _rates(self, now: float, snap: FlowSnapshot) -> dict[str, float]:
        counts = {
            name: m.items_out if m.kind == "source" else m.items_in
            for name, m in snap.stages.items()
        }
        history = self._history
        history.append((now, counts))
        while len(history) > 2 and now - history[1][0] >= _RATE_WINDOW_S:
            history.popleft()
        then, before = history[0]
        span = now - then
        if span <= 0:
            return {}
        return {name: (n - before.get(name, 0)) / span for name, n in counts.items()}

    def _header(self, snap: FlowSnapshot, now: float) -> Text:
        text = Text.assemble(("flow ", "dim"), (snap.flow, "bold"))
        if snap.state is not None:
            style = {"failed": "bold red", "running": "green"}.get(snap.state, "yellow")
            text.append("  ")
            text.append(snap.state, style=style)
        text.append(f"  {now - self._started:.1f} s", style="dim")
        if snap.error is not None:
            text.append(f"\n{snap.error}", style="red")
        return text

    def _progress(self, snap: FlowSnapshot) -> list[RenderableType]:
        rows: list[RenderableType] = []
        for name, total in snap.totals.items():
            m = snap.stages.get(name)
            done = sum(m.outcomes.values()) if m is not None else 0
            grid = Table.grid(padding=(0, 1))
            grid.add_row(
                Text(name, style="bold"),
                ProgressBar(total=max(total, 1), completed=min(done, total), width=40),
                Text(f"{done:,}/{total:,} ({100 * done / max(total, 1):.0f}%)"),
            )
            rows.append(grid)
        return rows

    def _table(self, snap: FlowSnapshot, rates: dict[str, float]) -> Text:
        rows: list[list[tuple[str, str]]] = [[(title, "bold") for title in _COLUMNS]]
        for name, m in snap.stages.items():
            part = m.kind == "part"
            queue = "" if m.kind == "source" or part else f"{m.queue_depth}/{m.capacity}"
            full = not part and m.capacity > 0 and m.queue_depth >= m.capacity
            rows.append(
                [
                    (f"  {name}" if part else name, "bold" if not part else ""),
                    (m.kind, "dim"),
                    (f"{rates.get(name, 0.0):,.0f}", ""),
                    (f"{m.items_in:,}", ""),
                    (f"{m.items_out:,}", ""),
                    (queue, "yellow" if full else ""),
                    (f"{100 * m.busy:.0f}%", ""),
                    (_duration(m.latency_p50_s), ""),
                    (_duration(m.latency_p99_s), ""),
                    (f"{m.errors:,}", "red" if m.errors else ""),
                    (f"{m.dropped:,}", "yellow" if m.dropped else ""),
                ]
            )
        return _grid(rows, left=2)

    def _trainers(self, snap: FlowSnapshot) -> Text:
        rows: list[list[tuple[str, str]]] = [
            [
                (title, "bold")
                for title in ("trainer", "schedule", "samples", "loss", "accuracy", "recent")
            ]
        ]
        for name, t in snap.trainers.items():
            rows.append(
                [
                    (name, "bold"),
                    (t.schedule, "dim"),
                    (f"{t.samples:,}", ""),
                    ("-" if t.loss is None else f"{t.loss:.4f}", ""),
                    ("-" if t.accuracy is None else f"{t.accuracy:.3f}", "green"),
                    ("-" if t.recent_accuracy is None else f"{t.recent_accuracy:.3f}", ""),
                ]
            )
        return _grid(rows, left=1)


_COLUMNS = (
    "stage", "kind", "items/s", "in", "out", "queue", "busy", "p50", "p99", "errors", "dropped",
)  # fmt: skip


def _grid(rows: list[list[tuple[str, str]]], left: int) -> Text:
    """Rows of (cell, style) as aligned columns, the first ``left`` flush left: one Text,
    far cheaper for rich to draw than a Table."""
    widths = [max(len(row[i][0]) for row in rows) for i in range(len(rows[0]))]
    text = Text(no_wrap=True, overflow="crop")
    for r, row in enumerate(rows):
        if r:
            text.append("\n")
        for i, (cell, style) in enumerate(row):
            if i:
                text.append("  ")
            padded = cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            text.append(padded, style=style or None)
    return text


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
