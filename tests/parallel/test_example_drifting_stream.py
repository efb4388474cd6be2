"""examples/drifting_stream.py runs on a short stream and saves its accuracy curve."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "drifting_stream.py"


def test_drifting_stream_example_saves_the_curve(tmp_path: Path) -> None:
    out = tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--samples", "200", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "partime" in result.stdout and "nf1b" in result.stdout
    assert out.read_bytes().startswith(b"\x89PNG")
