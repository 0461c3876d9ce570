"""HTTP/1.1 conformance of the listener, over raw sockets, in front of a real upstream.

Pins the guarantees listed in tollgate.http.server: keep-alive and pipelining, streamed bodies,
100-continue, bodiless responses, limits and timeouts, refusal of request smuggling, the
gateway's own errors, WebSocket tunnelling and TLS termination. Every case with a bad request
also checks that the worker still serves a fresh connection afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from http_wire import RawClient, RawResponse, chunked, request
from recording_upstream import RecordingUpstream
from websockets.asyncio.client import connect as websocket_connect

from tollgate.runtime.worker import Gateway

pytestmark = pytest.mark.timeout(30)

GatewayStarter = Callable[[dict[str, Any]], Awaitable[Gateway]]

API_KEY = "conformance-key"
# Small limits for the strict gateway, so that each breach costs a few bytes or milliseconds.
STRICT_LIMITS = {
    "max_request_line": 1024,
    "max_header_size": 4096,
    "max_headers": 20,
    "max_body_size": 1024,
    "header_timeout": 0.3,
    "body_timeout": 0.3,
    "keepalive_timeout": 0.3,
}
LARGE_BODY_SIZE = 4 * 1024 * 1024
# The part of a large body sent before waiting for the upstream to see it: below the listener's
# connect-time buffer (BODY_BUFFER_HIGH), far below the whole body.
FIRST_PART = 64 * 1024
# How long the upstream may take to see the first bytes of a streamed body.
STREAM_WAIT = 3.0


def config(
    upstream: RecordingUpstream, limits: dict[str, Any] | None = None, **gateway: Any
) -> dict[str, Any]:
    """One upstream behind open routes, a GET-only route and a key-auth route."""
    return {
        "gateway": {"listen": "127.0.0.1:0", "limits": limits or {}, **gateway},
        "admin": {"listen": None},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream.url}]}],
        "services": [
            {
                "name": "open",
                "upstream": "backend",
                "routes": [
                    {"name": "open", "paths": ["/open"]},
                    {"name": "get-only", "paths": ["=/get-only"], "methods": ["GET"]},
                    {"name": "websocket", "paths": ["/ws"]},
                ],
            },
            {
                "name": "secure",
                "upstream": "backend",
                "routes": [{"name": "secure", "paths": ["/secure"]}],
                "policies": [{"key-auth": {}}],
            },
        ],
        "consumers": [{"name": "acme", "keys": [API_KEY]}],
    }


@pytest.fixture
async def gateway(upstream: RecordingUpstream, start_gateway: GatewayStarter) -> Gateway:
    """A gateway with the default listener limits."""
    return await start_gateway(config(upstream))


@pytest.fixture
async def strict_gateway(upstream: RecordingUpstream, start_gateway: GatewayStarter) -> Gateway:
    """A gateway with STRICT_LIMITS."""
    return await start_gateway(config(upstream, STRICT_LIMITS))


async def connect(gw: Gateway) -> RawClient:
    return await RawClient.open(gw.port)


def get(target: str, headers: list[tuple[str, str]] | None = None, **kwargs: Any) -> bytes:
    return request("GET", target, headers, **kwargs)


async def assert_worker_serves(gw: Gateway) -> None:
    """A fresh connection still gets a proxied 200."""
    async with await connect(gw) as client:
        await client.send(get("/open/alive"))
        response = await client.response()
        assert response.status == 200
        assert response.body == b"GET /open/alive 0"


def assert_gateway_error(response: RawResponse, status: int, error_type: str) -> None:
    """The gateway's JSON error shape, with X-Request-Id equal to the body's request_id."""
    assert response.status == status, response
    assert response.header("content-type") == "application/json"
    assert response.header("content-length") == str(len(response.body))
    error = response.json()["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert error["type"] == error_type
    assert error["message"]
    assert error["request_id"]
    assert response.header("x-request-id") == error["request_id"]


async def assert_refused_and_closed(
    client: RawClient,
    gw: Gateway,
    status: int,
    error_type: str,
    response: RawResponse | None = None,
) -> None:
    """The gateway's error (read now unless given) ends the connection; the worker lives on."""
    if response is None:
        response = await client.response()
    assert_gateway_error(response, status, error_type)
    assert response.closes
    assert await client.is_closed()
    await assert_worker_serves(gw)


# -- keep-alive ------------------------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        for index in range(4):
            await client.send(get(f"/open/item/{index}"))
            response = await client.response()
            assert response.status == 200
            assert response.body == f"GET /open/item/{index} 0".encode()
            assert not response.closes
            assert response.header("x-request-id")
            assert response.header("via") == "1.1 tollgate"


async def test_http10_request_without_keep_alive_closes_the_connection(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(get("/open/old", version="1.0", host=None))
        response = await client.response()
        assert response.status == 200
        assert response.body == b"GET /open/old 0"
        assert response.closes
        assert await client.is_closed()
    assert upstream.requests[0].header("host") == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize(("target", "status"), [("/open/old", 200), ("/nowhere", 404)])
async def test_http10_request_with_keep_alive_is_told_the_connection_persists(
    gateway: Gateway, target: str, status: int
) -> None:
    async with await connect(gateway) as client:
        for _ in range(2):
            await client.send(get(target, [("Connection", "keep-alive")], version="1.0"))
            response = await client.response()
            assert response.status == status
            # An HTTP/1.0 client takes the connection as closing unless told otherwise.
            assert response.header("connection") == "keep-alive"


async def test_keepalive_requests_limit_closes_after_the_last_allowed_request(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gw = await start_gateway(config(upstream, {"keepalive_requests": 2}))
    async with await connect(gw) as client:
        await client.send(get("/open/one"))
        assert not (await client.response()).closes
        await client.send(get("/open/two"))
        response = await client.response()
        assert (response.status, response.body) == (200, b"GET /open/two 0")
        assert response.closes
        assert await client.is_closed()
    await assert_worker_serves(gw)


async def test_connection_close_is_honoured(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(get("/open/last", [("Connection", "close")]))
        response = await client.response()
        assert response.status == 200
        assert response.body == b"GET /open/last 0"
        assert response.closes
        assert await client.is_closed()


async def test_connection_close_on_a_gateway_error_is_honoured(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(get("/nowhere", [("Connection", "close")]))
        response = await client.response()
        assert_gateway_error(response, 404, "not_found")
        assert response.closes
        assert await client.is_closed()


# -- pipelining ------------------------------------------------------------------------------

PIPELINE = (
    get("/open/first")
    + get("/nowhere")
    + request("POST", "/open/second", [("Content-Type", "text/plain")], b"a body\r\nwith CRLF")
    + request("PUT", "/open/third", [("Transfer-Encoding", "chunked")], chunked(b"chunk", b"ed"))
    + get("/open/fourth")
)


async def read_pipeline_answers(client: RawClient) -> None:
    first, missing, second, third, fourth = [await client.response() for _ in range(5)]
    assert (first.status, first.body) == (200, b"GET /open/first 0")
    assert_gateway_error(missing, 404, "not_found")
    assert (second.status, second.body) == (200, b"POST /open/second 17")
    assert (third.status, third.body) == (200, b"PUT /open/third 7")
    assert (fourth.status, fourth.body) == (200, b"GET /open/fourth 0")
    assert not any(r.closes for r in (first, missing, second, third, fourth))


async def test_pipelined_requests_in_one_write_are_answered_in_order(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(PIPELINE)
        await read_pipeline_answers(client)
        await client.send(get("/open/after"))
        assert (await client.response()).status == 200
    bodies = [r.body for r in upstream.requests]
    assert bodies == [b"", b"a body\r\nwith CRLF", b"chunked", b"", b""]


async def test_pipelined_requests_sent_byte_by_byte_are_answered_in_order(
    gateway: Gateway,
) -> None:
    async with await connect(gateway) as client:
        await client.send_byte_by_byte(PIPELINE)
        await read_pipeline_answers(client)


# -- request bodies --------------------------------------------------------------------------

EVERY_BYTE = bytes(range(256)) * 4


async def test_content_length_body_reaches_the_upstream_exactly(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(request("POST", "/open/upload?x=1", body=EVERY_BYTE))
        response = await client.response()
    assert (response.status, response.body) == (200, b"POST /open/upload?x=1 1024")
    (received,) = upstream.requests
    assert received.body == EVERY_BYTE
    assert received.header("content-length") == "1024"
    assert received.header("transfer-encoding") is None


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["one-write", "byte-by-byte"])
async def test_chunked_body_reaches_the_upstream_exactly(
    gateway: Gateway, upstream: RecordingUpstream, byte_by_byte: bool
) -> None:
    pieces = [EVERY_BYTE[:100], b"0\r\n\r\n", EVERY_BYTE[100:]]
    # Chunk extensions and trailers are legal and must not leak into the payload.
    body = (
        b"64;name=value\r\n" + pieces[0] + b"\r\n" + chunked(*pieces[1:])[:-2] + b"X-T: 1\r\n\r\n"
    )
    data = request("POST", "/open/upload", [("Transfer-Encoding", "chunked")], body)
    async with await connect(gateway) as client:
        if byte_by_byte:
            await client.send_byte_by_byte(data)
        else:
            await client.send(data)
        response = await client.response()
        assert (response.status, response.body) == (200, b"POST /open/upload 1029")
    (received,) = upstream.requests
    assert received.body == b"".join(pieces)
    assert received.header("transfer-encoding") == "chunked"
    assert received.header("content-length") is None


async def send_large_body_in_two_parts(
    gw: Gateway, upstream: RecordingUpstream, head: bytes, first: bytes, rest: bytes
) -> RawResponse:
    """Send the head and `first`, wait until the upstream reads body bytes, then send `rest`."""
    async with await connect(gw) as client:
        await client.send(head + first)
        # A listener that buffered whole bodies would never let the upstream see the start.
        await asyncio.wait_for(upstream.body_started.wait(), STREAM_WAIT)
        assert upstream.requests == []
        await client.send(rest)
        return await client.response()


async def test_large_content_length_body_is_streamed_not_buffered(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    body = hashlib.shake_256(b"large").digest(LARGE_BODY_SIZE)
    head = request("PUT", "/open/large", [("Content-Length", str(len(body)))])
    response = await send_large_body_in_two_parts(
        gateway, upstream, head, body[:FIRST_PART], body[FIRST_PART:]
    )
    assert (response.status, response.body) == (200, b"PUT /open/large %d" % LARGE_BODY_SIZE)
    assert upstream.requests[0].body == body


async def test_large_chunked_body_is_streamed_not_buffered(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    body = hashlib.shake_256(b"large").digest(LARGE_BODY_SIZE)
    head = request("PUT", "/open/large", [("Transfer-Encoding", "chunked")])
    pieces = [body[i : i + FIRST_PART] for i in range(0, len(body), FIRST_PART)]
    response = await send_large_body_in_two_parts(
        gateway, upstream, head, chunked(pieces[0])[:-5], chunked(*pieces[1:])
    )
    assert (response.status, response.body) == (200, b"PUT /open/large %d" % LARGE_BODY_SIZE)
    assert upstream.requests[0].body == body


# -- Expect: 100-continue --------------------------------------------------------------------


async def test_expect_continue_gets_100_before_the_final_response(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(
            request("POST", "/open/expect", [("Expect", "100-continue"), ("Content-Length", "5")])
        )
        interim = await client.response()
        assert (interim.status, interim.headers, interim.body) == (100, [], b"")
        await client.send(b"hello")
        response = await client.response()
        assert (response.status, response.body) == (200, b"POST /open/expect 5")
        await client.send(get("/open/next"))
        assert (await client.response()).status == 200
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("expect") is None


async def test_expect_continue_refused_by_key_auth_gets_401_without_100(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(
            request("POST", "/secure/x", [("Expect", "100-continue"), ("Content-Length", "5")])
        )
        response = await client.response()
        assert_gateway_error(response, 401, "unauthorized")
        assert response.header("www-authenticate")
        # The client may or may not send the body it announced: the gateway does not guess.
        assert response.closes
        assert await client.is_closed()
    assert upstream.requests == []
    await assert_worker_serves(gateway)


async def test_expect_continue_over_the_body_limit_gets_413_without_100(
    strict_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(
            request("POST", "/open/big", [("Expect", "100-continue"), ("Content-Length", "2048")])
        )
        await assert_refused_and_closed(client, strict_gateway, 413, "request_body_too_large")
    assert [r.target for r in upstream.requests] == ["/open/alive"]


async def test_admitted_expect_continue_with_key_gets_100(gateway: Gateway) -> None:
    headers = [("Expect", "100-continue"), ("Content-Length", "2"), ("X-Api-Key", API_KEY)]
    async with await connect(gateway) as client:
        await client.send(request("POST", "/secure/x", headers))
        assert (await client.response()).status == 100
        await client.send(b"ok")
        assert (await client.response()).body == b"POST /secure/x 2"


async def test_request_refused_before_its_body_keeps_the_connection(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(request("POST", "/secure/x", body=b"unwanted body"))
        response = await client.response()
        assert_gateway_error(response, 401, "unauthorized")
        assert not response.closes
        await client.send(get("/open/next"))
        assert (await client.response()).body == b"GET /open/next 0"
    assert [r.target for r in upstream.requests] == ["/open/next"]


# -- responses without a body ----------------------------------------------------------------


async def test_head_gets_the_headers_and_no_body(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(request("HEAD", "/open/page"))
        response = await client.response("HEAD")
        assert response.status == 200
        assert response.header("content-length") == str(len(b"HEAD /open/page 0"))
        # Any body bytes would be read as the start of the next response.
        await client.send(get("/open/page"))
        response = await client.response()
        assert (response.status, response.body) == (200, b"GET /open/page 0")


async def test_head_of_a_gateway_error_has_no_body(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(request("HEAD", "/nowhere"))
        response = await client.response("HEAD")
        assert response.status == 404
        assert int(response.header("content-length") or 0) > 0
        await client.send(get("/open/page"))
        assert (await client.response()).body == b"GET /open/page 0"


@pytest.mark.parametrize("status", [204, 304])
async def test_upstream_bodiless_status_has_no_body_and_keeps_the_connection(
    gateway: Gateway, status: int
) -> None:
    async with await connect(gateway) as client:
        for _ in range(2):
            await client.send(get(f"/open/status/{status}"))
            response = await client.response()
            assert response.status == status
            assert response.header("transfer-encoding") is None
            assert not response.closes
        await client.send(get("/open/page"))
        assert (await client.response()).body == b"GET /open/page 0"


# -- limits ----------------------------------------------------------------------------------


async def test_request_line_too_long_gets_414(strict_gateway: Gateway) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(get("/open/" + "a" * 2000))
        await assert_refused_and_closed(client, strict_gateway, 414, "uri_too_long")


@pytest.mark.parametrize("piece_size", [1 << 20, 320], ids=["one-write", "in-pieces"])
async def test_header_block_too_large_gets_431(strict_gateway: Gateway, piece_size: int) -> None:
    data = get("/open/x", [("X-Large", "v" * 5000)])
    async with await connect(strict_gateway) as client:
        response = await client.send_until_answered(data, piece_size)
        await assert_refused_and_closed(
            client, strict_gateway, 431, "request_header_too_large", response
        )


async def test_too_large_header_block_after_a_body_in_the_same_read_gets_431(
    strict_gateway: Gateway,
) -> None:
    # The first request is answered by the gateway itself, before the next head is parsed.
    data = request("POST", "/nowhere", body=b"b" * 500) + get("/open/x", [("X-L", "v" * 5000)])
    async with await connect(strict_gateway) as client:
        await client.send(data)
        assert_gateway_error(await client.response(), 404, "not_found")
        await assert_refused_and_closed(client, strict_gateway, 431, "request_header_too_large")


async def test_bad_request_pipelined_behind_a_proxied_one_is_answered_in_order_then_closes(
    strict_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    data = request("POST", "/open/small", body=b"b" * 500) + get("/open/x", [("X-L", "v" * 5000)])
    async with await connect(strict_gateway) as client:
        await client.send(data)
        response = await client.response()
        assert (response.status, response.body) == (200, b"POST /open/small 500")
        assert not response.closes
        error = await client.response()
        assert error.status == 431
        assert error.json()["error"]["type"] == "request_header_too_large"
        assert error.closes
        assert await client.is_closed()
    await assert_worker_serves(strict_gateway)
    assert [r.target for r in upstream.requests] == ["/open/small", "/open/alive"]


async def test_small_head_sharing_a_large_read_with_a_body_is_accepted(gateway: Gateway) -> None:
    body = b"z" * (256 * 1024)
    async with await connect(gateway) as client:
        await client.send(request("POST", "/open/upload", body=body) + get("/open/next"))
        first, second = await client.response(), await client.response()
    assert (first.status, first.body) == (200, b"POST /open/upload 262144")
    assert (second.status, second.body) == (200, b"GET /open/next 0")


async def test_too_many_headers_gets_431(strict_gateway: Gateway) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(get("/open/x", [(f"X-H{i}", "1") for i in range(25)]))
        await assert_refused_and_closed(client, strict_gateway, 431, "request_header_too_large")


async def test_body_over_the_limit_by_content_length_gets_413_without_reading_it(
    strict_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(strict_gateway) as client:
        # No body is sent: the answer must come from the declared length alone.
        await client.send(request("POST", "/open/big", [("Content-Length", "1048576")]))
        await assert_refused_and_closed(client, strict_gateway, 413, "request_body_too_large")
    assert [r.target for r in upstream.requests] == ["/open/alive"]


async def test_chunked_body_passing_the_limit_gets_413_and_closes(
    strict_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    head = request("POST", "/open/big", [("Transfer-Encoding", "chunked")])
    async with await connect(strict_gateway) as client:
        await client.send(head + chunked(b"x" * 600)[:-5])
        await client.send(chunked(b"y" * 600)[:-5])
        await assert_refused_and_closed(client, strict_gateway, 413, "request_body_too_large")
    # The upstream never got a complete request.
    assert [r.target for r in upstream.requests] == ["/open/alive"]


async def test_header_read_timeout_gets_408_and_closes(strict_gateway: Gateway) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(b"GET /open/slow HTTP/1.1\r\nHost: gateway.test\r\n")
        await assert_refused_and_closed(client, strict_gateway, 408, "request_timeout")


async def test_body_read_timeout_gets_408_and_closes(
    strict_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(request("POST", "/open/slow", [("Content-Length", "10")]) + b"abc")
        await assert_refused_and_closed(client, strict_gateway, 408, "request_timeout")
    assert [r.target for r in upstream.requests] == ["/open/alive"]


async def test_idle_keep_alive_connection_is_closed_silently(strict_gateway: Gateway) -> None:
    async with await connect(strict_gateway) as client:
        await client.send(get("/open/once"))
        response = await client.response()
        assert response.status == 200
        assert not response.closes
        # is_closed fails on any byte: the close must come with no response.
        assert await client.is_closed()
    await assert_worker_serves(strict_gateway)


async def test_connection_that_never_sends_is_closed_silently(strict_gateway: Gateway) -> None:
    async with await connect(strict_gateway) as client:
        assert await client.is_closed()


# -- request smuggling -----------------------------------------------------------------------

# A request that must never reach the upstream: it rides behind each malformed one.
SMUGGLED = b"GET /open/smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"

SMUGGLING = {
    "content-length-and-transfer-encoding": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-and-content-length": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "duplicate-content-length-same": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "duplicate-content-length-different": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 0\r\n\r\nabc"
    ),
    "content-length-abc": b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
    "content-length-negative": b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "content-length-list": b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: 1,2\r\n\r\nab",
    "content-length-plus": b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "transfer-encoding-gzip": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-chunked-then-gzip": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-identity": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-chunked-twice-in-one-field": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding-chunked-duplicated": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "obsolete-line-folding-space": (
        b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n"
    ),
    "obsolete-line-folding-tab": (
        b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n\ttwo\r\n\r\n"
    ),
    "folded-transfer-encoding": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n"
        b" chunked\r\n\r\n0\r\n\r\n"
    ),
    "bare-cr-in-header-value": b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-A: one\rtwo\r\n\r\n",
    "bare-lf-in-header-block": b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-A: one\nX-B: two\r\n\r\n",
    "bare-lf-ending-the-head": b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-A: one\n\n",
    "chunk-size-not-hex": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n"
        b"0\r\n\r\n"
    ),
    "chunk-data-without-crlf": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n"
        b"0\r\n\r\n"
    ),
    "chunk-size-overflow": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10000000000000000\r\nab\r\n0\r\n\r\n"
    ),
    "space-before-colon": b"GET /open/s HTTP/1.1\r\nHost: a\r\nX-A : one\r\n\r\n",
    "space-before-colon-content-length": (
        b"POST /open/s HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc"
    ),
    "missing-host": b"GET /open/s HTTP/1.1\r\nX-A: one\r\n\r\n",
    "duplicate-host": b"GET /open/s HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["one-write", "byte-by-byte"])
@pytest.mark.parametrize("data", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_request_smuggling_attempt_gets_400_and_closes(
    gateway: Gateway, upstream: RecordingUpstream, data: bytes, byte_by_byte: bool
) -> None:
    async with await connect(gateway) as client:
        if byte_by_byte:
            response = await client.send_until_answered(data + SMUGGLED)
        else:
            await client.send(data + SMUGGLED)
            response = await client.response()
        assert_gateway_error(response, 400, "bad_request")
        assert response.closes
        assert await client.is_closed()
    await assert_worker_serves(gateway)
    assert [r.target for r in upstream.requests] == ["/open/alive"]


# -- errors the gateway makes ----------------------------------------------------------------


async def test_unknown_route_gets_a_json_404_and_keeps_the_connection(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(get("/nowhere"))
        response = await client.response()
        assert_gateway_error(response, 404, "not_found")
        assert not response.closes
        await client.send(get("/open/next"))
        assert (await client.response()).status == 200


async def test_wrong_method_gets_a_json_405_with_allow(gateway: Gateway) -> None:
    async with await connect(gateway) as client:
        await client.send(request("DELETE", "/get-only"))
        response = await client.response()
        assert_gateway_error(response, 405, "method_not_allowed")
        assert response.header("allow") == "GET"
        await client.send(get("/get-only"))
        assert (await client.response()).body == b"GET /get-only 0"


async def test_client_request_id_is_kept_in_errors_and_sent_upstream(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with await connect(gateway) as client:
        await client.send(get("/nowhere", [("X-Request-Id", "client-id-1")]))
        response = await client.response()
        assert_gateway_error(response, 404, "not_found")
        assert response.json()["error"]["request_id"] == "client-id-1"
        await client.send(get("/open/x", [("X-Request-Id", "client-id-2")]))
        response = await client.response()
        assert response.header("x-request-id") == "client-id-2"
    assert upstream.requests[0].header("x-request-id") == "client-id-2"


# -- Upgrade ---------------------------------------------------------------------------------


async def test_websocket_upgrade_is_tunnelled_both_ways(
    gateway: Gateway, upstream: RecordingUpstream
) -> None:
    async with websocket_connect(f"ws://127.0.0.1:{gateway.port}/ws") as websocket:
        assert websocket.response is not None
        assert websocket.response.status_code == 101
        assert await websocket.recv() == "hello"
        for index in range(3):
            await websocket.send(f"message {index}")
            assert await websocket.recv() == f"echo:message {index}"
    await assert_worker_serves(gateway)


async def test_websocket_handshake_over_raw_socket_gets_101(gateway: Gateway) -> None:
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    async with await connect(gateway) as client:
        await client.send(get("/ws", headers))
        response = await client.response()
        assert response.status == 101
        assert response.header("upgrade") == "websocket"
        assert response.header("connection") == "upgrade"
        assert response.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        # The upstream's unmasked text frame "hello" arrives through the tunnel.
        assert await client.reader.readexactly(7) == b"\x81\x05hello"


# -- TLS termination -------------------------------------------------------------------------


async def test_tls_termination_serves_a_verifying_client(
    upstream: RecordingUpstream, start_gateway: GatewayStarter, tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(cert_path)
    for pem in certificate.cert_chain_pems[1:]:
        pem.write_to_path(cert_path, append=True)
    certificate.private_key_pem.write_to_path(key_path)
    gw = await start_gateway(config(upstream, tls={"cert": str(cert_path), "key": str(key_path)}))
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    async with await RawClient.open(
        gw.port, ssl_context=client_context, server_hostname="localhost"
    ) as client:
        await client.send(get("/open/secure-channel"))
        response = await client.response()
        assert (response.status, response.body) == (200, b"GET /open/secure-channel 0")
        ssl_object = client.writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
    (received,) = upstream.requests
    assert received.header("x-forwarded-proto") == "https"


async def test_client_still_uploading_after_an_early_413_reads_the_answer(
    strict_gateway: Gateway,
) -> None:
    """The gateway half-closes and drains instead of resetting: the 413 is not lost."""
    body = b"u" * (2 * 1024 * 1024)
    async with await connect(strict_gateway) as client:
        head = request("POST", "/open/big", [("Content-Length", str(len(body)))])
        # A naive client sends everything before it reads; much is still unread at the gateway
        # when it answers. A plain close would then reset the connection and drop the answer.
        client.writer.write(head + body)
        with contextlib.suppress(ConnectionError):
            await client.writer.drain()
        await asyncio.sleep(0.2)  # let any reset arrive before reading
        response = await client.response()
        assert_gateway_error(response, 413, "request_body_too_large")
    await assert_worker_serves(strict_gateway)


async def test_websocket_tunnel_outlives_the_upstream_read_timeout(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    cfg = config(upstream)
    cfg["upstreams"][0]["timeouts"] = {"read": 0.2}
    gw = await start_gateway(cfg)
    async with websocket_connect(f"ws://127.0.0.1:{gw.port}/ws") as websocket:
        assert await websocket.recv() == "hello"
        # Both sides silent for longer than the read timeout: a tunnel has none.
        await asyncio.sleep(0.6)
        await websocket.send("late")
        assert await websocket.recv() == "echo:late"


async def test_a_failing_policy_gets_500_and_the_worker_survives(gateway: Gateway) -> None:
    def broken(ex: Any) -> None:
        raise RuntimeError("a bug in a policy")

    route = next(r for r in gateway.runtime.routes if r.name == "secure")
    route.access = (broken,)
    async with await connect(gateway) as client:
        await client.send(get("/secure/x"))
        await assert_refused_and_closed(client, gateway, 500, "internal_error")
