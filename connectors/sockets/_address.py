"""Where a socket connector listens or connects: TCP host and port, or a Unix socket path."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass

__all__ = ["Address", "Listening"]


@dataclass(frozen=True, slots=True)
class Address:
    """``host``/``port`` for TCP, or ``path`` for a Unix socket (exactly one of them)."""

    host: str = "127.0.0.1"
    port: int | None = None
    path: str | None = None

    @classmethod
    def of(cls, host: str, port: int | None, path: str | os.PathLike[str] | None) -> Address:
        if (port is None) == (path is None):
            raise ValueError("give either port= (TCP) or path= (Unix socket)")
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        return cls(host, port, None if path is None else os.fspath(path))

    def label(self, kind: str = "tcp") -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"{kind}:{self.host}:{self.port}"


class Listening:
    """The bound address of a server connector (its ``_server`` once the flow started it)."""

    _address: Address
    _server: asyncio.Server | None

    @property
    def port(self) -> int:
        """The bound TCP port (after the flow started it; ``port=0`` picks a free one)."""
        address = self.address
        if isinstance(address, str):
            raise RuntimeError(f"{self!r} listens on a Unix socket, not a TCP port")
        return address[1]

    @property
    def address(self) -> tuple[str, int] | str:
        """The bound address, ``(host, port)`` or the socket path (after the flow started)."""
        if self._server is None:
            raise RuntimeError(f"{self!r} is not listening yet")
        if self._address.path is not None:
            return self._address.path
        host, port = self._server.sockets[0].getsockname()[:2]
        return (host, port)

    def _bound_label(self) -> str:
        """``tcp:host:port`` with the port actually bound, or ``unix:path``."""
        address = self.address
        return f"unix:{address}" if isinstance(address, str) else f"tcp:{address[0]}:{address[1]}"

    def _remove_socket_file(self) -> None:
        """Delete the Unix socket's file once the server is closed (TCP: nothing to do)."""
        if self._address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address.path)
