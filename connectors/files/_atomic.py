"""Files that appear whole or not at all: write a temporary file, fsync, rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomic"]


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = True) -> None:
    """Create ``path`` by calling ``write(file)`` on a hidden temporary file in the same
    directory, then renaming it over ``path``. A crash at any point leaves either the old
    ``path`` (or none) or the complete new one, never a partial file (with ``fsync``, also
    across a power loss). Blocking: call it from a thread."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
