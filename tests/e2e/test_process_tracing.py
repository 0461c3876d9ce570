"""Traces from `tollgate serve` with two worker processes: each worker sets up its own
OpenTelemetry SDK, and on SIGTERM exports what it still holds before it exits."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

if TYPE_CHECKING:
    from conftest import StartGateway, Upstream

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLS = 20


class Collector:
    """An OTLP/HTTP collector in the test's event loop: keeps the spans POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: set[str] = set()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.instance.id":
                    self.resources.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = Collector()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_workers_export_their_spans_when_they_stop(
    upstream: Upstream, start_gateway: StartGateway, collector: Collector
) -> None:
    config = upstream.config(workers=2)
    config["logs"] = {"enabled": False}
    # Batches far larger than the calls and a long interval: only the drain exports.
    config["tracing"] = {
        "enabled": True,
        "endpoint": f"http://127.0.0.1:{collector.port}/v1/traces",
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
