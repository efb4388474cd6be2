"""File sources and sinks as checkpoint participants, on real files: a line source restored at
its snapshot yields exactly the records after it, a line sink restored at its snapshot is cut
back to it. The protocol methods are called directly, in the order the flow calls them:
``__aenter__``, ``restore``, items, ``snapshot``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streamflow.connectors.files import (
    Checkpoint,
    CsvSink,
    CsvSource,
    JsonLinesSink,
    JsonLinesSource,
    LinesSink,
    LinesSource,
)

import streamflow as sf
from streamflow import connectors

Seen = tuple[bytes, int, int, str | None]  # raw, line, offset, error


def _seen(message: sf.Message[connectors.Record]) -> Seen:
    record = message.value
    position = record.position
    return bytes(record.raw or b""), position["line"], position["offset"], record.error


async def _read(source: LinesSource, count: int | None = None, restore: Any = None) -> list[Seen]:
    """Enter ``source``, restore it at ``restore`` (checkpoint mode), and read ``count``
    records (``None``: all of them)."""
    out: list[Seen] = []
    async with source:
        source.restore(restore)
        while count is None or len(out) < count:
            try:
                message = await source.__anext__()
            except StopAsyncIteration:
                break
            out.append(_seen(message))
    return out


async def _read_and_snapshot(source: LinesSource, count: int) -> tuple[list[Seen], Any]:
    out: list[Seen] = []
    async with source:
        source.restore(None)
        out.extend([_seen(await source.__anext__()) for _ in range(count)])
        position = source.snapshot()
    return out, position


# -- sources ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_json_lines_source_restored_at_its_snapshot_yields_exactly_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"n": i}) + "\n" + ("\n" if i % 7 == 0 else "") for i in range(50))
    )
    first, position = await _read_and_snapshot(JsonLinesSource(path), 20)
    assert [json.loads(raw)["n"] for raw, *_ in first] == list(range(20))
    # JSON all the way: the flow's checkpoint stores it as it is
    assert json.loads(json.dumps(position)) == position
    assert position["path"] == str(path) and position["inode"] == path.stat().st_ino
    assert position["offset"] == first[-1][2] + len(first[-1][0]) + 1
    rest = await _read(JsonLinesSource(path), restore=position)
    assert [json.loads(raw)["n"] for raw, *_ in rest] == list(range(20, 50))
    assert rest[0][1] == first[-1][1] + 1  # line numbers go on


@pytest.mark.asyncio
async def test_snapshot_before_any_record_is_the_start(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    first, position = await _read_and_snapshot(CsvSource(path), 0)
    assert first == []
    rest = await _read(CsvSource(path), restore=position)
    assert [raw for raw, *_ in rest] == [b"1,2", b"3,4"]  # the header is not a record
    codec = connectors.CsvCodec(["a", "b"])
    assert [codec.decode(raw) for raw, *_ in rest] == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


@pytest.mark.asyncio
async def test_restore_none_starts_as_without_checkpoints_and_stops_saving_the_file(
    tmp_path: Path,
) -> None:
    path, saved = tmp_path / "in.txt", tmp_path / "position.json"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    # a position file from a run without checkpoints: read when there is no checkpoint yet
    saved.write_text(json.dumps(Checkpoint.of_position(path, _position_after(path, 3))))
    before = saved.read_text()
    got = await _read(LinesSource(path, checkpoint=saved, checkpoint_interval=0.0))
    assert [raw for raw, *_ in got] == [f"line {i}".encode() for i in range(3, 10)]
    assert saved.read_text() == before  # checkpoint mode: the flow's checkpoints hold it


@pytest.mark.asyncio
async def test_without_restore_the_position_file_is_written_as_before(tmp_path: Path) -> None:
    path, saved = tmp_path / "in.txt", tmp_path / "position.json"
    path.write_text("a\nb\n")
    flow = sf.Flow("no-checkpoints")
    flow.source("file", LinesSource(path, checkpoint=saved)).sink("out", sf.collect([]))
    await flow.run()
    assert json.loads(saved.read_text())["offset"] == 4


@pytest.mark.asyncio
async def test_an_overlong_line_handed_out_is_not_handed_out_again(tmp_path: Path) -> None:
    """The snapshot right after the record of an overlong line whose end was not read yet
    resumes skipping that line: its bad record is not yielded twice."""
    path = tmp_path / "in.txt"
    path.write_bytes(b"short\n" + b"x" * 300_000 + b"\nafter 1\nafter 2\n")
    first, position = await _read_and_snapshot(LinesSource(path, max_line=100), 2)
    assert first[0][0] == b"short" and first[1][3] is not None  # the bad record
    assert position["skipping"] is True and position["offset"] == 6
    rest = await _read(LinesSource(path, max_line=100), restore=position)
    assert rest == [(b"after 1", 3, 300_007, None), (b"after 2", 4, 300_015, None)]


@pytest.mark.asyncio
async def test_a_rotated_file_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("a\nb\nc\n")
    _, position = await _read_and_snapshot(LinesSource(path), 2)
    os.rename(path, tmp_path / "in.txt.1")
    path.write_text("new 1\nnew 2\n")
    rest = await _read(LinesSource(path), restore=position)
    assert [raw for raw, *_ in rest] == [b"new 1", b"new 2"]


def _position_after(path: Path, lines: int) -> connectors.files.FilePosition:
    data = path.read_bytes()
    offset = 0
    for _ in range(lines):
        offset = data.index(b"\n", offset) + 1
    return connectors.files.FilePosition(offset, lines, path.stat().st_ino)


_text = st.text(st.sampled_from('ab ,"\r\n{}[]1é'), max_size=12)


@st.composite
def _files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A kind of line source and a file for it: plain lines (some blank, some overlong, a
    last line without newline), JSON Lines, or CSV written by the csv module (quoted
    fields across lines)."""
    kind = draw(st.sampled_from(["lines", "jsonl", "csv"]))
    if kind == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["x", "y"])
        for row in draw(st.lists(st.tuples(_text, _text), max_size=25)):
            writer.writerow(row)
        return kind, out.getvalue().encode()
    if kind == "jsonl":
        values = draw(st.lists(st.one_of(st.integers(), _text, st.just("")), max_size=25))
        return kind, b"".join(json.dumps(v).encode() + b"\n" for v in values) + b"\n"
    lines = draw(st.lists(st.text(st.sampled_from("ab \r"), max_size=30), max_size=25))
    data = "\n".join(lines).encode()
    return kind, data + draw(st.sampled_from([b"", b"\n"]))


def _source(kind: str, path: Path) -> LinesSource:
    if kind == "csv":
        return CsvSource(path, max_line=64)
    if kind == "jsonl":
        return JsonLinesSource(path, max_line=64)
    return LinesSource(path, max_line=16)


@settings(max_examples=150)
@given(case=_files(), split=st.floats(0, 1))
def test_any_split_point_resumes_exactly_after_it(case: tuple[str, bytes], split: float) -> None:
    """Read a file whole; read it again up to any record, snapshot, and read on from a new
    source restored there: the two parts are the whole, record for record."""
    kind, data = case

    async def check(path: Path) -> None:
        whole = await _read(_source(kind, path))
        k = round(split * len(whole))
        first, position = await _read_and_snapshot(_source(kind, path), k)
        rest = await _read(_source(kind, path), restore=json.loads(json.dumps(position)))
        assert first + rest == whole

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in"
        path.write_bytes(data)
        asyncio.run(check(path))


# -- sinks ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_json_lines_sink_restore_cuts_off_what_came_after_the_snapshot(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path)
    async with sink:
        for i in range(5):
            await sink.send({"n": i})
        state = await sink.snapshot()
        for i in range(5, 9):
            await sink.send({"n": i})  # after the checkpoint: the crash loses their acks
    assert state == {"length": len(b"".join(b'{"n":%d}\n' % i for i in range(5)))}
    assert json.loads(json.dumps(state)) == state
    assert len(path.read_text().splitlines()) == 9

    again = JsonLinesSink(path)
    async with again:
        await again.restore(state)
        for i in range(5, 7):  # the replay
            await again.send({"n": i})
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == list(range(7))


@pytest.mark.asyncio
async def test_restore_at_the_current_length_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    sink = LinesSink(path, fsync=True)
    async with sink:
        await sink.send("a")
        state = await sink.snapshot()
        await sink.restore(state)
        await sink.send("b")
    assert path.read_bytes() == b"a\nb\n"


@pytest.mark.asyncio
async def test_csv_sink_restored_writes_its_header_once(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    sink = CsvSink(path, ["id", "name"])
    async with sink:
        first = await sink.snapshot()  # before any row: just the header
        await sink.send({"id": 1, "name": "a"})
        state = await sink.snapshot()
        await sink.send({"id": 2, "name": "b"})
    assert first == {"length": len(b"id,name\n")}

    for restore_at in (state, first):
        again = CsvSink(path, ["id", "name"])
        async with again:
            await again.restore(restore_at)
            await again.send({"id": 2, "name": "b"})
        rows = list(csv.DictReader(io.StringIO(path.read_text(), newline="")))
        expected = [{"id": "1", "name": "a"}] if restore_at is state else []
        assert rows == [*expected, {"id": "2", "name": "b"}]
        assert path.read_text().count("id,name") == 1


@pytest.mark.asyncio
async def test_a_file_shorter_than_its_snapshot_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path)
    async with sink:
        for i in range(3):
            await sink.send({"n": i})
        state = await sink.snapshot()
    path.write_text('{"n":0}\n')  # someone else cut it
    again = JsonLinesSink(path)
    async with again:
        with pytest.raises(connectors.ConnectorError, match="fewer than the 24 it had") as info:
            await again.restore(state)
    assert str(path) in str(info.value)
    assert path.read_text() == '{"n":0}\n'  # left as it was


@pytest.mark.asyncio
async def test_a_bad_sink_state_is_refused(tmp_path: Path) -> None:
    sink = LinesSink(tmp_path / "out.txt")
    async with sink:
        with pytest.raises(ValueError, match="not a file sink state"):
            await sink.restore({"size": 3})
