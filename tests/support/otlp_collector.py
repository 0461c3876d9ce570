"""An OTLP/HTTP trace collector in the test's event loop.

Keeps every POST to /v1/traces: its content type and body (`posts`), and the spans, the
scope names and the `service.instance.id` of each resource the protobuf bodies hold.
`received` is set by the first POST.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Collector:
    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self.spans: list[Any] = []
        self.scopes: set[str] = set()
        self.resources: set[str] = set()
        self.received = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((request.content_type, body))
        if request.content_type == "application/x-protobuf":
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            for resource_spans in message.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.instance.id":
                        self.resources.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    self.scopes.add(scope_spans.scope.name)
                    self.spans.extend(scope_spans.spans)
        self.received.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
