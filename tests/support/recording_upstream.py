"""A real upstream for integration tests that records every request it received.

Paths choose the answer:
- `/ws` is a WebSocket that greets, then echoes every text message as `echo:<message>`;
- `.../status/<code>` answers that status with no body (204, 304, ...);
- anything else reads the whole body and answers 200 `<METHOD> <target> <body length>`.
Every request is recorded with its raw header list and the body bytes as received (after the
upstream's own HTTP decoding, so a chunked request records its payload).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import WSMsgType, web

# Upper bound on the time cleanup may wait for handlers still running (a tunnel, a stalled body).
SHUTDOWN_TIMEOUT = 0.5


@dataclass
class RecordedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


class RecordingUpstream:
    """An aiohttp server on 127.0.0.1 with an ephemeral port; see the module docstring."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        # Set once a handler has read the first piece of a request body (for streaming tests).
        self.body_started = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._websocket)
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _read_body(self, request: web.Request) -> bytes:
        body = bytearray()
        while True:
            piece = await request.content.readany()
            if not piece:
                return bytes(body)
            if not body:
                self.body_started.set()
            body += piece

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
        ]
        self.requests.append(RecordedRequest(request.method, request.raw_path, headers, body))
        _, marker, code = request.path.rpartition("/status/")
        if marker and code.isdigit():
            return web.Response(status=int(code))
        text = f"{request.method} {request.raw_path} {len(body)}"
        return web.Response(text=text)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo:{message.data}")
        return ws

    def __repr__(self) -> str:
        return f"RecordingUpstream(port={self.port}, {len(self.requests)} requests)"
