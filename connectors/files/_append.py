"""Line-based file sinks: each record is one append, never half of one."""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

import streamflow as sf
from streamflow._logging import get_logger

from .._deadletter import dead_letter_entry
from .._errors import ConnectorError
from .._record import Record
from ..codecs import JSON, TEXT, Codec, CsvCodec

__all__ = ["CsvSink", "DeadLetterFile", "JsonLinesSink", "LinesSink"]

log = get_logger("streamflow")


class LinesSink:
    """Append each item to the file at ``path`` as one line (``codec``-encoded, or a
    :class:`~streamflow.connectors.Record`'s raw bytes), creating the file if needed.

    Guarantee: ``send`` returns once the whole line, newline included, was written with one
    ``write`` to a descriptor opened with ``O_APPEND`` (and, with ``fsync=True``, flushed to
    disk). So an acked item survives a crash of the process (with ``fsync``, of the machine
    too). A line is only complete with its newline: readers in follow mode never read a
    half-written line, and on opening, the sink cuts off a torn last line left by an earlier
    crash (logged as ``connector.repaired_tail``), so the file only ever holds whole records.
    One writer per file.

    With checkpoints: truncated to its checkpointed length on restore (what was written
    after the checkpoint is written again by the replay): exactly once. :meth:`snapshot`
    is the file's length (flushed, and with ``fsync=True`` synced); :meth:`restore` cuts
    the file back to it, and fails with :class:`~streamflow.connectors.ConnectorError`
    naming the file when it is shorter (something else truncated it).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, codec: Codec[Any] = TEXT, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.codec = codec
        self.fsync = fsync
        self.name = f"file:{self.path}"
        self.written = 0
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    async def __aenter__(self) -> LinesSink:
        await anyio.to_thread.run_sync(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _open(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _repair_tail(fd, self.name)
            self._start(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _start(self, fd: int) -> None:
        """Called once the file is open and whole (CsvSink writes its header here)."""

    def encode(self, item: Any) -> bytes:
        """One line for ``item``, with its newline."""
        data = item.data() if isinstance(item, Record) else self.codec.encode(item)
        if b"\n" in data:
            raise ValueError(f"{self.name}: a line record cannot contain a newline")
        return data + b"\n"

    async def send(self, item: Any) -> None:
        """Append ``item`` as one line (see the class for the guarantee)."""
        data = self.encode(item)
        if self._fd is None:
            await anyio.to_thread.run_sync(self._open)
        assert self._fd is not None
        _write_all(self._fd, data)
        if self.fsync:
            await anyio.to_thread.run_sync(os.fsync, self._fd)
        self.written += 1

    # -- checkpoints ---------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """``{"length": bytes}``: the file's length, every line before it written (each
        ``send`` writes its line whole before it returns), and with ``fsync=True`` synced
        to disk."""
        if self._fd is None:
            await anyio.to_thread.run_sync(self._open)
        fd = self._fd
        assert fd is not None
        if self.fsync:
            await anyio.to_thread.run_sync(os.fsync, fd)
        return {"length": os.fstat(fd).st_size}

    async def restore(self, state: dict[str, Any]) -> None:
        """Cut the file back to ``state["length"]`` (what :meth:`snapshot` returned).

        :raises ConnectorError: the file is shorter than that (something else truncated or
            replaced it), naming the file."""
        try:
            length = int(state["length"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{self.name}: not a file sink state: {state!r}") from exc
        await anyio.to_thread.run_sync(self._truncate, length)

    def _truncate(self, length: int) -> None:
        self._open()
        fd = self._fd
        assert fd is not None
        size = os.fstat(fd).st_size
        if size < length:
            raise ConnectorError(
                f"{self.path}: the file holds {size} bytes, fewer than the {length} it had at "
                "the checkpoint being restored: something else truncated or replaced it"
            )
        if size > length:
            os.ftruncate(fd, length)
            log.info(
                "connector.truncated",
                sink=self.name,
                removed_bytes=size - length,
                size=length,
            )
        self._start(fd)  # an empty file gets its header again (CsvSink)
        if self.fsync:
            os.fsync(fd)


class JsonLinesSink(LinesSink):
    """JSON Lines: each item as compact JSON on its own line (see :class:`LinesSink`). With
    checkpoints: truncated to its checkpointed length on restore: exactly once."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        super().__init__(path, codec=JSON, fsync=fsync)


class CsvSink(LinesSink):
    """CSV: each item (a mapping or a sequence in field order) as one record; the header is
    written when the file is empty. Fields may contain newlines (quoted, as CSV allows).
    With checkpoints: truncated to its checkpointed length on restore, header kept once:
    exactly once (see :class:`LinesSink`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fieldnames: Sequence[str],
        *,
        delimiter: str = ",",
        fsync: bool = False,
    ) -> None:
        super().__init__(path, codec=CsvCodec(fieldnames, delimiter=delimiter), fsync=fsync)

    def _start(self, fd: int) -> None:
        if os.fstat(fd).st_size == 0:
            codec = self.codec
            assert isinstance(codec, CsvCodec)
            _write_all(fd, codec.encode(list(codec.fieldnames)) + b"\n")

    def encode(self, item: Any) -> bytes:
        data = item.data() if isinstance(item, Record) else self.codec.encode(item)
        return data + b"\n"


class DeadLetterFile(LinesSink):
    """A dead-letter sink for ``sf.DeadLetter(...)``: one JSON line per failed item with
    ``time``, ``flow``, ``stage``, ``source``, ``position``, ``reason``, ``attempts``, the raw
    bytes as ``raw_b64`` (``null`` for a tombstone) and, when they are UTF-8, as
    ``raw_text``. Same append guarantee as :class:`LinesSink`, and the same checkpoint
    behaviour when the flow takes part with it (cut back to the checkpointed length)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        super().__init__(path, codec=JSON, fsync=fsync)

    def encode(self, item: Any) -> bytes:
        if not isinstance(item, sf.FailedItem):
            return super().encode(item)
        entry = dead_letter_entry(item)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "flow": entry.flow,
            "stage": entry.stage,
            "source": entry.source,
            "position": entry.position,
            "reason": entry.reason,
            "attempts": entry.attempts,
            "raw_b64": None if entry.raw is None else base64.b64encode(entry.raw).decode(),
        }
        if entry.raw is not None:
            with contextlib.suppress(UnicodeDecodeError):
                line["raw_text"] = entry.raw.decode()
        return super().encode(line)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _repair_tail(fd: int, name: str) -> None:
    """Cut a last line that has no newline (torn by a crash during a write)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    log.warning("connector.repaired_tail", sink=name, removed_bytes=size - keep, size=keep)
