"""TCP and Unix-socket sources and sinks with length-prefixed frames (standard library only).

Frame: a 4-byte big-endian length, then the payload. Sources yield
:class:`~streamflow.connectors.Record` values (decode them with :func:`streamflow.connectors.decode`), or with
``batched=True`` lists of them (:func:`streamflow.connectors.decode_batch`); with
:data:`streamflow.connectors.tensors.TENSOR` large tensors travel without copies on either side.
Servers bind to ``127.0.0.1`` unless told otherwise.
"""

from ._address import Address as Address
from ._sink import ClientSink as ClientSink
from ._sink import ServerSink as ServerSink
from ._source import ClientSource as ClientSource
from ._source import ServerSource as ServerSource

__all__ = ["Address", "ClientSink", "ClientSource", "ServerSink", "ServerSource"]
