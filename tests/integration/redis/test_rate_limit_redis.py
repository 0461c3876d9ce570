"""The rate-limit policy on the Redis store, through real gateways and a real Redis server.

Redis is killed mid-test and started again on its port: with `on_store_error: allow` the
gateway keeps limiting on its own (each worker counting alone, the fallbacks counted), with
`deny` it answers 503 with Retry-After; once Redis is back, counting is shared again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from recording_upstream import RecordingUpstream
from redis_server import RedisServer

from tollgate.clock import FakeClock
from tollgate.policies.rate_limit import RateLimit
from tollgate.ratelimit.limiter import RedisLimiter
from tollgate.runtime.worker import Gateway

START = 1_700_000_000.0  # 20 s into a UTC minute
RECONNECT_WITHIN = 10.0


def config(upstream_url: str, redis_url: str, on_store_error: str) -> dict[str, Any]:
    limit = {"name": "per-minute", "algorithm": "fixed-window", "limit": 5, "window": "1m"}
    return {
        "gateway": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "cluster": {"redis": redis_url, "redis_timeout": "200ms"},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream_url}]}],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [{"name": "main"}],
                "policies": [
                    {
                        "rate-limit": {
                            "limits": [limit],
                            "by": "global",
                            "store": "redis",
                            "on_store_error": on_store_error,
                        }
                    }
                ],
            }
        ],
    }


Starter = Callable[[dict[str, Any]], Awaitable[Gateway]]


@pytest.fixture
def start(start_gateway: Callable[..., Awaitable[Gateway]]) -> Starter:
    async def start(data: dict[str, Any]) -> Gateway:
        # A clock each, at the same time: in-process gateways with one clock would share
        # one per-worker fallback store, as two nodes never do.
        return await start_gateway(data, clock=FakeClock(wall=START))

    return start


def limiter_of(gateway: Gateway) -> RedisLimiter:
    [route] = gateway.runtime.routes
    [policy] = [p for p in route.policies if isinstance(p, RateLimit)]
    assert isinstance(policy.limiter, RedisLimiter)
    return policy.limiter


async def statuses(
    http: aiohttp.ClientSession, gateway: Gateway, count: int
) -> list[tuple[int, dict[str, str], bytes]]:
    answers = []
    for _ in range(count):
        async with http.get(f"http://127.0.0.1:{gateway.port}/") as reply:
            answers.append((reply.status, dict(reply.headers), await reply.read()))
    return answers


async def reconnected(gateway: Gateway) -> None:
    store = limiter_of(gateway).remote
    for _ in range(int(RECONNECT_WITHIN / 0.05)):
        if store.available:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the store did not reconnect within {RECONNECT_WITHIN} s")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_two_gateways_share_one_count_in_redis(
    upstream: RecordingUpstream, redis: RedisServer, start: Starter, http: aiohttp.ClientSession
) -> None:
    first = await start(config(upstream.url, redis.url, "allow"))
    second = await start(config(upstream.url, redis.url, "allow"))
    answers = await statuses(http, first, 3) + await statuses(http, second, 3)
    assert [status for status, _, _ in answers] == [200] * 5 + [429]
    assert [headers["X-RateLimit-Remaining"] for _, headers, _ in answers] == list("432100")
    assert limiter_of(first).fallbacks == limiter_of(second).fallbacks == 0
    assert limiter_of(second).rejected == 1


async def test_allow_keeps_limiting_alone_while_redis_is_down_then_shares_again(
    upstream: RecordingUpstream,
    own_redis: RedisServer,
    start: Starter,
    http: aiohttp.ClientSession,
) -> None:
    first = await start(config(upstream.url, own_redis.url, "allow"))
    second = await start(config(upstream.url, own_redis.url, "allow"))
    assert [s for s, _, _ in await statuses(http, first, 2)] == [200, 200]

    own_redis.kill()
    # Each gateway counts on its own now: a fresh allowance of 5, then refusals.
    alone = await statuses(http, first, 6)
    assert [status for status, _, _ in alone] == [200] * 5 + [429]
    assert limiter_of(first).fallbacks == 6
    assert [s for s, _, _ in await statuses(http, second, 1)] == [200]
    assert limiter_of(second).fallbacks == 1

    own_redis.restart()  # on the same port, empty
    await reconnected(first)
    await reconnected(second)
    shared = await statuses(http, first, 3) + await statuses(http, second, 3)
    assert [status for status, _, _ in shared] == [200] * 5 + [429]
    assert limiter_of(first).fallbacks == 6
    assert limiter_of(second).fallbacks == 1


async def test_deny_answers_503_with_retry_after_while_redis_is_down(
    upstream: RecordingUpstream,
    own_redis: RedisServer,
    start: Starter,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await start(config(upstream.url, own_redis.url, "deny"))
    assert [s for s, _, _ in await statuses(http, gateway, 1)] == [200]
    own_redis.kill()
    [(status, headers, body)] = await statuses(http, gateway, 1)
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(body)["error"]["type"] == "rate_limit_unavailable"
    assert limiter_of(gateway).denied == 1
    assert len(upstream.requests) == 1

    own_redis.restart()  # empty: the count starts afresh
    await reconnected(gateway)
    assert [s for s, _, _ in await statuses(http, gateway, 6)] == [200] * 5 + [429]


async def test_a_script_redis_lost_is_loaded_again_on_the_request_path(
    upstream: RecordingUpstream, redis: RedisServer, start: Starter, http: aiohttp.ClientSession
) -> None:
    # After a restart or a failover Redis lacks the script and the function (NOSCRIPT,
    # "Function not found"): the request that finds out loads them, is decided by the second
    # call, and is counted once.
    gateway = await start(config(upstream.url, redis.url, "deny"))
    assert [s for s, _, _ in await statuses(http, gateway, 2)] == [200, 200]
    redis.command("SCRIPT", "FLUSH")
    redis.command("FUNCTION", "FLUSH")
    answers = await statuses(http, gateway, 4)
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    assert [headers["X-RateLimit-Remaining"] for _, headers, _ in answers] == list("2100")
    assert limiter_of(gateway).denied == limiter_of(gateway).fallbacks == 0


async def test_the_leaky_bucket_in_redis_spaces_requests_out(
    upstream: RecordingUpstream, redis: RedisServer, start: Starter, http: aiohttp.ClientSession
) -> None:
    # Ten a second, up to 1 s in line: three requests at once leave 0, 0.1 and 0.2 s late.
    data = config(upstream.url, redis.url, "deny")
    [policy] = data["services"][0]["policies"]
    policy["rate-limit"]["limits"] = [
        {"name": "paced", "algorithm": "leaky-bucket", "rate": 10, "max_delay": "1s"}
    ]
    gateway = await start(data)
    loop = asyncio.get_running_loop()
    began = loop.time()
    ended: list[float] = []

    async def one() -> int:
        async with http.get(f"http://127.0.0.1:{gateway.port}/") as reply:
            await reply.read()
            ended.append(loop.time() - began)
            return reply.status

    assert sorted(await asyncio.gather(one(), one(), one())) == [200, 200, 200]
    assert max(ended) >= 0.19  # the last one waited its turn (two intervals of 0.1 s)
    assert len(upstream.requests) == 3
