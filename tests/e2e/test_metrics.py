"""`GET /metrics` on a running node: the counters equal the calls made, summed over workers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Gateway, StartGateway, Upstream

KEY = "sk-metrics-test"


def configured(upstream: Upstream) -> dict[str, Any]:
    config = upstream.config(workers=2)
    config["consumers"] = [{"name": "acme", "keys": [KEY]}]
    config["services"][0]["policies"] = [
        {"key-auth": {}},
        {
            "rate-limit": {
                "limits": [{"algorithm": "token-bucket", "rate": 0.0005, "burst": 30}],
                "by": "consumer",
            }
        },
    ]
    return config


async def scrape(gateway: Gateway) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.admin_url("/metrics"), headers=gateway.admin_headers()) as reply,
    ):
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await reply.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def total(families: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        sample.value
        for sample in families[name].samples
        if sample.name == name + "_total"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_counters_equal_the_calls_made_across_two_workers(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = configured(upstream)
    gateway = await start_gateway(config)
    connector = aiohttp.TCPConnector(limit=20)  # several connections: both workers serve
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(path: str, key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.get(gateway.url(path), headers=headers) as reply:
                await reply.read()
                return reply.status

        statuses = await asyncio.gather(
            *[call("/", KEY) for _ in range(40)],  # 30 admitted, 10 refused
            *[call("/", None) for _ in range(7)],  # no key: 401
            *[call("/", "sk-wrong") for _ in range(3)],  # 401
        )
    assert statuses.count(200) == 30
    assert statuses.count(429) == 10
    assert statuses.count(401) == 10

    families = await scrape(gateway)
    requests = "tollgate_http_requests"
    assert total(families, requests) == 50
    assert total(families, requests, code="200", source="upstream") == 30
    assert total(families, requests, code="429", source="gateway") == 10
    assert total(families, requests, code="401", source="gateway") == 10
    assert total(families, "tollgate_gateway_errors", type="rate_limited") == 10
    assert total(families, "tollgate_gateway_errors", type="unauthorized") == 10
    assert total(families, "tollgate_rate_limit_rejections", policy="api/main") == 10
    duration = families["tollgate_request_duration_seconds"]
    [count] = [s.value for s in duration.samples if s.name.endswith("_count")]
    assert count == 50
    upstream_duration = families["tollgate_upstream_duration_seconds"]
    [proxied] = [s.value for s in upstream_duration.samples if s.name.endswith("_count")]
    assert proxied == 30
    assert families["tollgate_workers"].samples[0].value == 2
    assert families["tollgate_build_info"].samples[0].value == 1

    # A reload keeps every count (the policies are compiled anew, their counts carried over).
    gateway.rewrite_config(config)
    code, body = await gateway.admin("POST", "/admin/reload")
    assert code == 200, body
    again = await scrape(gateway)
    assert total(again, requests) == 50
    assert total(again, "tollgate_rate_limit_rejections", policy="api/main") == 10
    assert total(again, "tollgate_config_reloads") == 1
