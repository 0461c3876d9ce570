"""Traces from `tollgate serve` with two worker processes: each worker sets up its own
OpenTelemetry SDK, and on SIGTERM exports what it still holds before it exits."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from otlp_collector import Collector

    from conftest import StartGateway, Upstream

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLS = 20


async def test_workers_export_their_spans_when_they_stop(
    upstream: Upstream, start_gateway: StartGateway, collector: Collector
) -> None:
    config = upstream.config(workers=2)
    config["logs"] = {"enabled": False}
    # Batches far larger than the calls and a long interval: only the drain exports.
    config["tracing"] = {
        "enabled": True,
        "endpoint": collector.url,
        "flush_interval": "10m",
        "batch_size": 1000,
        "queue": 1000,
    }
    gateway = await start_gateway(config)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(CALLS):
            traceparent = f"00-{TRACE_ID}-{index + 1:016x}-01"
            async with session.get(
                gateway.url(f"/call/{index}"), headers={"traceparent": traceparent}
            ) as reply:
                assert reply.status == 200
                await reply.read()
    assert collector.spans == []  # nothing is due yet
    gateway.send_signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0
    await asyncio.sleep(0)
    servers = [span for span in collector.spans if span.kind == span.SPAN_KIND_SERVER]
    clients = [span for span in collector.spans if span.kind == span.SPAN_KIND_CLIENT]
    assert len(servers) == len(clients) == CALLS
    assert {span.trace_id.hex() for span in collector.spans} == {TRACE_ID}
    assert sorted(int(span.parent_span_id.hex(), 16) for span in servers) == list(
        range(1, CALLS + 1)
    )
    assert {span.parent_span_id for span in clients} == {span.span_id for span in servers}
    assert {span.name for span in servers} == {"GET /"}
    assert len(collector.resources) == 2, "each worker exports as itself"
