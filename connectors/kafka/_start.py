"""Starting an aiokafka client, retrying with backoff while the broker cannot be reached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from aiokafka.errors import KafkaError

from .._backoff import Backoff

__all__ = ["start_client"]


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=_Client)


async def start_client(make: Callable[[], C], what: str, give_up_after: float | None) -> C:
    """A started client from ``make()``; a failed start is stopped and retried with backoff.

    :raises ~connectors.BrokerUnavailable: the broker stayed unreachable ``give_up_after`` s.
    """
    backoff = Backoff(what, give_up_after=give_up_after)
    while True:
        client = make()
        try:
            await client.start()
        except KafkaError as exc:
            await client.stop()
            await backoff.wait(exc)
            continue
        return client
