"""Where checkpoints live: a directory, one sub-directory per checkpoint.

A checkpoint is written under a temporary name, each file fsynced, its manifest (with a
SHA-256 of every file) written last, and only then renamed to ``ckpt-<id>``: a crash
during a write leaves a temporary directory that is never read. Reading takes the newest
checkpoint whose manifest and checksums hold; a torn or corrupt one is skipped with a
warning. The newest ``keep`` checkpoints are kept. No pickle: tensors are stored as
safetensors, the rest as JSON (see ``_snapshot_codec``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._logging import get_logger
from ._snapshot_codec import decode_state, encode_state

__all__ = ["CheckpointCorrupt", "DirectoryStore", "StoredCheckpoint"]

log = get_logger("streamflow")
_FORMAT = 1
_PREFIX = "ckpt-"


class CheckpointCorrupt(Exception):
    """A checkpoint whose files do not match its manifest (a torn or damaged write)."""


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A checkpoint read back: its number, directory, the graph it was taken of, the
    sources' positions and each stage's state, by stage name."""

    id: int
    path: Path
    graph: dict[str, Any]
    positions: dict[str, Any]
    states: dict[str, Any]


class DirectoryStore:
    """Checkpoints in the directory ``path`` (created when missing), the newest ``keep``
    kept: the store ``sf.Checkpoints(path)`` makes.

    A store is what has ``path``, ``keep``, ``write_encoded(number, graph, positions,
    encoded)`` (durable when it returns) and ``candidates(limit)`` (the checkpoints that
    read back whole, newest first): another store (an object store, a database) can take
    this one's place in ``sf.Checkpoints(store)``. Every method blocks on I/O: the flow
    calls them on a worker thread, never on the event loop."""

    def __init__(self, path: str | os.PathLike[str], keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.path = Path(path)
        self.keep = keep

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.path)!r}, keep={self.keep})"

    def write(
        self,
        checkpoint: int,
        graph: dict[str, Any],
        positions: dict[str, Any],
        states: dict[str, Any],
    ) -> tuple[Path, int]:
        """Store checkpoint number ``checkpoint``; its directory and size in bytes.

        :raises StateTypeError: a state holds a value a checkpoint cannot store (the
            message names the stage); nothing is written then.
        """
        encoded = {name: encode_state(state, f"stage {name!r}") for name, state in states.items()}
        return self.write_encoded(checkpoint, graph, positions, encoded)

    def write_encoded(
        self,
        checkpoint: int,
        graph: dict[str, Any],
        positions: dict[str, Any],
        encoded: dict[str, tuple[str, dict[str, Any]]],
    ) -> tuple[Path, int]:
        """:meth:`write`, with each stage's state already encoded (``encode_state``)."""
        position_text, position_tensors = encode_state(positions, "the sources' positions")
        if position_tensors:
            raise TypeError("a source position holds a tensor")
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"{_PREFIX}{checkpoint:08d}"
        tmp = self.path / f".{_PREFIX}{checkpoint:08d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: dict[str, str] = {}  # file name -> sha256
        stages: dict[str, dict[str, str | None]] = {}
        size = 0
        for i, (name, (text, tensors)) in enumerate(encoded.items()):
            json_name = f"state-{i}.json"
            size += _write(tmp / json_name, text.encode(), files)
            tensor_name = None
            if tensors:
                from safetensors.torch import save

                tensor_name = f"state-{i}.safetensors"
                size += _write(tmp / tensor_name, save(tensors), files)
            stages[name] = {"json": json_name, "tensors": tensor_name}
        manifest = {
            "format": _FORMAT,
            "id": checkpoint,
            "graph": graph,
            "positions": position_text,
            "stages": stages,
            "files": files,
        }
        size += _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode(), None)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.path)
        self._prune()
        return final, size

    def _prune(self) -> None:
        for old in self._complete()[self.keep :]:
            shutil.rmtree(old[1], ignore_errors=True)

    def _complete(self) -> list[tuple[int, Path]]:
        """Checkpoint directories, newest first."""
        if not self.path.is_dir():
            return []
        found = []
        for entry in self.path.iterdir():
            if entry.is_dir() and entry.name.startswith(_PREFIX):
                try:
                    found.append((int(entry.name[len(_PREFIX) :]), entry))
                except ValueError:
                    continue
        return sorted(found, reverse=True)

    def latest(self) -> StoredCheckpoint | None:
        """The newest checkpoint that reads back whole, or ``None``; each newer one that
        does not (torn, corrupt) is skipped with a ``checkpoint.skipped`` warning."""
        for found in self.candidates(1):
            return found
        return None

    def candidates(self, limit: int | None = None) -> list[StoredCheckpoint]:
        """Up to ``limit`` checkpoints that read back whole, newest first (torn or corrupt
        ones skipped with a ``checkpoint.skipped`` warning)."""
        found: list[StoredCheckpoint] = []
        for number, path in self._complete():
            if limit is not None and len(found) >= limit:
                break
            try:
                found.append(_read(number, path))
            except (OSError, ValueError, KeyError, CheckpointCorrupt) as exc:
                log.warning("checkpoint.skipped", path=str(path), error=repr(exc))
        return found


def _write(path: Path, data: bytes, files: dict[str, str] | None) -> int:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if files is not None:
        files[path.name] = hashlib.sha256(data).hexdigest()
    return len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(number: int, path: Path) -> StoredCheckpoint:
    manifest = json.loads((path / "manifest.json").read_bytes())
    if manifest.get("format") != _FORMAT or manifest.get("id") != number:
        raise CheckpointCorrupt(f"{path}: not a checkpoint of format {_FORMAT} numbered {number}")
    data: dict[str, bytes] = {}
    for name, digest in manifest["files"].items():
        blob = (path / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != digest:
            raise CheckpointCorrupt(f"{path / name}: its checksum does not match the manifest")
        data[name] = blob
    states = {}
    for stage, entry in manifest["stages"].items():
        tensors: dict[str, Any] = {}
        if entry["tensors"] is not None:
            from safetensors.torch import load

            tensors = load(data[entry["tensors"]])
        states[stage] = decode_state(data[entry["json"]].decode(), tensors)
    return StoredCheckpoint(
        number, path, manifest["graph"], decode_state(manifest["positions"], {}), states
    )
