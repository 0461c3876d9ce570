"""Two gateway processes (two nodes, two workers each) counting in one real Redis.

The issue's exactness test for the cluster-wide store: 1,000 concurrent requests spread over
both nodes against a limit of 100 a minute admit exactly 100, in whichever process and
worker they land.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from redis_server import RedisServer, redis_server_binary

if TYPE_CHECKING:
    from conftest import StartGateway, Upstream

CLUSTER_LIMIT = 100
BURST_REQUESTS = 1_000
BURST_CONNECTIONS = 50  # per node
BURST_MARGIN = 15.0  # seconds a burst surely takes less than (the window is a wall minute)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")
    with RedisServer() as server:
        yield server


async def test_two_nodes_on_one_redis_admit_exactly_the_limit(
    upstream: Upstream, start_gateway: StartGateway, redis: RedisServer, tmp_path: Path
) -> None:
    per_minute = {"algorithm": "fixed-window", "limit": CLUSTER_LIMIT, "window": "1m"}
    nodes = []
    for name in ("node-a", "node-b"):
        config = upstream.config(workers=2)
        config["cluster"] = {"redis": redis.url}
        config["services"][0]["policies"] = [
            {"rate-limit": {"limits": [per_minute], "by": "global", "store": "redis"}}
        ]
        directory = tmp_path / name
        directory.mkdir()
        nodes.append(await start_gateway(config, cwd=directory))
    # The window is aligned to Redis' clock (this machine's): keep the burst inside a minute.
    left_in_minute = 60 - time.time() % 60
    if left_in_minute < BURST_MARGIN:
        await asyncio.sleep(left_in_minute)

    connector = aiohttp.TCPConnector(limit=2 * BURST_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(index: int) -> tuple[int, int]:
            node = nodes[index % 2]
            async with session.get(node.url("/")) as reply:
                await reply.read()
                return index % 2, reply.status

        answers = await asyncio.gather(*(call(index) for index in range(BURST_REQUESTS)))

    statuses = [status for _, status in answers]
    assert statuses.count(200) == CLUSTER_LIMIT
    assert statuses.count(429) == BURST_REQUESTS - CLUSTER_LIMIT
    admitted_by_node = {node: 0 for node in (0, 1)}
    for node, status in answers:
        admitted_by_node[node] += status == 200
    assert all(admitted_by_node.values()), f"both nodes admitted some: {admitted_by_node}"
