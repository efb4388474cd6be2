"""A flood of malformed records is logged in full for the first few, then counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamflow.connectors._badrecords import FULL, BadRecordLog
from streamflow.connectors.files import JsonLinesSource
from structlog.testing import capture_logs

import streamflow as sf
from streamflow import connectors


@pytest.mark.asyncio
async def test_the_first_bad_records_are_logged_in_full_then_limited(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b"{broken\n" if i % 2 else b'{"i": %d}\n' % i for i in range(100)))
    out: list[Any] = []
    flow = sf.Flow("flood")
    flow.source("file", JsonLinesSource(path)).map("decode", connectors.decode, errors="skip").sink(
        "out", sf.collect(out)
    )
    with capture_logs() as logs:
        await flow.run()
    assert len(out) == 50
    assert flow.metrics()["decode"].skipped == 50  # the policy still sees every one
    full = [e for e in logs if e["event"] == "connector.bad_record"]
    assert [e["line"] for e in full] == [2 * i + 2 for i in range(FULL)]
    (limited,) = [e for e in logs if e["event"] == "connector.bad_records_limited"]
    assert limited["source"] == f"file:{path}" and limited["logged"] == FULL


def test_after_the_first_few_a_count_is_logged_at_most_once_per_interval() -> None:
    now = [0.0]
    limiter = BadRecordLog(full=2, every_s=10.0, quiet_s=60.0, clock=lambda: now[0])
    with capture_logs() as logs:
        for t in range(0, 25):  # one bad record a second for 25 s
            now[0] = float(t)
            limiter("kafka:t", {"partition": 0, "offset": t}, reason=f"bad {t}")
        now[0] = 100.0  # quiet for over a minute: in full again
        limiter("kafka:t", {"partition": 0, "offset": 99}, reason="bad 99")
        limiter("kafka:u", {"partition": 0, "offset": 0}, reason="other source")
    summary = [(e["event"], e.get("offset"), e.get("count"), e.get("total")) for e in logs]
    assert summary == [
        ("connector.bad_record", 0, None, None),
        ("connector.bad_record", 1, None, None),
        ("connector.bad_records_limited", None, None, None),
        ("connector.bad_records", None, 10, 12),  # t = 11: 10 s after the last line
        ("connector.bad_records", None, 10, 22),  # t = 21
        ("connector.bad_record", 99, None, None),
        ("connector.bad_record", 0, None, None),
    ]
    counted = [e for e in logs if e["event"] == "connector.bad_records"]
    assert counted[-1]["last"] == {"partition": 0, "offset": 21}
    assert counted[-1]["reason"] == "bad 21"
