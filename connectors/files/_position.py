"""Where a file source stands, and the checkpoint file that lets it resume there."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamflow._logging import get_logger

from ._atomic import write_atomic

__all__ = ["Checkpoint", "FilePosition"]

log = get_logger("streamflow")


@dataclass(frozen=True, slots=True)
class FilePosition:
    """A place in a line-based file: ``offset`` bytes and ``line`` lines from the start of
    the file whose inode number is ``inode`` (0: any file at the path). As a source's
    committed position, every record before it has been handled."""

    offset: int = 0
    line: int = 0
    inode: int = 0

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> FilePosition:
        """The position a checkpoint holds (see :meth:`Checkpoint.of_position`)."""
        return cls(int(state["offset"]), int(state["line"]), int(state.get("inode", 0)))


class Checkpoint:
    """A small JSON file holding a source's committed position, replaced atomically (never
    half-written) at most every ``interval`` seconds and when the source closes."""

    def __init__(self, path: str | os.PathLike[str], interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self._saved: dict[str, Any] | None = None
        self._last = 0.0

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is no checkpoint yet."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ValueError(f"checkpoint {self.path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint {self.path} does not hold a JSON object")
        self._saved = data
        return data

    def save(self, state: dict[str, Any], *, force: bool = False) -> None:
        """Write ``state`` if it changed and ``interval`` passed (or ``force``)."""
        if state == self._saved:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        text = json.dumps(state, sort_keys=True).encode()
        write_atomic(self.path, lambda f: f.write(text), fsync=False)
        self._saved, self._last = state, now

    @staticmethod
    def of_position(path: Path, position: FilePosition) -> dict[str, Any]:
        return {"path": str(path), **asdict(position)}
