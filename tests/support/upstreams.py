"""Real upstream servers for the integration and end-to-end tests, each on a free loopback port.

Most are raw asyncio servers that parse requests with httptools and answer with exactly the
bytes a test chooses, so a test sees header names, order and framing as the gateway sent them.
`AppUpstream` is an aiohttp.web application for tests that only need a well-behaved server.

Every raw server counts the connections it accepted (`accepted`), how many are open (`open`)
and the most it had open at once (`peak_open`), and keeps every request it read (`requests`;
`request_seen` is set at the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Self

import httptools
import trustme
from aiohttp import web

Headers = list[tuple[str, str]]

# SO_LINGER on, timeout 0: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class ReceivedRequest:
    """One request as an upstream read it off the wire."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes
    connection: int  # which accepted connection carried it, counting from 1

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """The first value of a header (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "path": self.path,
            "query": self.query,
            "version": self.version,
            "headers": [list(pair) for pair in self.headers],
            "body": self.body.decode("latin-1"),
            "connection": self.connection,
        }


class _RequestReader:
    """httptools callbacks collecting complete requests from one connection's bytes."""

    def __init__(self, connection: int) -> None:
        self.connection = connection
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[ReceivedRequest] = deque()
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.ready.append(
            ReceivedRequest(
                method=self.parser.get_method().decode("ascii"),
                target=self._url.decode("latin-1"),
                version=self.parser.get_http_version(),
                headers=self._headers,
                body=b"".join(self._body),
                connection=self.connection,
            )
        )

    async def next_request(self, reader: asyncio.StreamReader) -> ReceivedRequest | None:
        """The next complete request, or None when the peer closed the connection."""
        while not self.ready:
            data = await reader.read(65536)
            if not data:
                return None
            self.parser.feed_data(data)
        return self.ready.popleft()


def response_bytes(
    status: int,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response; Content-Length is added unless told otherwise."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RawUpstream:
    """Base of the raw servers: accepts, parses, counts, and calls `respond` per request."""

    scheme = "http"

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        self.requests: list[ReceivedRequest] = []
        self.request_seen = asyncio.Event()  # set once a first request has been read
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        requests = _RequestReader(self.accepted)
        try:
            while True:
                request = await requests.next_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                self.request_seen.set()
                if not await self.respond(request, writer):
                    return
        except (ConnectionError, httptools.HttpParserError):
            pass
        except asyncio.CancelledError:
            # `close()` cancels handlers still running; ending normally keeps asyncio's stream
            # callback from logging a cancelled handler as an error (Python 3.11).
            pass
        finally:
            self.open -= 1
            self._handlers.discard(task)
            writer.close()

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open for another."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url}, accepted={self.accepted}, open={self.open}, "
            f"{len(self.requests)} requests)"
        )


class EchoUpstream(RawUpstream):
    """Answers every request with what it received as JSON (see `ReceivedRequest.as_json`).

    `response_headers` are sent before the framing header; with `chunked` the body goes in
    two chunks under `Transfer-Encoding: chunked` instead of a Content-Length.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        response_headers: Headers | None = None,
        chunked: bool = False,
    ) -> None:
        super().__init__(ssl_context)
        self.response_headers: Headers = response_headers or []
        self.chunked = chunked

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        body = json.dumps(request.as_json()).encode()
        headers = [("Content-Type", "application/json"), *self.response_headers]
        if self.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            half = len(body) // 2
            writer.write(
                response_bytes(200, headers, content_length=False)
                + chunk(body[:half])
                + chunk(body[half:])
                + LAST_CHUNK
            )
        else:
            writer.write(response_bytes(200, headers, body))
        await writer.drain()
        return True


class SlowUpstream(RawUpstream):
    """Waits `head_delay` seconds before the head (or, with `hold`, until the test sets that
    event), then sends `pieces` `piece_delay` apart."""

    def __init__(
        self,
        head_delay: float = 0.0,
        pieces: tuple[bytes, ...] = (b"slow",),
        piece_delay: float = 0.0,
        *,
        hold: asyncio.Event | None = None,
    ) -> None:
        super().__init__()
        self.head_delay = head_delay
        self.pieces = pieces
        self.piece_delay = piece_delay
        self.hold = hold

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        if self.hold is not None:
            await self.hold.wait()
        else:
            await asyncio.sleep(self.head_delay)
        length = sum(len(piece) for piece in self.pieces)
        writer.write(response_bytes(200, [("Content-Length", str(length))], content_length=False))
        for index, piece in enumerate(self.pieces):
            if index:
                await asyncio.sleep(self.piece_delay)
            writer.write(piece)
            await writer.drain()
        return True


class ResettingUpstream(RawUpstream):
    """Sends the head and `sent` bytes of a `declared`-byte body, then resets the connection."""

    def __init__(self, declared: int = 10_000, sent: int = 1_000) -> None:
        super().__init__()
        self.declared = declared
        self.sent = sent

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        head = response_bytes(200, [("Content-Length", str(self.declared))], content_length=False)
        writer.write(head)
        writer.write(b"x" * self.sent)
        await writer.drain()
        await asyncio.sleep(0.05)  # let the partial body reach the gateway first
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.transport.abort()
        return False


class StreamingUpstream(RawUpstream):
    """Streams `count` pieces `pause` seconds apart in a chunked response.

    `/sse` sends server-sent events (`data: event N`), any other path plain text lines.
    `sent_at` holds the monotonic time each piece of the last response was written. With
    `gate`, the pieces after the first wait until the test sets that event.
    """

    def __init__(
        self, count: int = 4, pause: float = 0.1, *, gate: asyncio.Event | None = None
    ) -> None:
        super().__init__()
        self.count = count
        self.pause = pause
        self.gate = gate
        self.sent_at: list[float] = []

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        sse = request.path == "/sse"
        content_type = "text/event-stream" if sse else "text/plain"
        headers = [
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
        ]
        writer.write(response_bytes(200, headers, content_length=False))
        self.sent_at = []
        for index in range(self.count):
            if index == 1 and self.gate is not None:
                await self.gate.wait()
            if index:
                await asyncio.sleep(self.pause)
            piece = f"data: event {index}\n\n" if sse else f"line {index}\n"
            writer.write(chunk(piece.encode()))
            await writer.drain()
            self.sent_at.append(time.monotonic())
        writer.write(LAST_CHUNK)
        await writer.drain()
        return True


class StatusUpstream(RawUpstream):
    """Bodiless answers: `/204` is 204, `/304` is 304, and HEAD anything is 200 with a
    Content-Length of 1234 and no body. Other requests get 200 `ok`."""

    HEAD_LENGTH = 1234

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        if request.method == "HEAD":
            headers = [("Content-Length", str(self.HEAD_LENGTH)), ("X-Kind", "head")]
            writer.write(response_bytes(200, headers, content_length=False))
        elif request.path == "/204":
            writer.write(response_bytes(204, [("X-Kind", "no-content")], content_length=False))
        elif request.path == "/304":
            headers = [("ETag", '"v1"'), ("X-Kind", "not-modified")]
            writer.write(response_bytes(304, headers, content_length=False))
        else:
            writer.write(response_bytes(200, [("X-Kind", "ok")], b"ok"))
        await writer.drain()
        return True


class ClosingUpstream(EchoUpstream):
    """An echo server that does not keep connections alive.

    - ``announce``: answers with `Connection: close` and closes;
    - ``silent``: answers as if keeping the connection, then closes it at once;
    - ``drop-second``: answers the first request of a connection normally and closes on the
      second without answering, as a server does whose idle timeout fires as a request arrives.
    """

    def __init__(self, mode: Literal["announce", "silent", "drop-second"]) -> None:
        super().__init__(response_headers=[("Connection", "close")] if mode == "announce" else [])
        self.mode = mode
        self.dropped = 0

    async def respond(self, request: ReceivedRequest, writer: asyncio.StreamWriter) -> bool:
        if self.mode == "drop-second":
            # `requests` already holds this one.
            on_connection = sum(1 for r in self.requests if r.connection == request.connection)
            if on_connection > 1:
                self.dropped += 1
                return False
            return await super().respond(request, writer)
        await super().respond(request, writer)
        return False


class TLSUpstream(EchoUpstream):
    """An echo server over TLS with a certificate from `ca` for localhost, 127.0.0.1 and
    `tollgate.test`; `server_names` records the SNI of every handshake (None without SNI)."""

    scheme = "https"
    NAMES = ("localhost", "127.0.0.1", "tollgate.test")

    def __init__(self, ca: trustme.CA) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*self.NAMES).configure_cert(context)
        context.sni_callback = self._record_sni
        super().__init__(context)
        self.server_names: list[str | None] = []

    def _record_sni(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        self.server_names.append(name)


class BacklogFullUpstream:
    """A listening socket whose accept queue is full and never drained: on Linux new SYNs are
    dropped, so a connect to it hangs until the client's own timeout (no routing tricks)."""

    FILLERS = 4

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._fillers: list[socket.socket] = []
        for _ in range(self.FILLERS):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self._fillers.append(filler)

    def close(self) -> None:
        for sock in (*self._fillers, self.listener):
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- an application upstream ----------------------------------------------------------------

DOWNLOAD_PIECE = bytes(range(256)) * 256  # 64 KiB


def download_bytes(size: int) -> bytes:
    """What `GET /download?size=N` on `AppUpstream` sends."""
    whole, rest = divmod(size, len(DOWNLOAD_PIECE))
    return DOWNLOAD_PIECE * whole + DOWNLOAD_PIECE[:rest]


class AppUpstream:
    """An aiohttp.web upstream.

    - `GET /json`: `{"ok": true, "method", "path", "query", "headers"}`;
    - `POST /echo`: the body back with its Content-Type, plus `X-Body-Sha256` and
      `X-Request-Chunked` (whether it came chunked);
    - `GET /download?size=N`: N bytes (`download_bytes`) streamed in chunked 64 KiB writes.
    Every response carries `X-Upstream: app`.
    """

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/json", self._json)
        app.router.add_post("/echo", self._echo)
        app.router.add_get("/download", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    _HEADERS = {"X-Upstream": "app"}

    async def _json(self, request: web.Request) -> web.Response:
        payload = {
            "ok": True,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
        }
        return web.json_response(payload, headers=self._HEADERS)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {
            **self._HEADERS,
            "X-Body-Sha256": hashlib.sha256(body).hexdigest(),
            "X-Request-Chunked": str(request.headers.get("Transfer-Encoding") == "chunked"),
        }
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        return web.Response(body=body, headers={**headers, "Content-Type": content_type})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse(headers=self._HEADERS)
        response.content_type = "application/octet-stream"
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = download_bytes(size)
        for start in range(0, size, len(DOWNLOAD_PIECE)):
            await response.write(data[start : start + len(DOWNLOAD_PIECE)])
        await response.write_eof()
        return response
