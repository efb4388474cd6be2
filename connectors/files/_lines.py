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

    ``follow=True`` works like ``tail -F``: at the end of the file it waits for more (polling
    every ``poll_interval`` s, waiting for the file to appear if needed) and never ends by
    itself; a line is only emitted once its newline is written, so a writer's half-written
    line is never read. Log rotation is followed: when ``path`` names another file (the old
    one was renamed and a new one created), the rest of the old file is read, its last line
    too, and reading goes on at the start of the new one (``connector.file_rotated``). A file
    truncated below the read position (``copytruncate``) is read again from the start,
    logged as ``connector.file_truncated``.

    Resume: :attr:`position` is the committed :class:`FilePosition`: every record before it
    was handled by the flow (acked), in file order, whatever order they finished in. Pass it
    back as ``start=``, or give ``checkpoint=`` a file path: the position is saved there
    (atomically, at most every ``checkpoint_interval`` s and on exit) and read back on start.
    At least once: records after the saved position are read again after a crash. The
    position names the file's inode: if ``path`` names another file on restart (it was
    rotated meanwhile), the new file is read from its start, and what the old one held after
    the position is not read again (``connector.file_rotated``, logged with the position).

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
        self._inode = 0  # of the file being read
        self._seq = 0  # records read, the key of each one's ack
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
                start = FilePosition.of_state(state)
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

    async def _open(self, start: FilePosition | None = None) -> BinaryIO | None:
        """Open ``path`` (waiting for it in follow mode) at ``start``, by default the
        committed position."""
        while True:
            try:
                f = await anyio.to_thread.run_sync(_open_binary, self.path)
            except FileNotFoundError:
                if not self.follow:
                    raise
                await anyio.sleep(self.poll_interval)
                continue
            await self._begin(f, start)
            return f

    async def _begin(self, f: BinaryIO, start: FilePosition | None) -> None:
        """Position ``f`` at ``start`` (a new file: its first record), or by default at the
        committed position when that lies in this file."""
        stat = os.fstat(f.fileno())
        self._inode = stat.st_ino
        first = await self._first_record(f)
        if start is None:
            start = self._committed
            event = None
            if start.inode and start.inode != stat.st_ino:
                event = "connector.file_rotated"  # the position is in an older file
            elif start.offset > stat.st_size:
                event = "connector.file_truncated"
            if event is not None:
                log.warning(
                    event,
                    source=self.name,
                    offset=start.offset,
                    line=start.line,
                    size=stat.st_size,
                    action="reading from the start",
                )
            if event is not None or start.offset < first.offset:
                start = self._committed = first
        elif start.offset < first.offset:
            start = first
        f.seek(start.offset)
        self._offset, self._line = start.offset, start.line

    async def _first_record(self, f: BinaryIO) -> FilePosition:
        """Where the records of ``f`` begin (a subclass may read a header there)."""
        return FilePosition(0, 0, self._inode)

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
            if self._rotated(f):
                message = self._next_record(at_eof=True)  # the old file's last line
                if message is not None:
                    return message
                log.info("connector.file_rotated", source=self.name, lines=self._line)
                f.close()
                self._forget_buffer()
                self._file = f = await self._open(FilePosition())
                assert f is not None
                continue
            if os.fstat(f.fileno()).st_size < self._offset + len(self._buf):
                log.warning(
                    "connector.file_truncated",
                    source=self.name,
                    offset=self._offset + len(self._buf),
                    action="reading from the start",
                )
                self._forget_buffer()
                f.seek(0)
                await self._begin(f, FilePosition())
                continue
            await anyio.sleep(self.poll_interval)

    def _forget_buffer(self) -> None:
        """Drop what was read and not yet emitted: reading starts again elsewhere."""
        self._buf.clear()
        self._scan = 0
        self._skipping = False

    def _rotated(self, f: BinaryIO) -> bool:
        """Whether ``path`` now names another file than ``f`` (read to its end just now)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:  # renamed, the new one not created yet: keep reading f
            return False
        then = os.fstat(f.fileno())
        return (now.st_ino, now.st_dev) != (then.st_ino, then.st_dev)

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
            after = FilePosition(self._offset, self._line, self._inode)
            return self._message(raw, line_no, offset, None, after)

    def _overlong(self, n: int, *, complete: bool) -> sf.Message[Record]:
        line_no, offset = self._line + 1, self._offset
        # resume before an overlong line until its end was seen
        after = (
            FilePosition(offset + n, line_no, self._inode)
            if complete
            else FilePosition(offset, line_no - 1, self._inode)
        )
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
        self._seq += 1  # not the line number: lines start again in a rotated file
        self._done.track(self._seq, after)
        meta = {"source": self.name, **position}
        return sf.Message(record, meta=meta, on_ack=partial(self._ack, self._seq))

    def _ack(self, seq: int, outcome: sf.Outcome) -> None:
        released = self._done.done(seq)
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
        self._header_in_file = fieldnames is None
        self.delimiter = delimiter

    async def _first_record(self, f: BinaryIO) -> FilePosition:
        """After the header line, when the file has one (every file, a rotated one too)."""
        first = FilePosition(0, 0, self._inode)
        if self._header_in_file:
            while True:
                f.seek(0)
                header = await anyio.to_thread.run_sync(f.readline, self.max_line)
                if header.endswith(b"\n"):
                    break
                if not self.follow:
                    raise ValueError(f"{self.name}: no CSV header line")
                await anyio.sleep(self.poll_interval)  # the writer is still at it
            text = header.decode().rstrip("\r\n")
            self.fieldnames = tuple(next(csv.reader([text], delimiter=self.delimiter)))
            first = FilePosition(len(header), 1, self._inode)
        assert self.fieldnames is not None
        self.codec = CsvCodec(self.fieldnames, delimiter=self.delimiter)
        return first

    def _record_end(self, buf: bytearray, start: int) -> int:
        # a newline inside quotes does not end the record: count quotes up to each newline
        end = buf.find(b"\n", start)
        while end >= 0 and buf.count(b'"', 0, end) % 2:
            end = buf.find(b"\n", end + 1)
        return end


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")  # closed by the source's __aexit__
