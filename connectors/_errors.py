"""Exceptions raised by connectors."""

from __future__ import annotations

__all__ = ["AuthenticationFailed", "BrokerUnavailable", "ConnectorError", "FrameError"]


class ConnectorError(Exception):
    """A connector cannot go on; the flow fails with this as the source's or sink's error."""


class BrokerUnavailable(ConnectorError):
    """A broker or peer stayed unreachable for longer than the connector's
    ``reconnect_timeout``. The message names the connector, the address and the last error."""


class AuthenticationFailed(ConnectorError):
    """A broker answered but refused the connection's credentials or TLS handshake. Raised at
    once, without retrying: the message names the connector, the address and the broker's
    reason."""


class FrameError(ValueError):
    """A byte stream broke its framing: a truncated or oversized frame or line."""
