"""File sources and sinks on real files: follow, resume, append guarantees, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from streamflow.connectors.files import (
    CsvSink,
    CsvSource,
    DeadLetterFile,
    FilePosition,
    JsonLinesSink,
    JsonLinesSource,
    LinesSink,
    LinesSource,
    TensorFileSink,
    TensorFileSource,
)
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors

from ._wait import until

pytestmark = pytest.mark.asyncio


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def test_json_lines_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    rows = [{"id": i, "text": f"line\\n{i}", "ok": i % 2 == 0} for i in range(100)]
    writer = sf.Flow("write")
    writer.source("rows", rows).sink("file", JsonLinesSink(path))
    await writer.run()
    assert path.read_bytes().count(b"\n") == 100
    out: list[Any] = []
    reader = sf.Flow("read")
    source = JsonLinesSource(path)
    reader.source("file", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    await reader.run()
    assert out == rows
    assert source.position == FilePosition(path.stat().st_size, 100, path.stat().st_ino)


async def test_broken_json_line_is_skipped_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2\n\n{"a": 3}\r\n')
    out: list[Any] = []
    flow = sf.Flow("f")
    flow.source("file", JsonLinesSource(path)).map("decode", connectors.decode, errors="skip").sink(
        "out", sf.collect(out)
    )
    with capture_logs() as logs:
        await flow.run()
    assert out == [{"a": 1}, {"a": 3}]
    bad = next(e for e in logs if e["event"] == "connector.bad_record")
    assert (bad["source"], bad["line"], bad["offset"]) == (f"file:{path}", 2, 9)
    assert "JSONDecodeError" in bad["reason"]
    error = next(e for e in logs if e["event"] == "stage.error")
    assert error["meta"] == {"source": f"file:{path}", "line": 2, "offset": 9}
    assert flow.metrics()["decode"].skipped == 1


async def test_csv_missing_field_goes_to_a_dead_letter_file(tmp_path: Path) -> None:
    path, dead = tmp_path / "in.csv", tmp_path / "dead.jsonl"
    path.write_text('id,name,value\n1,a,10\n2,b\n3,"multi\nline",30\n4,d,40\n')
    out: list[Any] = []
    flow = sf.Flow("csv")
    flow.source("file", CsvSource(path)).map(
        "decode", connectors.decode, errors=sf.DeadLetter(DeadLetterFile(dead))
    ).sink("out", sf.collect(out))
    await flow.run()
    assert [row["id"] for row in out] == ["1", "3", "4"]
    assert out[1]["name"] == "multi\nline"
    (entry,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert entry["raw_text"] == "2,b" and base64.b64decode(entry["raw_b64"]) == b"2,b"
    assert "CSV row has 2 fields, expected 3 (id, name, value)" in entry["reason"]
    assert entry["position"] == {"line": 3, "offset": 21}
    assert (entry["source"], entry["stage"], entry["flow"]) == (f"file:{path}", "decode", "csv")


async def test_csv_sink_writes_a_header_once(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    for part in ([{"a": 1, "b": "x"}], [(2, "y,z")]):
        flow = sf.Flow("w")
        flow.source("rows", part).sink("csv", CsvSink(path, ["a", "b"]))
        await flow.run()
    assert path.read_text() == 'a,b\n1,x\n2,"y,z"\n'


async def test_follow_mode_reads_appended_lines_and_never_half_a_line(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    out: list[str] = []
    flow = sf.Flow("tail")
    source = LinesSource(path, follow=True, poll_interval=0.02)
    flow.source("file", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await asyncio.sleep(0.1)  # the file does not exist yet: the source waits for it
        _append(path, b"one\ntwo\n")
        await until(lambda: out == ["one", "two"])
        _append(path, b"thr")  # a writer in the middle of a line
        await asyncio.sleep(0.15)
        assert out == ["one", "two"]
        _append(path, b"ee\n")
        await until(lambda: out == ["one", "two", "three"])
        await running.stop()
    assert source.position == FilePosition(14, 3, path.stat().st_ino)


async def test_follow_mode_follows_a_rotated_file(tmp_path: Path) -> None:
    """logrotate's default: rename the file, create a new one; the writer finishes its line
    in the old file first. Every line of both files arrives once, in order."""
    path = tmp_path / "app.log"
    out: list[str] = []
    source = LinesSource(path, follow=True, poll_interval=0.02)
    flow = sf.Flow("tail")
    flow.source("file", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    with capture_logs() as logs:
        async with flow.start() as running:
            _append(path, b"a1\na2\n")
            await until(lambda: out == ["a1", "a2"])
            old_inode = path.stat().st_ino
            path.rename(tmp_path / "app.log.1")
            _append(tmp_path / "app.log.1", b"a3\na4")  # still writing to the old file
            await asyncio.sleep(0.1)
            _append(path, b"b1\n")  # the new file appears
            await until(lambda: out == ["a1", "a2", "a3", "a4", "b1"])
            _append(path, b"b2\n")
            await until(lambda: out[-1:] == ["b2"])
            await running.stop()
    assert out == ["a1", "a2", "a3", "a4", "b1", "b2"]
    new_inode = path.stat().st_ino
    assert new_inode != old_inode
    assert source.position == FilePosition(6, 2, new_inode)
    assert any(e["event"] == "connector.file_rotated" for e in logs)


async def test_csv_rotation_reads_the_new_files_header(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("sensor,value\ns1,1\n")
    out: list[dict[str, str]] = []
    source = CsvSource(path, follow=True, poll_interval=0.02)
    flow = sf.Flow("tail")
    flow.source("file", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await until(lambda: len(out) == 1)
        path.rename(tmp_path / "readings.csv.1")
        path.write_text("sensor,value,unit\ns2,2,C\n")  # a new file, a new header
        await until(lambda: len(out) == 2)
        await running.stop()
    assert out == [{"sensor": "s1", "value": "1"}, {"sensor": "s2", "value": "2", "unit": "C"}]


async def test_csv_truncated_in_place_is_read_again_after_its_header(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text("sensor,value\ns1,1\ns2,2\n")
    out: list[dict[str, str]] = []
    flow = sf.Flow("tail")
    flow.source("file", CsvSource(path, follow=True, poll_interval=0.02)).map(
        "decode", connectors.decode
    ).sink("out", sf.collect(out))
    async with flow.start() as running:
        await until(lambda: len(out) == 2)
        os.truncate(path, 0)  # logrotate's copytruncate, then the writer goes on
        await asyncio.sleep(0.1)
        _append(path, b"sensor,value\ns3,3\n")
        await until(lambda: len(out) == 3)
        await asyncio.sleep(0.1)
        await running.stop()
    assert out[2:] == [{"sensor": "s3", "value": "3"}]


async def test_resume_after_the_file_was_rotated_while_stopped(tmp_path: Path) -> None:
    path, checkpoint = tmp_path / "app.log", tmp_path / "app.pos"
    path.write_text("".join(f"old {i}\n" for i in range(10)))
    first: list[str] = []
    flow = sf.Flow("first")
    flow.source("file", LinesSource(path, checkpoint=checkpoint)).map(
        "decode", connectors.decode
    ).sink("out", sf.collect(first))
    await flow.run()
    assert len(first) == 10
    path.rename(tmp_path / "app.log.1")
    path.write_text("".join(f"new {i}\n" for i in range(20)))  # longer than the old one
    second: list[str] = []
    flow = sf.Flow("second")
    flow.source("file", LinesSource(path, checkpoint=checkpoint)).map(
        "decode", connectors.decode
    ).sink("out", sf.collect(second))
    with capture_logs() as logs:
        await flow.run()
    assert second == [f"new {i}" for i in range(20)]  # not from the old file's offset
    assert any(e["event"] == "connector.file_rotated" for e in logs)
    assert json.loads(checkpoint.read_text())["inode"] == path.stat().st_ino


async def test_resume_from_a_checkpoint_after_a_stop(tmp_path: Path) -> None:
    path, checkpoint = tmp_path / "data.jsonl", tmp_path / "data.pos"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(100)))
    seen: list[int] = []

    async def take(value: Any) -> int:
        if value["n"] == 40:
            await asyncio.sleep(3600)  # never finishes: the first run stops here
        return int(value["n"])

    flow = sf.Flow("first")
    flow.source("file", JsonLinesSource(path, checkpoint=checkpoint)).map(
        "decode", connectors.decode
    ).map("take", take).sink("out", sf.collect(seen))
    task = asyncio.create_task(flow.run())
    await until(lambda: len(seen) == 40)
    task.cancel()  # killed with item 40 in flight
    with pytest.raises(asyncio.CancelledError):
        await task
    saved = json.loads(checkpoint.read_text())
    assert (saved["line"], saved["path"]) == (40, str(path))

    rest: list[int] = []
    flow = sf.Flow("second")
    flow.source("file", JsonLinesSource(path, checkpoint=checkpoint)).map(
        "decode", connectors.decode
    ).sink("out", sf.collect(rest))
    await flow.run()
    assert [v["n"] for v in rest] == list(range(40, 100))  # nothing lost, nothing repeated
    assert json.loads(checkpoint.read_text())["line"] == 100


async def test_sink_repairs_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')  # a crash in the middle of a write
    flow = sf.Flow("w")
    with capture_logs() as logs:
        flow.source("rows", [{"a": 3}]).sink("file", JsonLinesSink(path, fsync=True))
        await flow.run()
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n{"a":3}\n'
    repaired = next(e for e in logs if e["event"] == "connector.repaired_tail")
    assert repaired["removed_bytes"] == 5


async def test_overlong_line_is_a_bad_record_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"short\n" + b"x" * 200_000 + b"\nafter\n")
    out: list[str] = []
    flow = sf.Flow("long")
    flow.source("file", LinesSource(path, max_line=1000)).map(
        "decode", connectors.decode, errors="skip"
    ).sink("out", sf.collect(out))
    with capture_logs() as logs:
        await flow.run()
    assert out == ["short", "after"]
    bad = next(e for e in logs if e["event"] == "connector.bad_record")
    assert bad["line"] == 2 and "max_line=1000" in bad["reason"]


async def test_lines_sink_refuses_a_newline_inside_a_record(tmp_path: Path) -> None:
    flow = sf.Flow("w")
    flow.source("rows", ["a\nb"]).sink("file", LinesSink(tmp_path / "x.txt"))
    with pytest.raises(sf.StageError, match="cannot contain a newline"):
        await flow.run()


async def test_tensor_files_written_whole_and_followed(tmp_path: Path) -> None:
    directory = tmp_path / "tensors"
    arrays = [torch.full((2, 3), float(i)) for i in range(3)]
    writer = sf.Flow("w")
    sink = TensorFileSink(directory)
    writer.source("t", arrays).sink("npy", sink)
    await writer.run()
    named = TensorFileSink(directory, format="safetensors", prefix="weights")
    await named.send({"w": torch.eye(2), "b": torch.zeros(2)})
    wire = TensorFileSink(directory, format="sft", prefix="wire")
    await wire.send(torch.arange(6.0).reshape(2, 3))
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files

    out: list[Any] = []
    source = TensorFileSource(directory, follow=True, poll_interval=0.02)
    flow = sf.Flow("r")
    flow.source("dir", source).map("decode", connectors.decode).sink("out", sf.collect(out))
    async with flow.start() as running:
        await until(lambda: len(out) == 5)
        late = TensorFileSink(directory, prefix="z")  # sorts after what was read
        await late.send(np.arange(4, dtype=np.int16))
        await until(lambda: len(out) == 6)
        await running.stop()
    assert [float(t[0, 0]) for t in out[:3]] == [0.0, 1.0, 2.0]
    assert isinstance(out[3], dict) and torch.equal(out[3]["w"], torch.eye(2))
    assert torch.equal(out[4], torch.arange(6.0).reshape(2, 3))  # .sft: the wire format
    assert out[5].dtype == torch.int16 and out[5].tolist() == [0, 1, 2, 3]
    assert source.position == late.written[0].name


async def test_tensor_file_that_lies_about_its_size_is_a_bad_record(tmp_path: Path) -> None:
    good, bad = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(good, np.ones(5, dtype=np.float32))
    data = bytearray(good.read_bytes())
    bad.write_bytes(data.replace(b"(5,)", b"(9,)"))  # the header claims 9 elements
    junk = tmp_path / "c.safetensors"
    junk.write_bytes(b"\xff" * 8 + b"{}")
    out: list[Any] = []
    flow = sf.Flow("bad")
    flow.source("dir", TensorFileSource(tmp_path, framework="numpy")).map(
        "decode", connectors.decode, errors="skip"
    ).sink("out", sf.collect(out))
    with capture_logs() as logs:
        await flow.run()
    assert len(out) == 1 and out[0].tolist() == [1.0] * 5
    reasons = {e["file"]: e["reason"] for e in logs if e["event"] == "connector.bad_record"}
    assert "npy header says float32[9] = 36 bytes, the file holds 20" in reasons["b.npy"]
    assert "c.safetensors" in reasons


async def test_appends_are_single_writes_of_whole_lines(tmp_path: Path) -> None:
    """Two processes' worth of writers on one file never interleave inside a line."""
    path = tmp_path / "shared.jsonl"
    sinks = [LinesSink(path), LinesSink(path)]
    async with sinks[0], sinks[1]:
        await asyncio.gather(*(sinks[i % 2].send(f"{i}:" + "x" * 5000) for i in range(200)))
    lines = path.read_text().splitlines()
    assert len(lines) == 200 and all(line.endswith("x" * 5000) for line in lines)
    assert len(path.read_bytes()) == sum(len(line) + 1 for line in lines)
