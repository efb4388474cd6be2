"""File sources and sinks: plain lines, JSON Lines, CSV, and tensor files.

Line sources follow a growing file like ``tail -F`` (log rotation too) and resume from a
saved position; line sinks append whole records only. With a flow's checkpoints, line
sources resume at the checkpoint's position and line sinks are cut back to their
checkpointed length (exactly once); tensor files (``.npy``,
``.safetensors``, needing the ``[files]`` extra) are written with write-then-rename. Dead
letters go to :class:`DeadLetterFile`. See docs/CONNECTORS.md.
"""

from ._append import CsvSink as CsvSink
from ._append import DeadLetterFile as DeadLetterFile
from ._append import JsonLinesSink as JsonLinesSink
from ._append import LinesSink as LinesSink
from ._lines import CsvHeaderError as CsvHeaderError
from ._lines import CsvSource as CsvSource
from ._lines import JsonLinesSource as JsonLinesSource
from ._lines import LinesSource as LinesSource
from ._position import Checkpoint as Checkpoint
from ._position import FilePosition as FilePosition
from ._tensorfiles import NpyCodec as NpyCodec
from ._tensorfiles import SafetensorsCodec as SafetensorsCodec
from ._tensorfiles import TensorFileSink as TensorFileSink
from ._tensorfiles import TensorFileSource as TensorFileSource

__all__ = [
    "Checkpoint",
    "CsvHeaderError",
    "CsvSink",
    "CsvSource",
    "DeadLetterFile",
    "FilePosition",
    "JsonLinesSink",
    "JsonLinesSource",
    "LinesSink",
    "LinesSource",
    "NpyCodec",
    "SafetensorsCodec",
    "TensorFileSink",
    "TensorFileSource",
]
