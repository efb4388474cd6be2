"""TLS and SASL settings for the Kafka clients, passed through to aiokafka."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Security"]

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "GSSAPI", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


@dataclass(frozen=True)
class Security:
    """How to reach a secured cluster: ``protocol`` and, for TLS, ``ssl_context`` (default:
    the system's trust store), for SASL ``mechanism`` with ``username``/``password`` (PLAIN,
    SCRAM) or ``oauth_token_provider`` (OAUTHBEARER). Passed to aiokafka unchanged; anything
    not covered here can go in a connector's ``**client_options``.
    """

    protocol: Protocol = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    mechanism: Mechanism | None = None
    username: str | None = None
    password: str | None = None
    oauth_token_provider: Any = None
    kerberos_service_name: str = "kafka"

    def __post_init__(self) -> None:
        if self.protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError(f"unknown security protocol {self.protocol!r}")
        if self.protocol.startswith("SASL"):
            if self.mechanism is None:
                raise ValueError(f"protocol {self.protocol} needs a SASL mechanism")
            if self.mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
                self.username is None or self.password is None
            ):
                raise ValueError(f"SASL {self.mechanism} needs username and password")
            if self.mechanism == "OAUTHBEARER" and self.oauth_token_provider is None:
                raise ValueError("SASL OAUTHBEARER needs oauth_token_provider")
        elif self.mechanism is not None:
            raise ValueError(f"a SASL mechanism needs protocol SASL_*, not {self.protocol}")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaConsumer`` / ``AIOKafkaProducer``."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context or ssl.create_default_context()
        if self.mechanism is not None:
            kwargs["sasl_mechanism"] = self.mechanism
            if self.username is not None:
                kwargs["sasl_plain_username"] = self.username
                kwargs["sasl_plain_password"] = self.password
            if self.oauth_token_provider is not None:
                kwargs["sasl_oauth_token_provider"] = self.oauth_token_provider
            if self.mechanism == "GSSAPI":
                kwargs["sasl_kerberos_service_name"] = self.kerberos_service_name
        return kwargs

    def __repr__(self) -> str:  # never print the password
        user = f", username={self.username!r}" if self.username else ""
        return f"Security(protocol={self.protocol!r}, mechanism={self.mechanism!r}{user})"
