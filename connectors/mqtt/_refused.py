"""Telling a refused login, or a certificate that is not trusted, apart from a broker that
cannot be reached."""

from __future__ import annotations

import ssl

import aiomqtt

from .._errors import AuthenticationFailed

__all__ = ["raise_if_refused"]

# CONNACK / SUBACK codes: MQTT 3.1.1 "bad user name or password" and "not authorized", and
# their MQTT 5 reason codes (paho reports the 3.1.1 ones as the MQTT 5 ones)
_REFUSED = frozenset({4, 5, 0x86, 0x87})


def raise_if_refused(error: aiomqtt.MqttError, what: str) -> None:
    """Raise :class:`~streamflow.connectors.AuthenticationFailed` when the broker refused the login or
    the subscription, or its certificate failed verification: retrying with the same
    credentials or trust cannot succeed."""
    handshake = error.__cause__ or error.__context__
    if isinstance(handshake, ssl.SSLCertVerificationError):
        raise AuthenticationFailed(f"{what}: the TLS handshake failed: {handshake}") from error
    if not isinstance(error, aiomqtt.MqttCodeError):
        return
    rc = error.rc
    code = getattr(rc, "value", rc)
    if code in _REFUSED:
        raise AuthenticationFailed(f"{what}: the broker refused the connection: {rc}") from error
