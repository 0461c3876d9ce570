"""Fixtures for integration tests: a real recording upstream, gateways started in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from recording_upstream import RecordingUpstream

from tollgate.config.loader import parse_config_data
from tollgate.runtime.worker import Gateway

GatewayStarter = Callable[[dict[str, Any]], Awaitable[Gateway]]


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
    """Start a Gateway from a config mapping on an ephemeral port; closed after the test."""
    started: list[Gateway] = []

    async def start(config: dict[str, Any]) -> Gateway:
        gateway = Gateway(parse_config_data(config))
        await gateway.start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            await gateway.close()
