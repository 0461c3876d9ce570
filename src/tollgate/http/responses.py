"""Gateway-made responses: the one place that renders errors.

Every answer the gateway makes itself (not the upstream's) is a `GatewayResponse`; errors have
the JSON shape of DESIGN §4: ``{"error": {"type", "message", "request_id"}}``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import orjson

# Statuses after which the client connection cannot be trusted to be in sync (the request
# body may be unread or the framing broken), so the gateway closes it.
CLOSE_AFTER: Final = frozenset({400, 408, 413, 431})

# Statuses that carry Retry-After when the gateway makes them (DESIGN §4).
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}


class GatewayResponse:
    """A complete response made by the gateway: status, extra headers, body."""

    __slots__ = ("body", "close", "error_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        content_type: bytes | None = b"application/json",
        error_type: str | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type is not None and body:
            self.headers.append((b"Content-Type", content_type))
        self.error_type = error_type
        self.close = close or status in CLOSE_AFTER

    def head(
        self,
        version: bytes,
        extra: list[tuple[bytes, bytes]],
        keep_alive: bool,
        no_body: bool,
        block: bytes = b"",
    ) -> bytes:
        """Serialise status line and headers; `no_body` for HEAD (Content-Length still sent).

        `block`: header lines already serialised, sent after `extra`."""
        parts = [
            b"HTTP/",
            version,
            b" ",
            str(self.status).encode(),
            b" ",
            _REASONS.get(self.status, b"Unknown"),
            b"\r\n",
        ]
        for name, value in self.headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if block:
            parts.append(block)
        if self.status >= 200 and self.status not in (204, 304):
            parts += (b"Content-Length: ", str(len(self.body)).encode(), b"\r\n")
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"GatewayResponse({self.status}, {len(self.body)} bytes, type={self.error_type})"


def error_response(
    status: int,
    error_type: str,
    message: str,
    request_id: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    retry_after: int | None = None,
) -> GatewayResponse:
    """The gateway's JSON error; 429/503 always carry Retry-After (1 s unless given)."""
    body = orjson.dumps(
        {"error": {"type": error_type, "message": message, "request_id": request_id}}
    )
    hdrs = list(headers) if headers else []
    if status in RETRY_AFTER_STATUSES or retry_after is not None:
        hdrs.append((b"Retry-After", str(max(1, retry_after or 1)).encode()))
    return GatewayResponse(status, body, hdrs, error_type=error_type)
