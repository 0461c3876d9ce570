"""Waiting for an observable condition with a deadline, never for a fixed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_INTERVAL = 0.02


async def wait_until(condition: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Check `condition` until it holds; fail naming `what` after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                if condition():
                    return
                await asyncio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise AssertionError(f"timed out after {within:g}s waiting for {what}") from None
