"""Fixtures for the Redis store's tests: real `redis-server` processes (see tests/support)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis_server import RedisServer, redis_server_binary

from tollgate.ratelimit.redis_store import RedisStore


def _require_redis() -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One server for the whole session; tests that kill or pause a server get their own."""
    _require_redis()
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis(shared_redis: RedisServer) -> RedisServer:
    """The shared server, emptied (keys and scripts) before the test."""
    shared_redis.command("FLUSHALL")
    shared_redis.command("SCRIPT", "FLUSH")
    return shared_redis


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, to kill, pause and restart."""
    _require_redis()
    with RedisServer() as server:
        yield server


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
