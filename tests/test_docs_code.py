"""The complete examples in the docs run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize(
    ("doc", "says"), [("STATE.md", "'late'"), ("RECOVERY.md", "restored checkpoint")]
)
def test_the_first_python_block_of_the_doc_runs(doc: str, says: str) -> None:
    code = re.search(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)
    assert code is not None
    result = subprocess.run(
        [sys.executable, "-c", code[1]], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert says in result.stdout
