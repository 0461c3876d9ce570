"""`GET/DELETE /admin/rate-limits/{service}/{route}/{key}` on a running node.

The admin API lives in the supervisor; it reads and resets the counters where the workers
keep them: the node's shared memory (two workers here) or the cluster's Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from redis_server import RedisServer, redis_server_binary

if TYPE_CHECKING:
    from conftest import Gateway, StartGateway, Upstream

# A bucket of 5 that refills in about 3 hours: nothing comes back while the test runs, and no
# window boundary can fall in the middle of it.
BUCKET = {"name": "bucket", "algorithm": "token-bucket", "rate": 0.0005, "burst": 5}
KEY = "ip=127.0.0.1"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")
    with RedisServer() as server:
        yield server


def limited(upstream: Upstream, store: str, **cluster: Any) -> dict[str, Any]:
    config = upstream.config(workers=2)
    if cluster:
        config["cluster"] = cluster
    config["services"][0]["policies"] = [
        {"rate-limit": {"limits": [BUCKET], "by": "ip", "store": store}}
    ]
    return config


async def statuses(gateway: Gateway, count: int) -> list[int]:
    async with aiohttp.ClientSession() as session:
        codes = []
        for _ in range(count):
            async with session.get(gateway.url("/")) as reply:
                await reply.read()
                codes.append(reply.status)
        return codes


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_a_keys_counters_are_read_and_reset_through_the_admin_api(
    upstream: Upstream, start_gateway: StartGateway, store: str, request: pytest.FixtureRequest
) -> None:
    cluster = {"redis": request.getfixturevalue("redis").url} if store == "redis" else {}
    gateway = await start_gateway(limited(upstream, store, **cluster))
    assert await statuses(gateway, 3) == [200] * 3

    code, body = await gateway.admin("GET", f"/admin/rate-limits/api/main/{KEY}")
    assert code == 200, body
    assert body["policy"] == "api/main"
    assert body["key"] == KEY
    assert body["store"] == store
    [limit] = body["limits"]
    assert limit["name"] == "bucket"
    assert limit["algorithm"] == "token-bucket"
    assert limit["plan"] is None
    assert limit["limit"] == 5
    assert limit["available"] == 2
    assert limit["retry_after"] == 0

    assert await statuses(gateway, 3) == [200, 200, 429]
    code, body = await gateway.admin("GET", f"/admin/rate-limits/api/main/{KEY}")
    assert body["limits"][0]["available"] == 0
    assert body["limits"][0]["retry_after"] > 0

    code, body = await gateway.admin("DELETE", f"/admin/rate-limits/api/main/{KEY}")
    assert (code, body) == (200, {"policy": "api/main", "key": KEY, "reset": 1})
    code, body = await gateway.admin("GET", f"/admin/rate-limits/api/main/{KEY}")
    assert body["limits"][0]["available"] == 5
    assert await statuses(gateway, 6) == [200] * 5 + [429]


async def test_unknown_policies_and_per_worker_counters_get_json_errors(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(limited(upstream, "process"))
    code, body = await gateway.admin("GET", f"/admin/rate-limits/api/nowhere/{KEY}")
    assert code == 404
    assert body["error"]["type"] == "not_found"
    assert "no route api/nowhere" in body["error"]["message"]
    code, body = await gateway.admin("DELETE", f"/admin/rate-limits/api/main/{KEY}")
    assert code == 409
    assert body["error"]["type"] == "store_not_shared"
    assert "store: process" in body["error"]["message"]
