"""Keep SASL passwords out of aiokafka's own log records.

With the standard library's DEBUG logging on, ``aiokafka.conn`` logs every request it sends,
the SASL handshake's bytes included, and PLAIN carries the password in them. Once a client is
started with a password, a filter on every ``aiokafka`` logger replaces it (as text and as it
appears in a ``bytes`` repr) with ``***`` in the records those loggers emit. The filter stays
for the rest of the process: a record logged late by a closing connection is redacted too.
"""

from __future__ import annotations

import logging

__all__ = ["redact_secret"]

_MASK = "***"


class _Redactor(logging.Filter):
    """Rewrites a record's message without the secrets it holds (never drops a record)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: set[str] = set()

    def add(self, secret: str) -> None:
        self.forms.add(secret)
        self.forms.add(repr(secret.encode())[2:-1])  # as it reads inside a bytes repr
        self.forms.discard("")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted: leave it to the handler
            return True
        if any(form in message for form in self.forms):
            for form in sorted(self.forms, key=len, reverse=True):
                message = message.replace(form, _MASK)
            record.msg, record.args = message, None
        return True


_redactor = _Redactor()


def redact_secret(secret: str | None) -> None:
    """Redact ``secret`` from the records of every ``aiokafka`` logger from now on."""
    if not secret:
        return
    _redactor.add(secret)
    manager = logging.root.manager
    names = [n for n in list(manager.loggerDict) if n == "aiokafka" or n.startswith("aiokafka.")]
    for name in names:
        logger = logging.getLogger(name)
        if _redactor not in logger.filters:
            logger.addFilter(_redactor)
