"""Line-based file sources: plain lines, JSON Lines and CSV, with follow mode and resume."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import anyio
import structlog

import streamflow as sf

from .._inorder import InOrder
from .._record import Record
from ..codecs import JSON, TEXT, Codec, CsvCodec
from ._position import Checkpoint, FilePosition

__all__ = ["CsvSource", "JsonLinesSource", "LinesSource"]

log = structlog.get_logger("streamflow")

_CHUNK = 1 << 16


class LinesSource:
    """Yield each line of the file at ``path`` as a :class:`~connectors.Record` (the line's
    bytes without its line end; ``position`` is its ``line`` number, from 1, and byte
    ``offset``), decoded with ``codec`` by :func:`connectors.decode`.

    ``follow=True`` works like ``tail -f``: at the end of the file it waits for more (polling
    every ``poll_interval`` s, waiting for the file to appear if needed) and never ends by
    itself; a line is only emitted once its newline is written, so a writer's half-written
    line is never read. A file that shrank below the read position (truncated or replaced)
    is read again from the start, logged as ``connector.file_truncated``.

    Resume: :attr:`position` is the committed :class:`FilePosition`: every record before it
    was handled by the flow (acked), in file order, whatever order they finished in. Pass it
    back as ``start=``, or give ``checkpoint=`` a file path: the position is saved there
    (atomically, at most every ``checkpoint_interval`` s and on exit) and read back on start.
    At least once: records after the saved position are read again after a crash.

    A line longer than ``max_line`` bytes becomes a record with ``error`` set (its first bytes
    as ``raw``) and is skipped up to its newline, so it meets the decode stage's error policy.
    """

    skip_blank = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: Codec[Any] = TEXT,
        follow: bool = False,
        poll_interval: float = 0.2,
        start: FilePosition | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_interval: float = 1.0,
        max_line: int = 1 << 20,
    ) -> None:
        self.path = Path(path)
        self.codec = codec
        self.follow = follow
        self.poll_interval = poll_interval
        self.max_line = max_line
        self.name = f"file:{self.path}"
        self._start = start
        self._checkpoint = (
            None if checkpoint is None else Checkpoint(checkpoint, checkpoint_interval)
        )
        self._file: BinaryIO | None = None
        self._buf = bytearray()
        self._scan = 0  # where to look for the next newline in _buf
        self._offset = 0  # file offset of _buf[0]
        self._line = 0  # lines consumed before _buf[0]
        self._skipping = False
        self._done: InOrder[int, FilePosition] = InOrder()
        self._committed = FilePosition()
        self._entered = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, follow={self.follow})"

    @property
    def position(self) -> FilePosition:
        """Everything before this position has been handled by the flow."""
        return self._committed

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> LinesSource:
        self._entered = True
        start = self._start
        if start is None and self._checkpoint is not None:
            state = self._checkpoint.load()
            if state is not None:
                start = FilePosition(int(state["offset"]), int(state["line"]))
                log.info("connector.resume", source=self.name, offset=start.offset, line=start.line)
        self._committed = start or FilePosition()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._save(force=True)

    def _save(self, *, force: bool = False) -> None:
        if self._checkpoint is not None:
            self._checkpoint.save(Checkpoint.of_position(self.path, self._committed), force=force)

    async def _open(self) -> BinaryIO | None:
        while True:
            try:
                f = await anyio.to_thread.run_sync(_open_binary, self.path)
            except FileNotFoundError:
                if not self.follow:
                    raise
                await anyio.sleep(self.poll_interval)
                continue
            await self._begin(f)
            return f

    async def _begin(self, f: BinaryIO) -> None:
        """Position ``f`` at the committed position (a subclass may read a header first)."""
        start = self._committed
        size = os.fstat(f.fileno()).st_size
        if start.offset > size:
            log.warning(
                "connector.file_truncated",
                source=self.name,
                offset=start.offset,
                size=size,
                action="reading from the start",
            )
            start = self._committed = FilePosition()
        f.seek(start.offset)
        self._offset, self._line = start.offset, start.line

    # -- reading -------------------------------------------------------------------------

    def __aiter__(self) -> LinesSource:
        return self

    async def __anext__(self) -> sf.Message[Record]:
        if not self._entered:
            raise RuntimeError(f"{self!r} was not started: the flow enters it as a context")
        if self._file is None:
            self._file = await self._open()
        f = self._file
        assert f is not None
        self._save()
        while True:
            message = self._next_record(at_eof=False)
            if message is not None:
                return message
            chunk = await anyio.to_thread.run_sync(f.read, _CHUNK)
            if chunk:
                self._buf += chunk
                continue
            if not self.follow:
                message = self._next_record(at_eof=True)
                if message is not None:
                    return message
                raise StopAsyncIteration
            if os.fstat(f.fileno()).st_size < self._offset + len(self._buf):
                log.warning(
                    "connector.file_truncated",
                    source=self.name,
                    offset=self._offset + len(self._buf),
                    action="reading from the start",
                )
                f.seek(0)
                self._buf.clear()
                self._scan = self._offset = self._line = 0
                self._skipping = False
                continue
            await anyio.sleep(self.poll_interval)

    def _record_end(self, buf: bytearray, start: int) -> int:
        """Index of the newline ending the record that starts at ``start`` (-1: none yet)."""
        return buf.find(b"\n", start)

    def _next_record(self, *, at_eof: bool) -> sf.Message[Record] | None:
        buf = self._buf
        while True:
            end = self._record_end(buf, self._scan)
            if end < 0:
                if self._skipping:  # still inside an overlong line
                    self._drop(len(buf), lines=0)
                    return None
                if len(buf) > self.max_line:
                    return self._overlong(len(buf), complete=False)
                if not (at_eof and buf):
                    self._scan = len(buf)
                    return None
                end = len(buf)  # the last line has no newline
            consumed = min(end + 1, len(buf))
            if self._skipping:
                self._drop(consumed, lines=1)
                self._skipping = False
                continue
            if end > self.max_line:
                return self._overlong(consumed, complete=True)
            line_no, offset = self._line + 1, self._offset
            raw = bytes(buf[: end - 1 if end > 0 and buf[end - 1] == 0x0D else end])
            self._drop(consumed, lines=raw.count(b"\n") + 1)
            if self.skip_blank and not raw.strip():
                continue
            after = FilePosition(self._offset, self._line)
            return self._message(raw, line_no, offset, None, after)

    def _overlong(self, n: int, *, complete: bool) -> sf.Message[Record]:
        line_no, offset = self._line + 1, self._offset
        # resume before an overlong line until its end was seen
        after = FilePosition(offset + n, line_no) if complete else FilePosition(offset, line_no - 1)
        raw = bytes(self._buf[:64])
        self._drop(n, lines=1 if complete else 0)
        self._skipping = not complete
        reason = f"line longer than max_line={self.max_line} bytes (skipped)"
        return self._message(raw, line_no, offset, reason, after)

    def _drop(self, n: int, *, lines: int) -> None:
        del self._buf[:n]
        self._offset += n
        self._line += lines
        self._scan = 0

    def _message(
        self, raw: bytes, line: int, offset: int, error: str | None, after: FilePosition
    ) -> sf.Message[Record]:
        position = {"line": line, "offset": offset}
        record = Record(raw, self.name, position, codec=self.codec, error=error)
        self._done.track(line, after)
        meta = {"source": self.name, **position}
        return sf.Message(record, meta=meta, on_ack=partial(self._ack, line))

    def _ack(self, line: int, outcome: sf.Outcome) -> None:
        released = self._done.done(line)
        if released:
            self._committed = released[-1]


class JsonLinesSource(LinesSource):
    """JSON Lines: one JSON value per line, blank lines skipped (see :class:`LinesSource`).
    A broken line fails in the decode stage with its line number."""

    skip_blank = True

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        options.setdefault("codec", JSON)
        super().__init__(path, **options)


class CsvSource(LinesSource):
    """CSV records as ``dict`` values keyed by the header (the first line), or by
    ``fieldnames`` when the file has no header. Quoted fields may span lines. A row with a
    missing or extra field fails in the decode stage with its line number. Blank lines are
    skipped. Resuming reads the header again, then continues at the saved position.
    """

    skip_blank = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fieldnames: Sequence[str] | None = None,
        delimiter: str = ",",
        **options: Any,
    ) -> None:
        if "codec" in options:
            raise TypeError("CsvSource builds its codec from the header; use fieldnames=")
        super().__init__(path, **options)
        self.fieldnames = None if fieldnames is None else tuple(fieldnames)
        self.delimiter = delimiter

    async def _begin(self, f: BinaryIO) -> None:
        if self.fieldnames is None:
            header = await anyio.to_thread.run_sync(f.readline, self.max_line)
            if not header.endswith(b"\n"):
                if not self.follow:
                    raise ValueError(f"{self.name}: no CSV header line")
                f.seek(0)
                await anyio.sleep(self.poll_interval)
                await self._begin(f)
                return
            names = next(csv.reader([header.decode().rstrip("\r\n")], delimiter=self.delimiter))
            self.fieldnames = tuple(names)
            if self._committed.offset < len(header):
                self._committed = FilePosition(len(header), 1)
        self.codec = CsvCodec(self.fieldnames, delimiter=self.delimiter)
        await super()._begin(f)

    def _record_end(self, buf: bytearray, start: int) -> int:
        # a newline inside quotes does not end the record: count quotes up to each newline
        end = buf.find(b"\n", start)
        while end >= 0 and buf.count(b'"', 0, end) % 2:
            end = buf.find(b"\n", end + 1)
        return end


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")  # closed by the source's __aexit__
