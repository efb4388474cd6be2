"""Connectors: sources and sinks for Kafka, MQTT, sockets and files.

Each system is its own module with its library as an optional extra: ``streamflow.connectors.kafka``
(``[kafka]``), ``streamflow.connectors.mqtt`` (``[mqtt]``), ``streamflow.connectors.sockets`` (standard library),
``streamflow.connectors.files`` (``[files]`` for tensor files). This package only holds what they share:

- :class:`Record`: what every source yields (raw bytes and where they came from);
- :func:`decode`: the ``map`` stage that turns records into values, so malformed input meets
  that stage's error policy (``errors="skip"`` or ``sf.DeadLetter(sink)``), and
  :func:`decode_batch` for lists of records;
- codecs (:mod:`streamflow.connectors.codecs`, :mod:`streamflow.connectors.tensors`) and the errors.

See docs/CONNECTORS.md for each connector's delivery guarantee.
"""

from ._deadletter import DeadLetterEntry as DeadLetterEntry
from ._deadletter import dead_letter_entry as dead_letter_entry
from ._errors import AuthenticationFailed as AuthenticationFailed
from ._errors import BrokerUnavailable as BrokerUnavailable
from ._errors import ConnectorError as ConnectorError
from ._errors import FrameError as FrameError
from ._record import DecodeError as DecodeError
from ._record import Record as Record
from ._record import decode as decode
from ._record import decode_batch as decode_batch
from .codecs import BYTES as BYTES
from .codecs import JSON as JSON
from .codecs import TEXT as TEXT
from .codecs import BytesCodec as BytesCodec
from .codecs import Codec as Codec
from .codecs import CsvCodec as CsvCodec
from .codecs import JsonCodec as JsonCodec
from .codecs import TextCodec as TextCodec

__all__ = [
    "BYTES",
    "JSON",
    "TEXT",
    "AuthenticationFailed",
    "BrokerUnavailable",
    "BytesCodec",
    "Codec",
    "ConnectorError",
    "CsvCodec",
    "DeadLetterEntry",
    "DecodeError",
    "FrameError",
    "JsonCodec",
    "Record",
    "TextCodec",
    "dead_letter_entry",
    "decode",
    "decode_batch",
]
