"""SIGINT and SIGTERM, sent for real to a real process: the first drains and exits 0, a
second (or the drain timeout) stops at once with 130 / 143; handlers are restored."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from .conftest import App

CLI = (sys.executable, "-m", "streamflow", "run", "svcapp:make", "--no-live")

LIBRARY = """
import asyncio, json, signal, sys
import streamflow as sf
import svcapp

def previous(signum, frame):
    pass

async def main():
    signal.signal(signal.SIGTERM, previous)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        await svcapp.make().run(stop_on_signals=True, drain_timeout=float(sys.argv[1]))
        code = 0
    except sf.Interrupted as exc:
        code = exc.exit_code
    after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    print(json.dumps({"code": code, "restored": before == after}))

asyncio.run(main())
"""


def report(app: App) -> dict[str, int]:
    data: dict[str, int] = json.loads((app.path / "source.json").read_text())
    return data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_drains_and_exits_0(app: App, sig: signal.Signals) -> None:
    proc = app.start(*CLI)
    app.wait_sunk(10, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    counts = report(app)  # written when the source closed, after the drain
    assert counts["aborted"] == 0
    assert counts["taken"] == counts["acked"] == len(app.sunk())  # every item taken sunk
    assert "flow.signal" in err and "action=drain" in err


def test_second_signal_stops_at_once_with_143(app: App) -> None:
    proc = app.start(*CLI, SF_STUCK="1")
    app.wait_sunk(20, proc)  # from item 20 on, "slow" never finishes
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # still draining
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "second signal" in err
    counts = report(app)
    assert counts["aborted"] >= 1 and counts["taken"] == counts["acked"] + counts["aborted"]


def test_drain_timeout_stops_at_once_with_130(app: App) -> None:
    proc = app.start(*CLI, "--drain-timeout", "0.5", SF_STUCK="1")
    app.wait_sunk(20, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert 0.5 <= time.monotonic() - t0 < 15
    assert "drain timeout" in err


def test_run_stop_on_signals_drains_and_restores_the_handlers(app: App) -> None:
    (app.path / "lib.py").write_text(LIBRARY)
    proc = app.start(sys.executable, "lib.py", "30")
    app.wait_sunk(10, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"code": 0, "restored": True}
    counts = report(app)
    assert counts["taken"] == counts["acked"] == len(app.sunk())


def test_run_stop_on_signals_raises_interrupted_on_a_second_signal(app: App) -> None:
    (app.path / "lib.py").write_text(LIBRARY)
    proc = app.start(sys.executable, "lib.py", "30", SF_STUCK="1")
    app.wait_sunk(20, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"code": 130, "restored": True}
