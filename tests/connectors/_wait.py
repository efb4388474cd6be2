"""Polling helper for the connector tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``predicate`` until it is true; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.005)
