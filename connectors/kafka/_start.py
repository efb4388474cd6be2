"""Starting an aiokafka client, retrying with backoff while the broker cannot be reached."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import anyio
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from .._backoff import Backoff
from .._errors import AuthenticationFailed
from ._quiet import quiet_auto_create
from ._redact import redact_secret

__all__ = ["start_client"]

# the client options that decide whether a broker accepts a connection
_CONNECTION_OPTIONS = (
    "client_id",
    "ssl_context",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "sasl_kerberos_service_name",
    "sasl_kerberos_domain_name",
    "sasl_oauth_token_provider",
)
_REFUSALS = (
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
    ssl.SSLError,
)


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=_Client)


async def start_client(
    make: Callable[[], C], what: str, give_up_after: float | None, options: Mapping[str, Any]
) -> C:
    """A started client from ``make()`` (built with ``options``); a failed start is stopped
    and retried with backoff.

    :raises ~streamflow.connectors.AuthenticationFailed: a broker answered but refused the credentials
        or the TLS handshake (retrying cannot help; aiokafka itself only logs why).
    :raises ~streamflow.connectors.BrokerUnavailable: the broker stayed unreachable ``give_up_after`` s.

    A SASL password in ``options`` is redacted from aiokafka's log records from then on, and
    aiokafka's transient complaints about auto-created topics are lowered to DEBUG.
    """
    redact_secret(options.get("sasl_plain_password"))
    quiet_auto_create()
    backoff = Backoff(what, give_up_after=give_up_after)
    while True:
        client = make()
        try:
            await client.start()
        except KafkaError as exc:
            await client.stop()
            secured = options.get("security_protocol", "PLAINTEXT") != "PLAINTEXT"
            if secured and isinstance(exc, KafkaConnectionError):
                await _check_not_refused(what, options)
            await backoff.wait(exc)
            continue
        return client


async def _check_not_refused(what: str, options: Mapping[str, Any]) -> None:
    """Connect to each bootstrap server once, as the client would, to learn why it failed."""
    servers = options.get("bootstrap_servers", "localhost")
    hosts = servers.split(",") if isinstance(servers, str) else list(servers)
    kwargs = {k: options[k] for k in _CONNECTION_OPTIONS if k in options}
    for server in hosts:
        host, _, port = server.strip().rpartition(":")
        if not host:
            host, port = port, "9092"
        try:
            with anyio.fail_after(10):
                conn = await create_conn(
                    host.strip("[]"), int(port), request_timeout_ms=5000, **kwargs
                )
        except _REFUSALS as exc:
            if isinstance(exc, ssl.SSLError):
                why = f"the TLS handshake failed: {type(exc).__name__}: {exc}"
            else:
                why = f"the broker refused the login: {exc}"
            raise AuthenticationFailed(f"{what}: {server.strip()}: {why}") from exc
        except (OSError, KafkaError, TimeoutError, ValueError):
            continue  # not reachable, or not answering yet: the caller retries
        conn.close()
