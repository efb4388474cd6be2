"""Tensor files: .npy, .safetensors and .sft (the connectors' own tensor wire format), one
tensor (or dict of tensors) per file."""

from __future__ import annotations

import io
import math
import os
import time
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio

import streamflow as sf
from streamflow._logging import get_logger

from .._inorder import InOrder
from .._record import Record
from ..codecs import Buffer, Codec
from ..tensors import TensorCodec
from ._atomic import write_atomic
from ._position import Checkpoint

__all__ = ["NpyCodec", "SafetensorsCodec", "TensorFileSink", "TensorFileSource"]

log = get_logger("streamflow")

Framework = Literal["torch", "numpy"]
SUFFIXES = (".npy", ".safetensors", ".sft")


class NpyCodec:
    """A whole ``.npy`` file <-> one array (numpy) or tensor (torch).

    Decoding reads every file ``numpy.save`` writes (format versions 1.0, 2.0 and 3.0, C or
    Fortran order, any byte order), checks the header against the data size (a header that
    lies about the shape is a ``ValueError``) and refuses object arrays (they would need
    pickle). An array in native byte order is not copied: the result aliases the file's buffer
    (writable when it is a ``bytearray``). A big-endian array is converted to native byte
    order in a copy (the record's bytes are left as they are); a Fortran-order array keeps its layout (a torch
    tensor of two or more dimensions is then not ``is_contiguous()``)."""

    name = "npy"

    def __init__(self, framework: Framework = "torch") -> None:
        self.framework = framework

    def encode(self, value: Any, /) -> bytes:
        import numpy as np

        out = io.BytesIO()
        np.lib.format.write_array(out, _to_numpy(value), allow_pickle=False)
        return out.getvalue()

    def decode(self, raw: Buffer, /) -> Any:
        import numpy as np
        from numpy.lib import format as npformat

        f = io.BytesIO(raw)
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f)
        elif version == (3, 0):
            shape, fortran, dtype = _read_header_3_0(f)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
        if dtype.hasobject:
            raise ValueError("object arrays are not supported (they need pickle)")
        start = f.tell()
        count = math.prod(shape)
        need = count * dtype.itemsize
        if need != len(raw) - start:
            raise ValueError(
                f"npy header says {dtype}{list(shape)} = {need} bytes, the file holds "
                f"{len(raw) - start}"
            )
        array = np.frombuffer(raw, dtype=dtype, count=count, offset=start)
        array = array.reshape(shape, order="F" if fortran else "C")
        if not dtype.isnative:  # a big-endian file (on a little-endian machine): one copy,
            # never swapped in place (decoding the same record twice must give the same value)
            array = array.astype(dtype.newbyteorder("="), order="K")
        if self.framework == "numpy":
            return array
        import torch

        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array)


class SafetensorsCodec:
    """A whole ``.safetensors`` file <-> a ``dict`` of named tensors (torch or numpy).
    Malformed headers or sizes raise the library's error (never a bad read)."""

    name = "safetensors"

    def __init__(self, framework: Framework = "torch") -> None:
        self.framework = framework

    def encode(self, value: Any, /) -> bytes:
        tensors = value if isinstance(value, dict) else {"tensor": value}
        if self.framework == "numpy":
            from safetensors.numpy import save as save_numpy

            return bytes(save_numpy({k: _to_numpy(v) for k, v in tensors.items()}))
        import torch
        from safetensors.torch import save as save_torch

        return bytes(save_torch({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}))

    def decode(self, raw: Buffer, /) -> dict[str, Any]:
        data = bytes(raw)
        if self.framework == "numpy":
            from safetensors.numpy import load as load_numpy

            return dict(load_numpy(data))
        from safetensors.torch import load as load_torch

        return dict(load_torch(data))


def _read_header_3_0(f: io.BytesIO) -> tuple[tuple[int, ...], bool, Any]:
    """The header of a version 3.0 ``.npy`` (numpy has no public reader for it): version 2.0
    with UTF-8 text, which only field names of a structured dtype use. Their non-ASCII
    characters become ``\\u`` escapes, valid in the header's Python literal, and numpy's 2.0
    reader reads the result."""
    from numpy.lib import format as npformat

    size = f.read(4)
    if len(size) != 4:
        raise ValueError("npy file too short: no header length")
    text = f.read(int.from_bytes(size, "little"))
    ascii_text = text.decode("utf-8").encode("ascii", "backslashreplace")
    header = io.BytesIO(len(ascii_text).to_bytes(4, "little") + ascii_text)
    result: tuple[tuple[int, ...], bool, Any] = npformat.read_array_header_2_0(header)
    return result


def _to_numpy(value: Any) -> Any:
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return value


class TensorFileSource:
    """Yield the ``.npy``, ``.safetensors`` and ``.sft`` files of ``directory`` in name order,
    one :class:`~streamflow.connectors.Record` per file (the file's bytes, read into a writable buffer;
    ``position``: ``file`` name and ``index``). :func:`streamflow.connectors.decode` turns a ``.npy`` or
    ``.sft`` into a tensor (an array with ``framework="numpy"``; ``.sft`` files decode without
    a copy, and with ``with_meta=True`` as :class:`~streamflow.connectors.tensors.Tagged` with their
    metadata) and a ``.safetensors`` into a dict of tensors. ``directory`` may also be a
    single file.

    ``follow=True``: keep watching the directory (every ``poll_interval`` s) and yield new
    files as they appear, like ``tail -f`` for a directory. Only names that sort after the
    last file read are picked up, so writers should use increasing names (as
    :class:`TensorFileSink` does); hidden files (``.name``) are ignored, which is how a
    writer's temporary files stay invisible.

    Resume: :attr:`position` is the last file name before which every file was handled;
    pass it as ``start_after=``, or use ``checkpoint=`` (saved atomically, read on start).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        framework: Framework = "torch",
        with_meta: bool = False,
        follow: bool = False,
        poll_interval: float = 0.5,
        start_after: str | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_interval: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.codecs: dict[str, Codec[Any]] = {
            ".npy": NpyCodec(framework),
            ".safetensors": SafetensorsCodec(framework),
            ".sft": TensorCodec(framework=framework, with_meta=with_meta),
        }
        self.follow = follow
        self.poll_interval = poll_interval
        self.name = f"file:{self.directory}"
        self._start_after = start_after
        self._checkpoint = (
            None if checkpoint is None else Checkpoint(checkpoint, checkpoint_interval)
        )
        self._last: str | None = None  # last name yielded
        self._queue: list[Path] = []
        self._index = 0
        self._done: InOrder[str, str] = InOrder()
        self._committed: str | None = None
        self._entered = False

    def __repr__(self) -> str:
        return f"TensorFileSource({str(self.directory)!r}, follow={self.follow})"

    @property
    def position(self) -> str | None:
        """Every file up to this name (inclusive) has been handled; ``None``: none yet."""
        return self._committed

    async def __aenter__(self) -> TensorFileSource:
        self._entered = True
        after = self._start_after
        if after is None and self._checkpoint is not None:
            state = self._checkpoint.load()
            if state is not None:
                after = state.get("after")
                log.info("connector.resume", source=self.name, after=after)
        self._last = self._committed = after
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._save(force=True)

    def _save(self, *, force: bool = False) -> None:
        if self._checkpoint is not None:
            state = {"path": str(self.directory), "after": self._committed}
            self._checkpoint.save(state, force=force)

    def _list(self) -> list[Path]:
        if self.directory.is_file():
            return [self.directory]
        names = sorted(
            p.name
            for p in self.directory.iterdir()
            if p.suffix in SUFFIXES and not p.name.startswith(".")
        )
        return [self.directory / n for n in names if self._last is None or n > self._last]

    def __aiter__(self) -> TensorFileSource:
        return self

    async def __anext__(self) -> sf.Message[Record]:
        if not self._entered:
            raise RuntimeError(f"{self!r} was not started: the flow enters it as a context")
        self._save()
        while not self._queue:
            try:
                self._queue = await anyio.to_thread.run_sync(self._list)
            except FileNotFoundError:
                if not self.follow:
                    raise
                self._queue = []
            if self._queue:
                break
            if not self.follow or self.directory.is_file():
                raise StopAsyncIteration
            await anyio.sleep(self.poll_interval)
        path = self._queue.pop(0)
        raw = await anyio.to_thread.run_sync(_read, path)
        self._last = path.name
        self._index += 1
        position = {"file": path.name, "index": self._index}
        record = Record(raw, self.name, position, codec=self.codecs[path.suffix])
        self._done.track(path.name, path.name)
        meta = {"source": self.name, **position}
        return sf.Message(record, meta=meta, on_ack=partial(self._ack, path.name))

    def _ack(self, name: str, outcome: sf.Outcome) -> None:
        if outcome & sf.Outcome.ABORTED:
            return  # the flow stopped before handling it: the position stays before it
        released = self._done.done(name)
        if released:
            self._committed = released[-1]


def _read(path: Path) -> bytearray:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        n = f.readinto(buf)
        del buf[n:]
        return buf


class TensorFileSink:
    """Write each item to its own file in ``directory``: a tensor or array as ``.npy``, a dict
    of tensors (or one tensor, named ``"tensor"``) as ``.safetensors``, or a tensor (or a
    :class:`~streamflow.connectors.tensors.Tagged` tensor with metadata) in the connectors' tensor wire
    format as ``.sft``.

    Guarantee: each file is written to a hidden temporary name, flushed to disk and renamed
    (then the directory is synced), and ``send`` returns after the rename. So a file is
    either absent or complete, and an acked item is on disk. Names are
    ``{prefix}-{nanoseconds}-{n}.{suffix}``, increasing, which is what
    :class:`TensorFileSource` in follow mode needs.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        format: Literal["npy", "safetensors", "sft"] = "npy",
        prefix: str = "part",
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.format = format
        codecs: dict[str, Codec[Any]] = {
            "npy": NpyCodec(),
            "safetensors": SafetensorsCodec(),
            "sft": TensorCodec(),
        }
        if format not in codecs:
            raise ValueError(f"format must be one of {sorted(codecs)}, got {format!r}")
        self.codec = codecs[format]
        self.prefix = prefix
        self.fsync = fsync
        self.written: list[Path] = []
        self._n = 0

    def __repr__(self) -> str:
        return f"TensorFileSink({str(self.directory)!r}, format={self.format!r})"

    async def send(self, item: Any) -> None:
        """Write ``item`` as one complete file (see the class for the guarantee)."""
        data: Buffer | list[Buffer]
        if isinstance(item, Record):
            if item.raw is None:
                raise ValueError(f"the record from {item.where()} is a tombstone: no file to write")
            data = item.raw
        elif isinstance(self.codec, TensorCodec):
            data = self.codec.encode_parts(item)  # written from the tensor's memory
        else:
            data = self.codec.encode(item)
        self._n += 1
        path = self.directory / f"{self.prefix}-{time.time_ns():020d}-{self._n:06d}.{self.format}"
        await anyio.to_thread.run_sync(self._write, path, data)
        self.written.append(path)

    def _write(self, path: Path, data: Buffer | list[Buffer]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        parts = data if isinstance(data, list) else [data]
        write_atomic(path, lambda f: f.writelines(parts), fsync=self.fsync)
