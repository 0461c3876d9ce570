"""Fixtures for the Redis store's tests: real `redis-server` processes (see tests/support)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tollgate.ratelimit.redis_store import RedisStore


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., Awaitable[RedisStore]]]:
    """Make connected stores (keyword arguments as RedisStore's); closed after the test."""
    made: list[RedisStore] = []

    async def make(url: str, **settings: Any) -> RedisStore:
        store = RedisStore(url, **settings)
        made.append(store)
        await store.connect()
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()
