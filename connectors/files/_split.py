"""Cutting a byte stream into records: lines, or CSV records whose quoted fields may span
lines. Pure and synchronous (no I/O), so the framing of the line sources can be tested on
any chunking of any input; the sources feed it the chunks they read."""

from __future__ import annotations

import enum
from typing import Final, Literal, NamedTuple

__all__ = ["PAUSE", "Piece", "Splitter"]

_NL: Final = 0x0A
_CR: Final = 0x0D
_QUOTE: Final = 0x22

RAW_PREFIX: Final = 64
"""How many first bytes of an overlong line a bad record keeps as ``raw`` (at most
``max_line + 1``: as many as are surely read when it is found too long)."""

SCAN_STEP: Final = 1 << 15
"""The most bytes one :meth:`Splitter.next` call scans for quotes (CSV) before it answers
:data:`PAUSE`: the work per call stays bounded whatever the input."""

SKIP_STEP: Final = 1 << 12
"""The most blank lines one :meth:`Splitter.next` call skips before it answers :data:`PAUSE`."""


class _Signal(enum.Enum):
    PAUSE = "pause"


PAUSE: Final = _Signal.PAUSE
"""What :meth:`Splitter.next` answers when it did its share of work for one call and has more
to do with the bytes it holds: call it again (after letting the event loop run), without
feeding it."""


class Piece(NamedTuple):
    """One record cut from the stream."""

    raw: bytes
    """Its bytes, without the line end (``\\n`` or ``\\r\\n``); for a bad record, its first
    bytes."""
    line: int
    """The number of its first line, from 1."""
    offset: int
    """The stream offset of its first byte."""
    error: str | None
    """Why the record is bad (``None``: a good one, for the codec to judge)."""
    after_offset: int
    """Where reading resumes once this record is handled: after it, or (an overlong line whose
    end was not seen yet) before it."""
    after_line: int
    """The lines before ``after_offset``."""


_new = tuple.__new__  # a Piece without NamedTuple's slower __new__


_MORE = -1  # no record end yet
_STRAY = -2  # a quoted field spanning lines closed, and a byte that cannot follow came next
_DOOMED = -3  # inside a quoted field at a line end, within the window of the last cut


class Splitter:
    """Cut the bytes given to :meth:`feed` into records, returned one by one by :meth:`next`.

    A record ends at a newline (``\\n``; a ``\\r`` before it is dropped too). With
    ``csv=True`` a newline inside a quoted field does not end it, with the ``csv`` module's
    rules: a quote opens a quoted field only at the start of a field (at the start of the
    record or right after ``delimiter``; elsewhere it is an ordinary character), ``""``
    inside a quoted field is a quote, and the field ends at the next lone quote. So the
    records are the rows ``csv.reader`` reads (a bare ``\\r`` ends nothing here), but for
    the bounds below.

    Bounds (the input may be hostile):

    * A record longer than ``max_line`` bytes is a bad record (:attr:`Piece.error` set). A
      line longer than ``max_line`` keeps its first :data:`RAW_PREFIX` bytes as ``raw`` and
      is skipped up to its newline, never held in memory whole.
    * Resynchronisation (CSV). A record is *cut* when its quoted field is most likely opened
      by a stray or unclosed quote (which swallows the newlines after it): the field is still
      open after ``max_line`` bytes or at the end of the input; it spans lines and its
      closing quote is followed by something other than the delimiter, a quote or a line end
      (no valid CSV has that); or it spans lines and has a quote inside an unquoted field
      (which no CSV writer writes) or another number of fields than ``fields`` (when given:
      the header's). A cut record's *first line* is the bad record (whole, as
      ``raw``) and splitting starts again, outside quotes, right after that line. So one bad
      quote costs one line, not the rest of the file. The lines up to the point where the cut
      was decided are then read one by one: a record among them that is still inside a quoted
      field at one of its line ends would go the same way, and is cut at once (without this a
      crafted file costs ``max_line`` bytes of scanning per line). A genuine quoted field
      longer than ``max_line`` is cut the same way, its other lines read as records of their
      own (most of them fail to decode): set ``max_line`` above the longest record.
    * Work: every byte is scanned a bounded number of times (the state of the scan is kept
      between calls), memory holds at most ``max_line`` bytes plus one chunk, and one call
      scans at most :data:`SCAN_STEP` bytes for quotes and skips at most :data:`SKIP_STEP`
      blank lines before it answers :data:`PAUSE`.

    ``skip_blank`` skips lines of whitespace only (JSON Lines); ``skip_empty`` skips empty
    lines only (CSV, as ``csv.DictReader`` does).
    """

    def __init__(
        self,
        *,
        max_line: int,
        csv: bool = False,
        delimiter: str = ",",
        skip_blank: bool = False,
        skip_empty: bool = False,
        fields: int | None = None,
        offset: int = 0,
        line: int = 0,
    ) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, got {max_line}")
        self.max_line = max_line
        self.csv = csv
        self._delim = delimiter.encode()
        if csv and (not self._delim or _QUOTE in self._delim or _NL in self._delim):
            raise ValueError(f"cannot split CSV with delimiter {delimiter!r}")
        self.skip_blank = skip_blank
        self.skip_empty = skip_empty
        self.fields = fields
        """How many fields a CSV record has (``None``: any number)."""
        self._buf = bytearray()
        self.reset(offset, line)

    def reset(self, offset: int = 0, line: int = 0, *, skipping: bool = False) -> None:
        """Forget what was fed: the next byte fed is at ``offset``, after ``line`` lines
        (``skipping``: inside an overlong line already reported, dropped up to its
        newline)."""
        self._buf.clear()
        self._pos = 0  # where the next record starts in _buf
        self._offset = offset  # the stream offset of _buf[_pos]
        self._line = line  # lines before _buf[_pos]
        self._skipping = skipping  # inside an overlong line: drop up to its newline
        self._doom = -1  # index in _buf up to which the last cut's window goes (-1: none)
        self._doom_reason = ""
        self._rewind()

    def _rewind(self) -> None:
        """Start scanning the record at ``_pos`` afresh, outside quotes."""
        self._scan = self._pos  # where the scan for the record's end goes on
        self._quoted = False  # whether the scan is inside a quoted field
        self._opened = -1  # index of the quote that opened the last quoted field
        self._closed = -2  # index of the quote that last closed it (-2: nothing to check)
        self._delims = 0  # delimiters outside quotes, from _pos to _scan
        self._literal = False  # whether a quote was seen inside an unquoted field

    @property
    def offset(self) -> int:
        """The stream offset of the next record (the first byte not consumed)."""
        return self._offset

    @property
    def line(self) -> int:
        """The lines consumed so far."""
        return self._line

    @property
    def skipping(self) -> bool:
        """Whether the splitter is inside an overlong line: what it is fed is dropped, up to
        the line's newline."""
        return self._skipping

    @property
    def fed(self) -> int:
        """The stream offset just after the last byte fed."""
        return self._offset + len(self._buf) - self._pos

    def feed(self, chunk: bytes) -> None:
        """Add the next bytes of the stream (after what :meth:`next` consumed, the buffer is
        compacted first: one copy of the rest per chunk)."""
        pos = self._pos
        if pos:
            del self._buf[:pos]
            self._pos = 0
            self._scan -= pos
            self._opened -= pos
            self._closed -= pos
            if self._doom >= 0:
                self._doom -= pos
        self._buf += chunk

    def next(self, *, at_eof: bool = False) -> Piece | Literal[_Signal.PAUSE] | None:
        """The next record; ``None`` when more input is needed first (``at_eof``: there will
        be none, so what is left is the last record); :data:`PAUSE` (see there)."""
        buf = self._buf
        if not (self.csv or self._skipping):  # the common case first: one whole plain line
            end = buf.find(b"\n", self._scan)
            start = self._pos
            if end >= 0 and end - start <= self.max_line:
                stop = end - 1 if end > start and buf[end - 1] == _CR else end
                raw = bytes(buf[start:stop])
                if not ((self.skip_blank or self.skip_empty) and not raw.strip()):
                    line, offset = self._line + 1, self._offset
                    self._pos = self._scan = end + 1
                    self._offset = after = offset + end + 1 - start
                    self._line = line
                    return _new(Piece, (raw, line, offset, None, after, line))
        skipped = 0
        while True:
            n = len(buf)
            start = self._pos
            if start == n:
                return None
            if self._skipping:  # the rest of an overlong line
                nl = buf.find(b"\n", start)
                if nl < 0:
                    self._consume(n, 0)
                    return None
                self._consume(nl + 1, 1)
                self._skipping = False
                continue
            if self.csv:
                # nothing past max_line bytes counts: the verdict does not depend on the chunks
                cap = start + self.max_line + 1
                limit = min(n, self._scan + SCAN_STEP, cap)
                end = self._csv_end(limit)
                if end == _STRAY:
                    byte = bytes(buf[self._scan : self._scan + 1])
                    reason = (
                        f"CSV quoted field spanning lines is followed by {byte!r}, not by a "
                        "delimiter or a line end"
                    )
                    return self._cut(start, reason, self._scan)
                if end == _DOOMED:
                    return self._cut(start, self._doom_reason, self._doom)
                if end < 0 and limit == cap:
                    return self._too_long(start)
                if end < 0 and limit < n:
                    return PAUSE
            else:
                end = buf.find(b"\n", self._scan)
                if end < 0:
                    self._scan = n
            if end < 0:
                if n - start > self.max_line:
                    return self._too_long(start)
                if not at_eof:
                    return None
                if self._quoted:
                    return self._cut(start, "CSV quoted field not closed before the end", n)
                end = n  # the last record has no newline
            elif end - start > self.max_line:
                return self._too_long(start)
            if self.csv and (
                self._literal or (self.fields is not None and self._delims + 1 != self.fields)
            ):
                reason = self._invalid(start, end)
                if reason:
                    return self._cut(start, reason, end)
            stop = end - 1 if end > start and buf[end - 1] == _CR else end
            if self.skip_empty and stop == start:
                self._consume(min(end + 1, n), 1)
            else:
                raw = bytes(buf[start:stop])
                lines = 1 + (buf.count(b"\n", start, end) if self.csv else 0)
                line, offset = self._line + 1, self._offset
                self._consume(min(end + 1, n), lines)
                if not (self.skip_blank and not raw.strip()):
                    return _new(Piece, (raw, line, offset, None, self._offset, self._line))
            skipped += 1
            if skipped >= SKIP_STEP:
                return PAUSE

    def _csv_end(self, limit: int) -> int:
        """Index of the newline ending the CSV record at ``_pos``, scanning ``_buf`` from
        ``_scan`` to ``limit``; or ``_MORE`` (not there: the scan's state is kept for the
        next call), ``_STRAY`` (``_scan``: the byte after the closing quote) or ``_DOOMED``.

        Only quotes and newlines matter: ``find`` jumps between them, so a byte costs one
        C-level comparison and a quote a few Python steps."""
        buf = self._buf
        start, delim, doom = self._pos, self._delim, self._doom
        scan, quoted, opened, closed = self._scan, self._quoted, self._opened, self._closed
        delims, count, literal = self._delims, self.fields is not None, self._literal
        nl = -1  # the first newline at or after scan (limit: none before limit)
        result = _MORE
        while True:
            if quoted:  # find the quote that closes the field
                q = buf.find(b'"', scan, limit)
                stop = limit if q < 0 else q
                if scan < doom and buf.find(b"\n", scan, min(stop, doom)) >= 0:
                    result = _DOOMED
                    break
                if q < 0:
                    scan = limit
                    break
                quoted, closed, scan = False, q, q + 1
                continue
            if scan == closed + 1:  # right after a closing quote
                if scan == limit:
                    break  # the byte after it is still to come
                byte = buf[scan]
                if byte == _QUOTE:  # "" inside a quoted field
                    quoted, scan = True, scan + 1
                    continue
                if (
                    byte != _NL
                    and byte != _CR
                    and not buf.startswith(delim, scan)
                    and buf.find(b"\n", opened, closed) >= 0
                ):
                    result = _STRAY
                    break
                closed = -2
            if nl < scan:
                nl = buf.find(b"\n", scan, limit)
                if nl < 0:
                    nl = limit
            q = buf.find(b'"', scan, nl)
            if count:
                delims += buf.count(delim, scan, nl if q < 0 else q)
            if q < 0:
                if nl < limit:
                    self._delims, self._literal = delims, literal
                    return nl
                scan = limit
                break
            scan = q + 1
            if q == start or (q - len(delim) >= start and buf.startswith(delim, q - len(delim))):
                quoted, opened = True, q  # a quote at the start of a field opens a quoted field
            else:
                literal = True  # elsewhere it is an ordinary character of an unquoted field
        self._scan, self._quoted, self._opened, self._closed = scan, quoted, opened, closed
        self._delims, self._literal = delims, literal
        return result

    def _invalid(self, start: int, end: int) -> str:
        """Why the CSV record from ``start`` to ``end``, which has a quote inside an unquoted
        field or a wrong number of fields, is cut: when it spans lines, its first quote was
        most likely a stray one (``""``: it does not, it is just a bad record)."""
        if self._buf.find(b"\n", start, end) < 0:
            return ""
        if self._literal:
            return "CSV record spanning lines has a quote inside an unquoted field"
        return f"CSV record spanning lines has {self._delims + 1} fields, not {self.fields}"

    def _too_long(self, start: int) -> Piece:
        """The record at ``start`` is longer than ``max_line`` (its end may not be seen yet)."""
        buf = self._buf
        nl = buf.find(b"\n", start)
        if self.csv and 0 <= nl - start <= self.max_line:  # a quoted field still open
            reason = f"CSV quoted field not closed within max_line={self.max_line} bytes"
            return self._cut(start, reason, start + self.max_line + 1)
        line, offset = self._line + 1, self._offset
        raw = bytes(buf[start : start + min(RAW_PREFIX, self.max_line + 1)])  # all are read
        reason = f"line longer than max_line={self.max_line} bytes (skipped)"
        if nl >= 0:
            self._consume(nl + 1, 1)
            return _new(Piece, (raw, line, offset, reason, self._offset, self._line))
        self._consume(len(buf), 0)
        self._skipping = True  # up to its newline, still to come
        # until its end is seen, reading resumes before it
        return _new(Piece, (raw, line, offset, reason, offset, line - 1))

    def _cut(self, start: int, reason: str, doom: int) -> Piece:
        """Resynchronise: the CSV record at ``start`` is cut (see the class): its first line
        is the bad record, splitting goes on after it; records inside a quoted field at a line
        end before ``doom`` are cut too."""
        buf = self._buf
        nl = buf.find(b"\n", start)
        end = len(buf) if nl < 0 else nl
        stop = end - 1 if end > start and buf[end - 1] == _CR else end
        raw = bytes(buf[start:stop])
        line, offset = self._line + 1, self._offset
        self._doom, self._doom_reason = max(self._doom, doom), reason
        self._consume(min(end + 1, len(buf)), 1)
        error = f"{reason} (its first line skipped, reading goes on at the next line)"
        return _new(Piece, (raw, line, offset, error, self._offset, self._line))

    def _consume(self, to: int, lines: int) -> None:
        """The bytes up to index ``to`` are read (``lines`` newlines among them)."""
        self._offset += to - self._pos
        self._line += lines
        self._pos = to
        if to >= self._doom:
            self._doom = -1
        self._rewind()
