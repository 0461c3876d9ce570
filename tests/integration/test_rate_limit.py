"""The rate-limit policy through a real gateway, with the clock injected (no waiting for windows).

In the manner of Kong's rate-limiting specs: schema, then access (counts, headers, refusals),
keys, plans, the leaky bucket's delays and the concurrency limit's release.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import http_sf
import pytest
from http_wire import RawClient, request
from recording_upstream import RecordingUpstream
from upstreams import SlowUpstream

from tollgate.clock import FakeClock
from tollgate.config.loader import parse_config_data
from tollgate.errors import ConfigError
from tollgate.runtime.worker import Gateway

PER_MINUTE = {"name": "per-minute", "algorithm": "fixed-window", "limit": 6, "window": "1m"}
RATE_HEADERS = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining")
# A wall time 20 s into a UTC minute: a one-minute window has 40 s left.
START = 1_700_000_000.0


def config(
    upstream_url: str,
    rate_limit: dict[str, Any],
    *,
    key_auth: bool = False,
    consumers: list[dict[str, Any]] | None = None,
    plans: dict[str, Any] | None = None,
) -> dict[str, Any]:
    policies: list[dict[str, Any]] = [{"key-auth": {}}] if key_auth else []
    policies.append({"rate-limit": rate_limit})
    data: dict[str, Any] = {
        "gateway": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream_url}]}],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [{"name": "main"}],
                "policies": policies,
            }
        ],
        "consumers": consumers or [],
    }
    if plans is not None:
        data["plans"] = plans
    return data


Starter = Callable[[dict[str, Any]], Awaitable[Gateway]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=START)


@pytest.fixture
def start(clock: FakeClock, start_gateway: Callable[..., Awaitable[Gateway]]) -> Starter:
    """Start gateways on the test's fake clock; closed after the test."""

    async def start(data: dict[str, Any]) -> Gateway:
        return await start_gateway(data, clock=clock)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def parse_list(value: str) -> list[tuple[str, dict[str, Any]]]:
    """A structured-field List of (string, parameters), as http_sf parses it."""
    parsed: Any = http_sf.parse(value.encode(), tltype="list")
    return [(name, dict(params)) for name, params in parsed]


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def ratelimit(self) -> tuple[str, dict[str, Any]]:
        [(name, params)] = parse_list(self.headers["ratelimit"])
        return name, params

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error

    def policy(self) -> list[tuple[str, dict[str, Any]]]:
        return parse_list(self.headers["ratelimit-policy"])


async def get(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    path: str = "/",
    headers: dict[str, str] | None = None,
) -> Reply:
    url = f"http://127.0.0.1:{gateway.port}{path}"
    async with http.get(url, headers=headers or {}) as response:
        body = await response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, body)


# -- schema ---------------------------------------------------------------------------------


def test_a_token_bucket_without_a_rate_is_a_located_config_error() -> None:
    data = config("http://127.0.0.1:9", {"limits": [{"algorithm": "token-bucket", "burst": 5}]})
    with pytest.raises(ConfigError) as info:
        parse_config_data(data)
    [problem] = info.value.problems
    assert problem.path == "services[0].policies[0].rate-limit.limits[0]"
    assert problem.message == "token-bucket needs `rate` (units per second)"


def test_the_redis_store_without_cluster_redis_fails_to_compile() -> None:
    data = config("http://127.0.0.1:9", {"limits": [PER_MINUTE], "store": "redis"})
    with pytest.raises(ValueError, match=r"`store: redis` but `cluster\.redis` is not set"):
        Gateway(parse_config_data(data), clock=FakeClock())


def test_a_bad_redis_url_is_a_config_error_that_does_not_repeat_it() -> None:
    data = config("http://127.0.0.1:9", {"limits": [PER_MINUTE], "store": "redis"})
    data["cluster"] = {"redis": "http://user:s3cret@cache:6379"}
    with pytest.raises(ConfigError) as info:
        parse_config_data(data)
    [problem] = info.value.problems
    assert problem.path == "cluster.redis"
    assert "redis://" in problem.message
    assert "s3cret" not in str(info.value)


def test_the_node_wide_store_refuses_the_sliding_window_log_at_its_path() -> None:
    log = {"name": "exact", "algorithm": "sliding-window-log", "limit": 5, "window": "1s"}
    data = config("http://127.0.0.1:9", {"limits": [PER_MINUTE, log]})  # local by default
    with pytest.raises(ConfigError) as info:
        parse_config_data(data)
    [problem] = info.value.problems
    assert problem.path == "services[0].policies[0].rate-limit"
    assert problem.message.startswith("limits[1] ('exact') cannot be kept by `store: local`")
    assert "'sliding-window'" in problem.message
    assert problem.message.endswith("`store: process`")
    parse_config_data(config("http://127.0.0.1:9", {"limits": [log], "store": "process"}))


def test_the_node_wide_store_refuses_a_plans_sliding_window_log_when_compiled() -> None:
    log = {"name": "exact", "algorithm": "sliding-window-log", "limit": 5, "window": "1s"}
    data = config(
        "http://127.0.0.1:9",
        {"plans": True},
        consumers=[{"name": "acme", "plan": "gold"}],
        plans={"gold": {"rate-limit": {"limits": [log]}}},
    )
    with pytest.raises(ValueError, match="plan 'gold': limits\\[0\\] \\('exact'\\) cannot"):
        Gateway(parse_config_data(data), clock=FakeClock())


def test_a_consumer_naming_an_unknown_plan_is_a_config_error() -> None:
    data = config(
        "http://127.0.0.1:9",
        {"plans": True},
        consumers=[{"name": "acme", "plan": "gold"}],
        plans={"golden": {"rate-limit": {"limits": [PER_MINUTE]}}},
    )
    with pytest.raises(ConfigError) as info:
        parse_config_data(data)
    [problem] = info.value.problems
    assert problem.path == "consumers[0].plan"
    assert problem.message == "no plan named 'gold'; did you mean 'golden'?"


def test_plans_true_without_any_plans_fails_to_compile() -> None:
    data = config("http://127.0.0.1:9", {"plans": True})
    with pytest.raises(ValueError, match="defines no `plans`"):
        Gateway(parse_config_data(data), clock=FakeClock())


# -- counting and headers -------------------------------------------------------------------


@pytest.mark.parametrize("store", ["local", "process", "redis"])
async def test_six_a_minute_admits_six_and_refuses_the_seventh(
    upstream: RecordingUpstream,
    start: Starter,
    http: aiohttp.ClientSession,
    clock: FakeClock,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    data = config(upstream.url, {"limits": [PER_MINUTE], "by": "ip", "store": store})
    if store == "redis":
        data["cluster"] = {"redis": request.getfixturevalue("redis").url}
    gateway = await start(data)
    replies = [await get(http, gateway) for _ in range(7)]

    assert [reply.status for reply in replies] == [200] * 6 + [429]
    assert [reply.headers["x-ratelimit-remaining"] for reply in replies] == list("5432100")
    assert len(upstream.requests) == 6
    for reply in replies:
        assert reply.headers["x-ratelimit-limit"] == "6"
        assert 0 < int(reply.headers["x-ratelimit-reset"]) <= 60
        assert reply.policy() == [("per-minute", {"q": 6, "w": 60})]
    assert replies[0].ratelimit() == ("per-minute", {"r": 5, "t": 40})
    refused = replies[-1]
    assert refused.ratelimit() == ("per-minute", {"r": 0, "t": 40})
    assert int(refused.headers["retry-after"]) == 40
    error = refused.error()
    assert error["type"] == "rate_limited"
    assert error["message"] == "Rate limit exceeded: per-minute"

    clock.advance(39.5)
    assert (await get(http, gateway)).status == 429
    clock.advance(0.5)  # the window is over
    again = await get(http, gateway)
    assert again.status == 200
    assert again.headers["x-ratelimit-remaining"] == "5"


async def test_two_limits_at_once_report_the_most_restrictive(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    limits = [
        {"name": "per-second", "algorithm": "fixed-window", "limit": 3, "window": "1s"},
        {"name": "per-hour", "algorithm": "sliding-window", "limit": 5, "window": "1h"},
    ]
    gateway = await start(config(upstream.url, {"limits": limits}))

    first = [await get(http, gateway) for _ in range(4)]
    assert [reply.status for reply in first] == [200, 200, 200, 429]
    assert [reply.ratelimit() for reply in first[:3]] == [
        ("per-second", {"r": 2, "t": 1}),
        ("per-second", {"r": 1, "t": 1}),
        ("per-second", {"r": 0, "t": 1}),
    ]
    assert first[3].headers["retry-after"] == "1"
    assert first[0].policy() == [
        ("per-second", {"q": 3, "w": 1}),
        ("per-hour", {"q": 5, "w": 3600}),
    ]

    clock.advance(1)
    # The refused request spent nothing: the hour has 2 left, not 1.
    second = [await get(http, gateway) for _ in range(3)]
    assert [reply.status for reply in second] == [200, 200, 429]
    assert [reply.ratelimit()[0] for reply in second] == ["per-hour"] * 3
    assert second[0].ratelimit()[1]["r"] == 1
    assert second[2].headers["x-ratelimit-limit"] == "5"
    assert second[2].error()["message"] == ("Rate limit exceeded: per-hour")
    assert int(second[2].headers["retry-after"]) > 60


async def test_refused_requests_do_not_consume(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    bucket = {"name": "bucket", "algorithm": "token-bucket", "rate": 1, "burst": 2}
    gateway = await start(config(upstream.url, {"limits": [bucket]}))
    statuses = [(await get(http, gateway)).status for _ in range(7)]
    assert statuses == [200, 200] + [429] * 5
    clock.advance(1)  # one token back, however many requests were refused
    assert (await get(http, gateway)).status == 200
    assert (await get(http, gateway)).status == 429


async def test_each_consumer_has_its_own_counter(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    consumers = [{"name": "alice", "keys": ["k-alice"]}, {"name": "bob", "keys": ["k-bob"]}]
    limit = {**PER_MINUTE, "limit": 2}
    gateway = await start(
        config(upstream.url, {"limits": [limit]}, key_auth=True, consumers=consumers)
    )
    alice = {"apikey": "k-alice"}
    bob = {"apikey": "k-bob"}
    assert [(await get(http, gateway, headers=alice)).status for _ in range(3)] == [200, 200, 429]
    assert [(await get(http, gateway, headers=bob)).status for _ in range(3)] == [200, 200, 429]


async def test_ip_keys_believe_forwarded_for_only_from_trusted_proxies(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    limit = {**PER_MINUTE, "limit": 1}
    trusting = await start(
        config(upstream.url, {"limits": [limit], "by": "ip", "trusted_proxies": ["127.0.0.0/8"]})
    )
    first = {"X-Forwarded-For": "198.51.100.1"}
    second = {"X-Forwarded-For": "198.51.100.2"}
    assert (await get(http, trusting, headers=first)).status == 200
    assert (await get(http, trusting, headers=second)).status == 200
    assert (await get(http, trusting, headers=first)).status == 429

    untrusting = await start(config(upstream.url, {"limits": [limit], "by": "ip"}))
    assert (await get(http, untrusting, headers=first)).status == 200
    assert (await get(http, untrusting, headers=second)).status == 429  # spoofing gains nothing


async def test_headers_false_sends_no_rate_limit_fields_but_keeps_retry_after(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    limit = {**PER_MINUTE, "limit": 1}
    gateway = await start(config(upstream.url, {"limits": [limit], "headers": False}))
    admitted = await get(http, gateway)
    refused = await get(http, gateway)
    assert (admitted.status, refused.status) == (200, 429)
    for reply in (admitted, refused):
        assert not set(RATE_HEADERS) & set(reply.headers)
        assert "x-ratelimit-reset" not in reply.headers
    assert refused.headers["retry-after"] == "40"


async def test_the_refusal_status_is_configurable(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    limit = {**PER_MINUTE, "limit": 1}
    gateway = await start(config(upstream.url, {"limits": [limit], "status": 503}))
    await get(http, gateway)
    refused = await get(http, gateway)
    assert refused.status == 503
    assert refused.headers["retry-after"] == "40"
    assert refused.error()["type"] == "rate_limited"


# -- plans ----------------------------------------------------------------------------------


def plans_config(upstream_url: str, gold_limit: int = 3) -> dict[str, Any]:
    consumers = [
        {"name": "goldie", "keys": ["k-gold"], "plan": "gold"},
        {"name": "freddie", "keys": ["k-free"], "plan": "free"},
        {"name": "plain", "keys": ["k-plain"]},
    ]
    plans = {
        "gold": {"rate-limit": {"limits": [{**PER_MINUTE, "limit": gold_limit}]}},
        "free": {"rate-limit": {"limits": [{**PER_MINUTE, "limit": 1}]}},
    }
    own = {"limits": [{**PER_MINUTE, "limit": 2}], "plans": True}
    return config(upstream_url, own, key_auth=True, consumers=consumers, plans=plans)


async def admitted(http: aiohttp.ClientSession, gateway: Gateway, key: str, tries: int) -> int:
    statuses = [(await get(http, gateway, headers={"apikey": key})).status for _ in range(tries)]
    return statuses.count(200)


async def test_a_consumers_plan_replaces_the_policys_own_limits(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    gateway = await start(plans_config(upstream.url))
    assert await admitted(http, gateway, "k-gold", 5) == 3
    assert await admitted(http, gateway, "k-free", 5) == 1
    assert await admitted(http, gateway, "k-plain", 5) == 2  # no plan: the policy's own
    reply = await get(http, gateway, headers={"apikey": "k-gold"})
    assert reply.policy() == [("per-minute", {"q": 3, "w": 60})]


async def test_a_reload_keeps_the_counters_of_unchanged_limits_only(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    gateway = await start(plans_config(upstream.url))
    assert await admitted(http, gateway, "k-gold", 3) == 3
    assert await admitted(http, gateway, "k-free", 1) == 1

    gateway.reload(parse_config_data(plans_config(upstream.url, gold_limit=4)))
    assert await admitted(http, gateway, "k-free", 1) == 0  # unchanged: still spent
    assert await admitted(http, gateway, "k-gold", 5) == 4  # a new limit: counted afresh


# -- leaky bucket ---------------------------------------------------------------------------


async def test_the_leaky_bucket_holds_requests_back_to_space_them_out(
    upstream: RecordingUpstream, start: Starter, http: aiohttp.ClientSession
) -> None:
    # 40 a second, at most 50 ms of waiting: delays 0, 25 ms, 50 ms, then refusals (the fake
    # clock stands still, so the queue does not drain).
    shaper = {"name": "smooth", "algorithm": "leaky-bucket", "rate": 40, "max_delay": "50ms"}
    gateway = await start(config(upstream.url, {"limits": [shaper]}))
    took = []
    replies = []
    for _ in range(4):
        started = time.monotonic()
        replies.append(await get(http, gateway))
        took.append(time.monotonic() - started)
    assert [reply.status for reply in replies] == [200, 200, 200, 429]
    assert [reply.headers["x-ratelimit-remaining"] for reply in replies] == ["2", "1", "0", "0"]
    assert replies[0].policy() == [("smooth", {"q": 3, "w": 1})]
    assert took[1] >= 0.025
    assert took[2] >= 0.05
    assert took[3] < 0.05  # a refusal is not held back
    assert replies[3].headers["retry-after"] == "1"
    assert len(upstream.requests) == 3


# -- concurrency ----------------------------------------------------------------------------

CONCURRENCY = {"name": "in-flight", "algorithm": "concurrency", "limit": 1}


# SO_LINGER on, timeout 0: close() sends RST instead of FIN.
LINGER_RESET = struct.pack("ii", 1, 0)


async def eventually(condition: Callable[[], bool]) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not hold within 2 s")


async def test_a_concurrency_slot_is_released_after_the_response(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    hold = asyncio.Event()
    async with SlowUpstream(hold=hold) as slow:
        gateway = await start(config(slow.url, {"limits": [CONCURRENCY]}))
        first = asyncio.create_task(get(http, gateway))
        await slow.request_seen.wait()
        refused = await get(http, gateway)
        assert refused.status == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.ratelimit() == ("in-flight", {"r": 0, "t": 1})
        assert refused.policy() == [("in-flight", {"q": 1})]
        hold.set()
        assert (await first).status == 200
        assert (await get(http, gateway)).status == 200


async def test_a_concurrency_slot_is_released_at_once_when_the_client_resets(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    hold = asyncio.Event()
    async with SlowUpstream(hold=hold) as slow:
        gateway = await start(config(slow.url, {"limits": [CONCURRENCY]}))
        store = gateway.shared_state.store()
        client = await RawClient.open(gateway.port)
        await client.send(request("GET", "/"))
        await slow.request_seen.wait()
        assert store.used() == 1
        assert (await get(http, gateway)).status == 429

        client.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET
        )
        client.writer.transport.abort()
        await eventually(lambda: store.used() == 0)  # the upstream still holds the request
        assert len(slow.requests) == 1
        hold.set()
        assert (await get(http, gateway)).status == 200


async def test_a_concurrency_slot_is_released_when_a_closed_clients_exchange_ends(
    start: Starter, http: aiohttp.ClientSession
) -> None:
    # A client that closes (FIN) may only have half-closed and still read the answer, so the
    # exchange, and its slot, last until the upstream has answered.
    hold = asyncio.Event()
    async with SlowUpstream(hold=hold) as slow:
        gateway = await start(config(slow.url, {"limits": [CONCURRENCY]}))
        store = gateway.shared_state.store()
        client = await RawClient.open(gateway.port)
        await client.send(request("GET", "/"))
        await slow.request_seen.wait()
        await client.close()
        await asyncio.sleep(0.02)
        assert store.used() == 1
        hold.set()
        await eventually(lambda: store.used() == 0)
        assert (await get(http, gateway)).status == 200
