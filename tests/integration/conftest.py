"""Fixtures for integration tests: a real recording upstream, gateways started in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from recording_upstream import RecordingUpstream
from redis_server import RedisServer, redis_server_binary

from tollgate.config.loader import parse_config_data
from tollgate.runtime.worker import Gateway

GatewayStarter = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayStarter]:
    """Start a Gateway from a config mapping on an ephemeral port; closed after the test.

    Keyword options go to `Gateway` (a test's clock, a span exporter)."""
    started: list[Gateway] = []

    async def start(config: dict[str, Any], **options: Any) -> Gateway:
        gateway = Gateway(parse_config_data(config), **options)
        await gateway.start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            await gateway.close()


# -- real Redis servers (tests/support/redis_server.py) ------------------------------------


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
    """The shared server, emptied (keys, scripts and functions) before the test."""
    shared_redis.command("FLUSHALL")
    shared_redis.command("SCRIPT", "FLUSH")
    shared_redis.command("FUNCTION", "FLUSH")
    return shared_redis


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, to kill, pause and restart."""
    _require_redis()
    with RedisServer() as server:
        yield server
