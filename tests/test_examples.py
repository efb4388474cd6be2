"""Every example runs end to end (each checks its own results with asserts)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["quickstart.py", "pipelined_inference.py", "model_server.py"])
def test_example_runs(name: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_demo_learns_the_drifting_stream_then_serves_it() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--samples", "1500"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rose = re.search(r"accuracy rose from ([\d.]+) \(first \d+ msgs\) to ([\d.]+)", result.stdout)
    assert rose is not None, result.stdout[-2000:]
    first, last = float(rose[1]), float(rose[2])
    assert last > first + 0.05, rose[0]
    assert "msgs/s" in result.stdout and "served" in result.stdout
    assert result.stderr == ""  # quiet by default: no library logs below warning


def test_demo_with_checkpoints_goes_on_where_it_stopped(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / "demo.py"), "--samples", "600", "--no-live"]
    command += ["--checkpoints", str(tmp_path / "ckpt")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "prequential accuracy rose" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "restored checkpoint" in again.stdout and "went on from message 600" in again.stdout
