"""The ceiling of the data plane's stack: a featureless reverse proxy on uvloop + httptools.

No routing, no policies, no header rewriting, no timeouts: a pool of upstream connections and
two parsers. Whatever this reaches on a machine is the most any gateway built on
`asyncio.Protocol` + httptools can reach there, so it separates what Tollgate's own code costs
from what the stack costs. GET only (a response to HEAD would stall its pooled connection).

    taskset -c 0 python bench/floor_proxy.py 18490 18181 &      # listen port, upstream port
    taskset -c 1 wrk -t1 -c64 -d15s http://127.0.0.1:18490/json
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

POOL_SIZE = 128


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []
        self.out = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parts = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.transport.write(b"".join(self.out))
        self.pool.append(self)


class Client(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parts = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.head = b"".join(parts)

    def on_message_complete(self) -> None:
        upstream = self.pool.pop()
        upstream.client = self
        upstream.transport.write(self.head)


async def main(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    for _ in range(POOL_SIZE):
        _, upstream = await loop.create_connection(
            lambda: Upstream(pool), "127.0.0.1", upstream_port
        )
        pool.append(upstream)
    server = await loop.create_server(lambda: Client(pool), "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
