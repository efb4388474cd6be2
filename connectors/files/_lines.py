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
import anyio.lowlevel

import streamflow as sf
from streamflow._logging import get_logger

from .._errors import ConnectorError
from .._inorder import InOrder
from .._record import Record
from ..codecs import JSON, TEXT, Codec, CsvCodec
from ._position import Checkpoint, FilePosition
from ._split import PAUSE, Piece, Splitter

__all__ = ["CsvHeaderError", "CsvSource", "JsonLinesSource", "LinesSource"]

log = get_logger("streamflow")

_CHUNK = 1 << 16
_SKIP_CHUNK = 1 << 20


class LinesSource:
    """Yield each line of the file at ``path`` as a :class:`~streamflow.connectors.Record` (the line's
    bytes without its line end; ``position`` is its ``line`` number, from 1, and byte
    ``offset``), decoded with ``codec`` by :func:`streamflow.connectors.decode`.

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

    With checkpoints (the flow calls :meth:`restore`): the source resumes right after the
    last line it handed out before the checkpoint (:meth:`snapshot`), so together with the
    flow's restored state each line counts once; ``checkpoint=`` is still read when there
    is no checkpoint yet, but no longer written (the flow's checkpoints hold the position).

    Untrusted input is bounded: a line longer than ``max_line`` bytes becomes a record with
    ``error`` set (its first 64 bytes as ``raw``, its line number and offset as ``position``)
    and is skipped up to its newline without being held in memory, so it meets the decode
    stage's error policy and the lines after it are read (until that newline is read, the
    committed position stays before the line: a resume reads it again). Memory holds at
    most ``max_line`` bytes plus one 64 KiB chunk, every byte is scanned a bounded number of
    times, and the work done between two waits on the event loop is bounded (a file of blank
    lines or one huge line does not stall the other stages).
    """

    skip_blank = False
    """Skip lines of whitespace only."""
    skip_empty = False
    """Skip empty lines only."""

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
        self._split = self._splitter()
        self._inode = 0  # of the file being read
        self._seq = 0  # records read, the key of each one's ack
        # the position after each record in flight: (offset, line, inode), a FilePosition
        # only when asked for (building one per record is a tenth of the per-line cost)
        self._done: InOrder[int, tuple[int, int, int]] = InOrder()
        self._committed = FilePosition()
        self._released: tuple[int, int, int] | None = None  # newer than _committed
        self._entered = False
        # checkpoints: restore() was called; the position file is no longer written
        self._checkpointed = False
        # after the last record handed out: (offset, line, inode, skipping), where skipping
        # says the record was an overlong line whose end was not read yet (resuming at its
        # start skips it); None: nothing handed out yet, the committed position
        self._handed: tuple[int, int, int, bool] | None = None
        self._skip_at: FilePosition | None = None  # restored inside an overlong line

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, follow={self.follow})"

    def _splitter(self) -> Splitter:
        """How the file is cut into records."""
        return Splitter(
            max_line=self.max_line, skip_blank=self.skip_blank, skip_empty=self.skip_empty
        )

    @property
    def position(self) -> FilePosition:
        """Everything before this position has been handled by the flow."""
        released = self._released
        if released is not None:
            self._committed = FilePosition(*released)
            self._released = None
        return self._committed

    def _commit(self, position: FilePosition) -> None:
        self._committed, self._released = position, None

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> LinesSource:
        self._entered = True
        start = self._start
        if start is None and self._checkpoint is not None:
            state = self._checkpoint.load()
            if state is not None:
                start = FilePosition.of_state(state)
                log.info("connector.resume", source=self.name, offset=start.offset, line=start.line)
        self._commit(start or FilePosition())
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
        if self._checkpoint is not None and not self._checkpointed:
            self._checkpoint.save(Checkpoint.of_position(self.path, self.position), force=force)

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The source's position: ``{"path", "offset", "line", "inode"}`` (as a
        ``checkpoint=`` file holds) of the line after the last one handed to the flow, and
        ``"skipping": True`` when that last one was an overlong line still being skipped."""
        handed = self._handed
        if handed is None:
            return Checkpoint.of_position(self.path, self.position)
        offset, line, inode, skipping = handed
        state = Checkpoint.of_position(self.path, FilePosition(offset, line, inode))
        if skipping:
            state["skipping"] = True
        return state

    def restore(self, position: dict[str, Any] | None) -> None:
        """Enter checkpoint mode, at ``position`` (what :meth:`snapshot` returned; ``None``:
        no checkpoint yet, start as without checkpoints). Called after ``__aenter__``,
        before the first item. From here on the ``checkpoint=`` file is not written."""
        if not self._entered:
            raise RuntimeError(f"{self!r}: restore() is called after __aenter__")
        self._checkpointed = True
        if position is None:
            return
        try:
            start = FilePosition.of_state(position)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{self!r}: not a file position: {position!r}") from exc
        if position.get("path") not in (None, str(self.path)):
            log.warning(
                "connector.restore_other_path",
                source=self.name,
                checkpoint_path=position.get("path"),
            )
        if self._file is not None:  # read from the restored position instead
            self._file.close()
            self._file = None
        self._done = InOrder()
        self._commit(start)
        self._handed = None
        self._skip_at = start if position.get("skipping") else None
        log.info("connector.resume", source=self.name, offset=start.offset, line=start.line)

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
            try:
                await self._begin(f, start)
            except BaseException:
                f.close()  # a bad header: the source fails, the file must not leak
                raise
            return f

    async def _begin(self, f: BinaryIO, start: FilePosition | None) -> None:
        """Position ``f`` at ``start`` (a new file: its first record), or by default at the
        committed position when that lies in this file."""
        stat = os.fstat(f.fileno())
        self._inode = stat.st_ino
        first = await self._first_record(f)
        if start is None:
            start = self.position
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
                start = first
                self._commit(first)
        elif start.offset < first.offset:
            start = first
        f.seek(start.offset)
        skip, self._skip_at = self._skip_at == start, None
        self._split.reset(start.offset, start.line, skipping=skip)

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
        piece = self._split.next()
        if piece is not None and piece is not PAUSE:  # the common case: a line was read
            return self._message(piece)
        return await self._read_on(f)

    async def _read_on(self, f: BinaryIO) -> sf.Message[Record]:
        """The next record, when what was read holds no more: read on, wait in follow mode,
        follow rotation and truncation."""
        split = self._split
        while True:
            piece = await self._take(at_eof=False)
            if piece is not None:
                return self._message(piece)
            # inside an overlong line nothing is kept: read on in bigger steps
            size = _SKIP_CHUNK if split.skipping else _CHUNK
            chunk = await anyio.to_thread.run_sync(f.read, size)
            if chunk:
                split.feed(chunk)
                continue
            if not self.follow:
                piece = await self._take(at_eof=True)
                if piece is not None:
                    return self._message(piece)
                raise StopAsyncIteration
            if self._rotated(f):
                piece = await self._take(at_eof=True)  # the old file's last line
                if piece is not None:
                    return self._message(piece)
                log.info("connector.file_rotated", source=self.name, lines=split.line)
                f.close()
                self._forget_buffer()
                new = await self._open(FilePosition())
                assert new is not None
                self._file = f = new
                continue
            if os.fstat(f.fileno()).st_size < split.fed:
                log.warning(
                    "connector.file_truncated",
                    source=self.name,
                    offset=split.fed,
                    action="reading from the start",
                )
                self._forget_buffer()
                f.seek(0)
                await self._begin(f, FilePosition())
                continue
            await anyio.sleep(self.poll_interval)

    async def _take(self, *, at_eof: bool) -> Piece | None:
        """The next record of what was read (``None``: read more first), letting the event
        loop run between the splitter's bounded steps."""
        while True:
            piece = self._split.next(at_eof=at_eof)
            if piece is not PAUSE:
                return piece
            await anyio.lowlevel.checkpoint()

    def _forget_buffer(self) -> None:
        """Drop what was read and not yet emitted: reading starts again elsewhere."""
        self._split.reset(self._split.offset, self._split.line)

    def _rotated(self, f: BinaryIO) -> bool:
        """Whether ``path`` now names another file than ``f`` (read to its end just now)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:  # renamed, the new one not created yet: keep reading f
            return False
        then = os.fstat(f.fileno())
        return (now.st_ino, now.st_dev) != (then.st_ino, then.st_dev)

    def _message(self, piece: Piece) -> sf.Message[Record]:
        raw, line, offset, error, after_offset, after_line = piece
        record = Record(
            raw, self.name, {"line": line, "offset": offset}, codec=self.codec, error=error
        )
        self._seq = seq = self._seq + 1  # not the line number: lines start again after rotation
        inode = self._inode
        self._done.track(seq, (after_offset, after_line, inode))
        # an overlong line whose end is not read yet resumes before it: skipping it
        self._handed = (after_offset, after_line, inode, after_offset == offset)
        meta = {"source": self.name, "line": line, "offset": offset}
        return sf.Message(record, meta=meta, on_ack=partial(self._ack, seq))

    def _ack(self, seq: int, outcome: sf.Outcome) -> None:
        if outcome & sf.Outcome.ABORTED:
            return  # the flow stopped before handling it: the position stays before it
        done = self._done
        if done.release(seq):
            self._released = done.last


class JsonLinesSource(LinesSource):
    """JSON Lines: one JSON value per line, blank lines skipped (see :class:`LinesSource`).
    A broken line fails in the decode stage with its line number."""

    skip_blank = True

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        options.setdefault("codec", JSON)
        super().__init__(path, **options)


class CsvHeaderError(ConnectorError, ValueError):
    """A CSV file's header line is missing, too long, empty or not UTF-8: the source cannot
    build its records and the flow fails. ``path``, ``line`` (1) and ``offset`` (the byte at
    fault, from the start of the file) say where."""

    def __init__(self, path: Path, message: str, *, offset: int = 0) -> None:
        self.path = path
        self.line = 1
        self.offset = offset
        super().__init__(f"{path}: CSV header (line 1, byte offset {offset}): {message}")


class CsvSource(LinesSource):
    """CSV records as ``dict`` values keyed by the header (the first line), or by
    ``fieldnames`` when the file has no header. Quoted fields may span lines (the records are
    the rows :func:`csv.reader` reads: a quote opens a quoted field only at the start of a
    field). A row with a missing or extra field fails in the decode stage with its line
    number. Empty lines are skipped (as :class:`csv.DictReader` does). Resuming reads the
    header again, then continues at the saved position.

    Untrusted input (see also :class:`LinesSource`). A stray or unclosed quote swallows the
    newlines after it, so a record that spans lines is *cut* when it cannot be what a CSV
    writer wrote: its quoted field is still open after ``max_line`` bytes or at the end of
    the file, the quote closing it is followed by text other than a delimiter or a line
    end, it holds a quote inside an unquoted field, or it has another number of fields than
    the header. The first line of a cut record, whole, becomes a record with ``error`` set
    (``raw``: that line; ``position``: its line number and offset) and reading resynchronises
    right after that line, outside quotes, so the rows after it arrive (a row inside the
    cut record's span that is still in a quoted field at its line end would go the same
    way, and is cut at once: that keeps the work linear on a crafted file). A genuine quoted
    field longer than ``max_line`` is cut too, its other lines then read as rows of their own
    (which mostly fail to decode): set ``max_line`` above your longest record. In follow
    mode a record whose quoted field is still open at the end of the file waits for the
    writer, up to ``max_line`` bytes. A header that is missing, longer than ``max_line``,
    empty or not UTF-8 fails the flow with :class:`CsvHeaderError` (naming the file, line 1
    and the byte offset).
    """

    skip_empty = True

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
        self.delimiter = delimiter
        super().__init__(path, **options)
        self.fieldnames = None if fieldnames is None else tuple(fieldnames)
        self._header_in_file = fieldnames is None

    def _splitter(self) -> Splitter:
        return Splitter(max_line=self.max_line, csv=True, delimiter=self.delimiter, skip_empty=True)

    async def _first_record(self, f: BinaryIO) -> FilePosition:
        """After the header line, when the file has one (every file, a rotated one too)."""
        first = FilePosition(0, 0, self._inode)
        if self._header_in_file:
            while True:
                f.seek(0)
                header = await anyio.to_thread.run_sync(f.readline, self.max_line + 2)
                if header.endswith(b"\n") and len(header.rstrip(b"\r\n")) <= self.max_line:
                    break
                if len(header.rstrip(b"\r")) > self.max_line:  # its \r\n may be on the way
                    raise CsvHeaderError(self.path, f"longer than max_line={self.max_line} bytes")
                if not self.follow:
                    raise CsvHeaderError(self.path, "no header line (the file ends first)")
                await anyio.sleep(self.poll_interval)  # the writer is still at it
            self.fieldnames = self._fields(header)
            first = FilePosition(len(header), 1, self._inode)
        assert self.fieldnames is not None
        self.codec = CsvCodec(self.fieldnames, delimiter=self.delimiter)
        self._split.fields = len(self.fieldnames)
        return first

    def _fields(self, header: bytes) -> tuple[str, ...]:
        try:
            text = header.decode()
        except UnicodeDecodeError as exc:
            raise CsvHeaderError(
                self.path,
                f"not valid UTF-8 (byte 0x{header[exc.start]:02x}: {exc.reason})",
                offset=exc.start,
            ) from None
        fields = tuple(next(csv.reader([text.rstrip("\r\n")], delimiter=self.delimiter)))
        if not fields:
            raise CsvHeaderError(self.path, "empty: no field names")
        return fields


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")  # closed by the source's __aexit__
