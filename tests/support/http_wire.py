"""A raw HTTP/1.1 client for conformance tests: exact bytes out, responses parsed by hand.

No HTTP library sits between the test and the listener, so a test sees what the gateway
really wrote: interim responses, framing, `Connection: close`, and whether the socket closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

# How long a test waits for bytes the gateway owes it; far above any healthy answer time.
READ_TIMEOUT = 5.0
# How long a test waits to see whether the gateway closed a connection.
CLOSE_TIMEOUT = 2.0


class ProtocolViolation(AssertionError):
    """The gateway wrote something that is not a valid HTTP/1.1 response."""


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        """The response announces that the connection ends after it."""
        connection = self.header("connection") or ""
        return "close" in {token.strip().lower() for token in connection.split(",")}


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\r\n")
    return line[:-2]


async def _read_head(reader: asyncio.StreamReader) -> RawResponse:
    status_line = await _read_line(reader)
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise ProtocolViolation(f"bad status line {status_line!r}")
    response = RawResponse(int(code), reason.decode("latin-1"))
    while True:
        line = await _read_line(reader)
        if not line:
            return response
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolViolation(f"bad header line {line!r}")
        response.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await _read_line(reader)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while await _read_line(reader):  # trailers, up to the blank line
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolViolation("chunk data not followed by CRLF")


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> RawResponse:
    """Read one response, an interim (1xx) one included; the body as its framing says."""
    async with asyncio.timeout(READ_TIMEOUT):
        response = await _read_head(reader)
        if method == "HEAD" or response.status < 200 or response.status in (204, 304):
            return response
        encoding = response.header("transfer-encoding")
        length = response.header_values("content-length")
        if encoding is not None:
            if length:
                raise ProtocolViolation("both Transfer-Encoding and Content-Length")
            if encoding.strip().lower() != "chunked":
                raise ProtocolViolation(f"unexpected Transfer-Encoding {encoding!r}")
            response.body = await _read_chunked(reader)
        elif length:
            if len(length) != 1:
                raise ProtocolViolation(f"several Content-Length headers: {length}")
            response.body = await reader.readexactly(int(length[0]))
        else:
            response.body = await reader.read()
        return response


class RawClient:
    """One client connection that writes exact bytes and reads raw responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, *, ssl_context: ssl.SSLContext | None = None, server_hostname: str = ""
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context, server_hostname=server_hostname or None
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_byte_by_byte(self, data: bytes) -> None:
        """Write one byte at a time, yielding between writes so each can arrive on its own."""
        for index in range(len(data)):
            self.writer.write(data[index : index + 1])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def send_until_answered(self, data: bytes, piece_size: int = 1) -> RawResponse:
        """Write `data` in pieces, stopping once a response arrives; return that response.

        A server that answers early and closes resets the connection if more bytes arrive,
        which can discard its answer before it is read: a real client stops writing too.
        """
        reply = asyncio.create_task(self.response())
        for start in range(0, len(data), piece_size):
            if reply.done():
                break
            try:
                await self.send(data[start : start + piece_size])
            except ConnectionError:
                break
            await asyncio.sleep(0)
        return await reply

    async def response(self, method: str = "GET") -> RawResponse:
        return await read_response(self.reader, method)

    async def is_closed(self) -> bool:
        """True if the peer closed (EOF or reset) within CLOSE_TIMEOUT with nothing more to read."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                data = await self.reader.read(1)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        if data:
            raise ProtocolViolation(f"unexpected bytes after the response: {data!r}")
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    version: str = "1.1",
    host: str | None = "gateway.test",
) -> bytes:
    """Serialise a request; Content-Length is added for a body unless a framing header is set."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    given = {name.lower() for name, _ in headers or ()}
    for name, value in headers or ():
        lines.append(f"{name}: {value}")
    if body and not given & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces: bytes) -> bytes:
    """A chunked body of these pieces, with the last chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces if piece) + (
        b"0\r\n\r\n"
    )
