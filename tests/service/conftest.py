"""Helpers for the service tests: a temporary app module and the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._apps import APP


class App:
    """``svcapp.py`` in a temporary folder, where the subprocesses run and write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "svcapp.py").write_text(APP)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, SF_OUT=str(self.path), PYTHONUNBUFFERED="1")
        env.pop("CI", None)
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamflow", *args],
            cwd=self.path,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *argv: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(argv),
            cwd=self.path,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def sunk(self) -> list[int]:
        sink = self.path / "sink.txt"
        return [int(line) for line in sink.read_text().split()] if sink.exists() else []

    def wait_sunk(self, count: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.sunk()) < count:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"exited {proc.returncode} early:\n{out}\n{err}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"fewer than {count} items reached the sink")
            time.sleep(0.02)


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)
