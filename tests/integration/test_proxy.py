"""The proxy against real upstream servers on loopback ports.

Forwarding headers, hop-by-hop rules, paths, streaming, connection pools, failures, load
balancing, TLS to upstreams, DNS, in-process reload, latency headers and the built-in policies.
The upstreams are in tests/support/upstreams.py; `start_gateway` is the integration fixture.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from http_wire import RawClient, RawResponse, chunked, request
from upstreams import (
    BacklogFullUpstream,
    ClosingUpstream,
    EchoUpstream,
    ResettingUpstream,
    SlowUpstream,
    StatusUpstream,
    StreamingUpstream,
    TLSUpstream,
    free_port,
    response_bytes,
)

from tollgate.config.loader import parse_config_data

# Short upstream timeouts keep the failure tests fast; far above a loopback round trip.
READ_TIMEOUT = 0.3
CONNECT_TIMEOUT = 0.2


def config(
    targets: list[str] | list[dict[str, Any]],
    *,
    upstream: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    consumers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One upstream `backend` and one service `api`; by default one route for every path."""
    return {
        "gateway": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "upstreams": [
            {
                "name": "backend",
                "targets": [t if isinstance(t, dict) else {"url": t} for t in targets],
                **(upstream or {}),
            }
        ],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": routes or [{"name": "main"}],
                **(service or {}),
            }
        ],
        "consumers": consumers or [],
    }


def echoed(body: bytes) -> dict[str, Any]:
    """The request an EchoUpstream received, from its answer."""
    seen: dict[str, Any] = json.loads(body)
    return seen


def values(seen: dict[str, Any], name: str) -> list[str]:
    """Every value of a header (name given lower-case) in the request the upstream received."""
    return [value for key, value in seen["headers"] if key.lower() == name]


@pytest.fixture
async def echo() -> AsyncIterator[EchoUpstream]:
    async with EchoUpstream() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def raw(port: int, data: bytes, method: str = "GET") -> RawResponse:
    """Send exact bytes on a new connection and read one response."""
    async with await RawClient.open(port) as client:
        await client.send(data)
        return await client.response(method)


# -- forwarding headers ------------------------------------------------------------------------


async def test_upstream_sees_forwarded_headers_appended_to_the_clients(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    headers = [("X-Forwarded-For", "203.0.113.7"), ("Via", "1.0 edge")]
    response = await raw(gw.port, request("GET", "/a", headers))
    seen = echoed(response.body)
    assert values(seen, "x-forwarded-for") == ["203.0.113.7, 127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == ["gateway.test"]
    assert values(seen, "via") == ["1.0 edge, 1.1 tollgate"]
    assert values(seen, "host") == [f"127.0.0.1:{echo.port}"]


async def test_upstream_sees_forwarded_for_and_via_of_its_own_when_the_client_sent_none(
    echo, start_gateway
):
    gw = await start_gateway(config([echo.url]))
    seen = echoed((await raw(gw.port, request("GET", "/a"))).body)
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "via") == ["1.1 tollgate"]
    assert values(seen, "x-forwarded-port") == [str(gw.port)]


async def test_client_request_id_reaches_the_upstream_and_comes_back(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    response = await raw(gw.port, request("GET", "/a", [("X-Request-Id", "client-id-1")]))
    assert values(echoed(response.body), "x-request-id") == ["client-id-1"]
    assert response.header_values("x-request-id") == ["client-id-1"]


async def test_generated_request_id_is_the_same_upstream_and_in_the_response(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    first = await raw(gw.port, request("GET", "/a"))
    second = await raw(gw.port, request("GET", "/a"))
    generated = first.header("x-request-id")
    assert generated
    assert values(echoed(first.body), "x-request-id") == [generated]
    assert second.header("x-request-id") != generated


async def test_host_is_the_targets_host_and_port(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    seen = echoed((await raw(gw.port, request("GET", "/a", host="public.example"))).body)
    assert values(seen, "host") == [f"127.0.0.1:{echo.port}"]


async def test_preserve_host_sends_the_clients_host(echo, start_gateway):
    gw = await start_gateway(config([echo.url], service={"preserve_host": True}))
    seen = echoed((await raw(gw.port, request("GET", "/a", host="public.example:8443"))).body)
    assert values(seen, "host") == ["public.example:8443"]


# -- hop-by-hop headers ------------------------------------------------------------------------


async def test_request_hop_by_hop_headers_are_removed_and_end_to_end_kept_in_order(
    echo, start_gateway
):
    gw = await start_gateway(config([echo.url]))
    headers = [
        ("X-First", "1"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "for the gateway only"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Upgrade", "h2c"),
        ("X-Second", "2"),
        ("Cookie", "a=1"),
        ("X-First", "3"),
    ]
    seen = echoed((await raw(gw.port, request("GET", "/a", headers))).body)
    names = [name.lower() for name, _ in seen["headers"]]
    for hop in (
        "connection",
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ):
        assert hop not in names
    end_to_end = [tuple(h) for h in seen["headers"] if h[0] in ("X-First", "X-Second", "Cookie")]
    assert end_to_end == [("X-First", "1"), ("X-Second", "2"), ("Cookie", "a=1"), ("X-First", "3")]


async def test_response_hop_by_hop_headers_are_removed_and_end_to_end_kept_in_order(
    start_gateway,
):
    hop_by_hop = [
        ("Connection", "X-Upstream-Hop"),
        ("X-Upstream-Hop", "1"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authenticate", "Basic"),
        ("Upgrade", "h2c"),
    ]
    end_to_end = [("X-End-1", "a"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-End-2", "b")]
    async with EchoUpstream(response_headers=hop_by_hop + end_to_end, chunked=True) as upstream:
        gw = await start_gateway(config([upstream.url]))
        response = await raw(gw.port, request("GET", "/a"))
    names = [name.lower() for name, _ in response.headers]
    for name, _ in hop_by_hop:
        assert name.lower() not in names
    kept = [
        (n, v) for n, v in response.headers if n.lower() in ("x-end-1", "set-cookie", "x-end-2")
    ]
    assert kept == end_to_end
    assert response.header_values("transfer-encoding") == ["chunked"]
    assert echoed(response.body)["path"] == "/a"
    # What the gateway adds after the upstream's headers survives their pruning.
    [request_id] = response.header_values("x-request-id")
    assert values(echoed(response.body), "x-request-id") == [request_id]
    assert response.header_values("via") == ["1.1 tollgate"]


async def test_chunked_upstream_response_reaches_an_http10_client_delimited_by_close(
    start_gateway,
):
    async with EchoUpstream(chunked=True) as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with await RawClient.open(gw.port) as client:
            await client.send(request("GET", "/old", version="1.0"))
            response = await client.response()
            assert await client.is_closed()
    assert response.header("transfer-encoding") is None
    assert response.header("content-length") is None
    assert echoed(response.body)["path"] == "/old"


async def test_chunked_request_body_is_reframed_chunked_upstream(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    headers = [("Transfer-Encoding", "chunked")]
    response = await raw(gw.port, request("POST", "/up", headers, chunked(b"hello ", b"world")))
    seen = echoed(response.body)
    assert values(seen, "transfer-encoding") == ["chunked"]
    assert values(seen, "content-length") == []
    assert seen["body"] == "hello world"


# -- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strip_path", "service_path", "expected"),
    [
        (True, "/v2", "/v2/42?b=1&a=%20x"),
        (False, "/v2", "/v2/orders/42?b=1&a=%20x"),
        (True, "", "/42?b=1&a=%20x"),
        (False, "", "/orders/42?b=1&a=%20x"),
    ],
)
async def test_strip_path_and_service_path_shape_the_upstream_target_and_keep_the_query(
    echo, start_gateway, strip_path, service_path, expected
):
    route = {"name": "orders", "paths": ["/orders"], "strip_path": strip_path}
    gw = await start_gateway(config([echo.url], service={"path": service_path}, routes=[route]))
    seen = echoed((await raw(gw.port, request("GET", "/orders/42?b=1&a=%20x"))).body)
    assert seen["target"] == expected


# -- streaming ---------------------------------------------------------------------------------


async def test_sse_events_reach_the_client_one_by_one_as_the_upstream_sends_them(
    start_gateway, http
):
    gate = asyncio.Event()
    async with StreamingUpstream(count=4, pause=0.05, gate=gate) as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with http.get(f"http://127.0.0.1:{gw.port}/sse") as response:
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert response.headers["Content-Type"] == "text/event-stream"
            # The upstream holds the other events back until the first one reached the client.
            events = [await response.content.readuntil(b"\n\n")]
            assert len(upstream.sent_at) == 1
            gate.set()
            while event := await response.content.readuntil(b"\n\n"):
                events.append(event)
    assert events == [b"data: event %d\n\n" % n for n in range(4)]


async def test_chunked_response_is_streamed_not_buffered(start_gateway):
    async with StreamingUpstream(count=3, pause=0.1) as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with await RawClient.open(gw.port) as client:
            await client.send(request("GET", "/lines"))
            head = await client.reader.readuntil(b"\r\n\r\n")
            await client.reader.readuntil(b"line 0\n")
            arrived = time.monotonic()
            rest = await client.reader.readuntil(b"0\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in head
    assert arrived < upstream.sent_at[-1]
    assert b"line 2\n" in rest


# -- bodiless answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [("/204", 204), ("/304", 304)])
async def test_bodiless_statuses_keep_both_connections_usable(start_gateway, path, status):
    async with StatusUpstream() as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with await RawClient.open(gw.port) as client:
            await client.send(request("GET", path))
            first = await client.response()
            await client.send(request("GET", "/after"))
            after = await client.response()
    assert first.status == status
    assert first.body == b""
    assert first.header("transfer-encoding") is None
    assert after.status == 200
    assert after.body == b"ok"
    assert upstream.accepted == 1


async def test_head_response_keeps_the_upstream_content_length_and_has_no_body(start_gateway):
    async with StatusUpstream() as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with await RawClient.open(gw.port) as client:
            await client.send(request("HEAD", "/file"))
            head = await client.response("HEAD")
            await client.send(request("GET", "/after"))
            after = await client.response()
    assert head.status == 200
    assert head.header("content-length") == str(StatusUpstream.HEAD_LENGTH)
    assert head.header("x-kind") == "head"
    assert after.body == b"ok"
    assert upstream.accepted == 1


# -- connection pools ----------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(echo, start_gateway):
    gw = await start_gateway(config([echo.url]))
    connector = aiohttp.TCPConnector(force_close=True)  # a new client connection each time
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(5):
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                assert echoed(await response.read())["connection"] == 1
    assert echo.accepted == 1


@pytest.mark.parametrize("mode", ["announce", "silent"])
async def test_upstream_closing_after_each_response_gets_a_fresh_connection_each_time(
    start_gateway, http, mode
):
    async with ClosingUpstream(mode) as upstream:
        gw = await start_gateway(config([upstream.url]))
        for _ in range(3):
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                assert response.status == 200
                await response.read()
    assert upstream.accepted == 3


async def test_get_on_a_kept_alive_connection_the_upstream_drops_is_retried_on_a_fresh_one(
    start_gateway, http
):
    async with ClosingUpstream("drop-second") as upstream:
        gw = await start_gateway(config([upstream.url]))
        for _ in range(2):
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                assert response.status == 200
                await response.read()
    assert upstream.dropped == 1
    assert upstream.accepted == 2


async def test_post_on_a_kept_alive_connection_the_upstream_drops_is_not_retried(
    start_gateway, http
):
    async with ClosingUpstream("drop-second") as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with http.post(f"http://127.0.0.1:{gw.port}/a") as first:
            assert first.status == 200
        async with http.post(f"http://127.0.0.1:{gw.port}/a") as second:
            assert second.status == 502
            assert (await second.json())["error"]["type"] == "upstream_protocol_error"
    assert upstream.accepted == 1


async def test_pool_limit_caps_open_upstream_connections_and_queues_the_rest(start_gateway, http):
    async with SlowUpstream(head_delay=0.05) as upstream:
        gw = await start_gateway(config([upstream.url], upstream={"pool": {"max_connections": 2}}))

        async def call() -> int:
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(10)))
    assert statuses == [200] * 10
    assert upstream.peak_open <= 2
    assert len(upstream.requests) == 10


async def test_pool_limit_lets_a_waiting_request_connect_when_the_upstream_closes_one(
    start_gateway, http
):
    async with ClosingUpstream("announce") as upstream:
        gw = await start_gateway(
            config(
                [upstream.url],
                upstream={"pool": {"max_connections": 2}, "timeouts": {"connect": 1.0}},
            )
        )

        async def call() -> int:
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(10)))
    assert statuses == [200] * 10
    assert upstream.peak_open <= 2


# -- failures ------------------------------------------------------------------------------------


async def test_refused_connection_is_a_502_in_the_error_shape(start_gateway, http):
    gw = await start_gateway(config([f"http://127.0.0.1:{free_port()}"]))
    async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"]["type"] == "upstream_connect_error"
    assert body["error"]["message"]
    assert body["error"]["request_id"] == response.headers["X-Request-Id"]


async def test_head_slower_than_the_read_timeout_is_a_504(start_gateway, http):
    async with SlowUpstream(head_delay=2.0) as upstream:
        gw = await start_gateway(
            config([upstream.url], upstream={"timeouts": {"read": READ_TIMEOUT}})
        )
        started = time.monotonic()
        async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
            body = await response.json()
        elapsed = time.monotonic() - started
    assert response.status == 504
    assert body["error"]["type"] == "upstream_timeout"
    assert READ_TIMEOUT <= elapsed < 1.0


async def test_read_timeout_applies_between_reads_not_to_the_whole_response(start_gateway, http):
    pieces = tuple(b"piece %d;" % n for n in range(5))
    async with SlowUpstream(pieces=pieces, piece_delay=READ_TIMEOUT / 3) as upstream:
        gw = await start_gateway(
            config([upstream.url], upstream={"timeouts": {"read": READ_TIMEOUT}})
        )
        started = time.monotonic()
        async with http.get(f"http://127.0.0.1:{gw.port}/trickle") as response:
            body = await response.read()
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert body == b"".join(pieces)
    assert elapsed > READ_TIMEOUT  # the whole body took longer than one read may


async def test_connect_that_does_not_complete_in_time_is_a_504(start_gateway, http):
    with BacklogFullUpstream() as upstream:
        gw = await start_gateway(
            config([upstream.url], upstream={"timeouts": {"connect": CONNECT_TIMEOUT}})
        )
        started = time.monotonic()
        async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
            body = await response.json()
        elapsed = time.monotonic() - started
    assert response.status == 504
    assert body["error"]["type"] == "upstream_timeout"
    assert CONNECT_TIMEOUT <= elapsed < 1.0


async def test_reset_mid_body_closes_the_client_connection_before_the_full_body(start_gateway):
    async with ResettingUpstream(declared=10_000, sent=1_000) as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with await RawClient.open(gw.port) as client:
            await client.send(request("GET", "/big"))
            async with asyncio.timeout(2):
                received = await client.reader.read(-1)  # everything up to the close
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 10000" in head
    assert body == b"x" * 1_000


async def test_get_is_retried_on_another_target_when_the_first_refuses(echo, start_gateway, http):
    refusing = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(config([refusing, echo.url]))  # round-robin starts with the first
    async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
        assert response.status == 200
        await response.read()
    assert len(echo.requests) == 1


async def test_post_is_not_retried_when_the_target_refuses(echo, start_gateway, http):
    refusing = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(config([refusing, echo.url]))
    async with http.post(f"http://127.0.0.1:{gw.port}/a", data=b"payload") as response:
        assert response.status == 502
        assert (await response.json())["error"]["type"] == "upstream_connect_error"
    assert echo.requests == []


# -- load balancing ------------------------------------------------------------------------------


async def test_weighted_round_robin_spreads_requests_by_weight(start_gateway, http):
    async with EchoUpstream() as a, EchoUpstream() as b, EchoUpstream() as c:
        targets = [{"url": a.url, "weight": 2}, {"url": b.url, "weight": 1}, {"url": c.url}]
        gw = await start_gateway(config(targets))
        for _ in range(400):
            async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
                assert response.status == 200
                await response.read()
        counts = [len(a.requests), len(b.requests), len(c.requests)]
    assert counts == [200, 100, 100]


async def test_consistent_hash_on_a_header_sends_each_user_to_one_target(start_gateway, http):
    async with EchoUpstream() as a, EchoUpstream() as b, EchoUpstream() as c:
        upstream = {"balance": "consistent-hash", "hash_on": "header:X-User"}
        gw = await start_gateway(config([a.url, b.url, c.url], upstream=upstream))
        for _ in range(3):
            for user in range(20):
                headers = {"X-User": f"user-{user}"}
                async with http.get(f"http://127.0.0.1:{gw.port}/a", headers=headers) as response:
                    assert response.status == 200
                    await response.read()
        owners: dict[str, set[int]] = {}
        for index, server in enumerate((a, b, c)):
            for received in server.requests:
                owners.setdefault(received.header("x-user") or "", set()).add(index)
    assert len(owners) == 20
    assert all(len(targets) == 1 for targets in owners.values())
    assert len(set().union(*owners.values())) > 1  # the users are spread, not all on one


# -- TLS to upstreams ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_https_upstream_verified_with_the_ca_file(ca, ca_file, start_gateway, http):
    async with TLSUpstream(ca) as upstream:
        gw = await start_gateway(config([upstream.url], upstream={"ca_file": ca_file}))
        async with http.get(f"http://127.0.0.1:{gw.port}/secure") as response:
            assert response.status == 200
            assert echoed(await response.read())["path"] == "/secure"


async def test_https_upstream_with_a_certificate_from_another_ca_is_a_502(
    ca, start_gateway, http, tmp_path
):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with TLSUpstream(ca) as upstream:
        gw = await start_gateway(config([upstream.url], upstream={"ca_file": str(other)}))
        async with http.get(f"http://127.0.0.1:{gw.port}/secure") as response:
            assert response.status == 502
            assert (await response.json())["error"]["type"] == "upstream_connect_error"
    assert upstream.requests == []


async def test_https_upstream_without_verification(ca, start_gateway, http):
    async with TLSUpstream(ca) as upstream:
        gw = await start_gateway(config([upstream.url], upstream={"tls_verify": False}))
        async with http.get(f"http://127.0.0.1:{gw.port}/secure") as response:
            assert response.status == 200


async def test_sni_is_the_target_host(ca, ca_file, start_gateway, http):
    async with TLSUpstream(ca) as upstream:
        target = f"https://localhost:{upstream.port}"
        gw = await start_gateway(config([target], upstream={"ca_file": ca_file}))
        async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
            assert response.status == 200
    assert upstream.server_names == ["localhost"]


async def test_sni_option_is_sent_and_verified_against(ca, ca_file, start_gateway, http):
    async with TLSUpstream(ca) as upstream:
        options = {"ca_file": ca_file, "sni": "tollgate.test"}
        gw = await start_gateway(config([upstream.url], upstream=options))
        async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
            assert response.status == 200
    assert upstream.server_names == ["tollgate.test"]


# -- DNS -----------------------------------------------------------------------------------------


async def test_target_named_localhost_is_resolved(echo, start_gateway, http):
    gw = await start_gateway(config([f"http://localhost:{echo.port}"]))
    async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
        assert response.status == 200
        seen = echoed(await response.read())
    assert values(seen, "host") == [f"localhost:{echo.port}"]


# -- reload --------------------------------------------------------------------------------------


async def test_reload_switches_new_requests_while_an_in_flight_one_finishes_on_the_old_route(
    echo, start_gateway, http
):
    hold = asyncio.Event()
    async with SlowUpstream(pieces=(b"old route",), hold=hold) as slow:
        gw = await start_gateway(config([slow.url]))

        async def in_flight() -> tuple[int, bytes]:
            async with http.get(f"http://127.0.0.1:{gw.port}/slow") as response:
                return response.status, await response.read()

        pending = asyncio.create_task(in_flight())
        await slow.request_seen.wait()  # the slow request reached the old upstream
        gw.reload(parse_config_data(config([echo.url])))
        async with http.get(f"http://127.0.0.1:{gw.port}/fast") as response:
            assert response.status == 200
            assert echoed(await response.read())["path"] == "/fast"
        assert not pending.done()
        hold.set()
        assert await pending == (200, b"old route")


async def test_reload_keeps_warm_upstream_connections(echo, start_gateway, http):
    gw = await start_gateway(config([echo.url]))
    async with http.get(f"http://127.0.0.1:{gw.port}/before") as response:
        await response.read()
    routes = [{"name": "renamed", "paths": ["/after"]}]
    gw.reload(parse_config_data(config([echo.url], routes=routes)))
    async with http.get(f"http://127.0.0.1:{gw.port}/after") as response:
        assert echoed(await response.read())["connection"] == 1
    assert echo.accepted == 1


# -- latency headers -----------------------------------------------------------------------------


async def test_latency_headers_split_upstream_and_gateway_time(start_gateway, http):
    async with SlowUpstream(head_delay=0.15) as upstream:
        gw = await start_gateway(config([upstream.url]))
        async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
            await response.read()
    assert int(response.headers["X-Tollgate-Upstream-Latency"]) >= 150
    assert (
        0 <= int(response.headers["X-Tollgate-Latency"]) < 150
    )  # the upstream's wait is not in it


# -- key-auth ------------------------------------------------------------------------------------

ALICE = {"name": "alice", "id": "c-1", "keys": ["alice-key"]}


def key_auth_config(target: str, **options: Any) -> dict[str, Any]:
    return config([target], service={"policies": [{"key-auth": options}]}, consumers=[ALICE])


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "No API key found in request"), ({"apikey": "wrong"}, "Invalid authentication")],
)
async def test_key_auth_refuses_a_missing_or_wrong_key_with_a_challenge(
    echo, start_gateway, http, headers, message
):
    gw = await start_gateway(key_auth_config(echo.url))
    async with http.get(f"http://127.0.0.1:{gw.port}/a", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Key realm="tollgate"'
        body = await response.json()
    assert body["error"]["type"] == "unauthorized"
    assert body["error"]["message"].startswith(message)
    assert echo.requests == []


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/a", {"Authorization": "Bearer alice-key"}),
        ("/a", {"apikey": "alice-key"}),
        ("/a?apikey=alice-key", {}),
    ],
)
async def test_key_auth_accepts_the_key_in_bearer_header_or_query(
    echo, start_gateway, http, path, headers
):
    gw = await start_gateway(key_auth_config(echo.url))
    async with http.get(f"http://127.0.0.1:{gw.port}{path}", headers=headers) as response:
        assert response.status == 200
        seen = echoed(await response.read())
    assert values(seen, "x-consumer-id") == ["c-1"]
    assert values(seen, "x-consumer-username") == ["alice"]


async def test_key_auth_does_not_trust_client_sent_consumer_headers(echo, start_gateway, http):
    gw = await start_gateway(key_auth_config(echo.url))
    headers = {"apikey": "alice-key", "X-Consumer-Id": "admin", "X-Consumer-Username": "root"}
    async with http.get(f"http://127.0.0.1:{gw.port}/a", headers=headers) as response:
        seen = echoed(await response.read())
    assert values(seen, "x-consumer-id") == ["c-1"]
    assert values(seen, "x-consumer-username") == ["alice"]


async def test_key_auth_forwards_the_key_unless_hide_credentials(echo, start_gateway, http):
    gw = await start_gateway(key_auth_config(echo.url))
    async with http.get(f"http://127.0.0.1:{gw.port}/a?apikey=alice-key&page=2") as response:
        assert echoed(await response.read())["query"] == "apikey=alice-key&page=2"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/a?page=2", {"Authorization": "Bearer alice-key"}),
        ("/a?page=2", {"apikey": "alice-key"}),
        ("/a?apikey=alice-key&page=2", {}),
    ],
)
async def test_key_auth_hide_credentials_removes_the_key_from_headers_and_query(
    echo, start_gateway, http, path, headers
):
    gw = await start_gateway(key_auth_config(echo.url, hide_credentials=True))
    async with http.get(f"http://127.0.0.1:{gw.port}{path}", headers=headers) as response:
        assert response.status == 200
        seen = echoed(await response.read())
    assert seen["query"] == "page=2"
    assert values(seen, "authorization") == []
    assert values(seen, "apikey") == []
    assert values(seen, "x-consumer-id") == ["c-1"]


# -- cors ----------------------------------------------------------------------------------------

APP_ORIGIN = "https://app.example"


def cors_config(target: str) -> dict[str, Any]:
    routes = [{"name": "items", "paths": ["/items"], "methods": ["GET", "POST"]}]
    policies = [{"cors": {"origins": [APP_ORIGIN], "exposed_headers": ["X-Total"]}}]
    return config([target], service={"policies": policies}, routes=routes)


async def test_cors_preflight_is_answered_by_the_gateway(echo, start_gateway, http):
    gw = await start_gateway(cors_config(echo.url))
    headers = {
        "Origin": APP_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "X-Token",
    }
    async with http.options(f"http://127.0.0.1:{gw.port}/items", headers=headers) as response:
        assert response.status == 204
        assert await response.read() == b""
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "X-Token"
    assert response.headers["Access-Control-Max-Age"] == "3600"
    assert echo.requests == []


async def test_cors_actual_request_gets_the_allow_origin_header(echo, start_gateway, http):
    gw = await start_gateway(cors_config(echo.url))
    headers = {"Origin": APP_ORIGIN}
    async with http.get(f"http://127.0.0.1:{gw.port}/items", headers=headers) as response:
        assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == "X-Total"
    assert response.headers["Vary"] == "Origin"
    assert len(echo.requests) == 1


async def test_cors_disallowed_origin_gets_no_allow_origin(echo, start_gateway, http):
    gw = await start_gateway(cors_config(echo.url))
    headers = {"Origin": "https://evil.example"}
    async with http.get(f"http://127.0.0.1:{gw.port}/items", headers=headers) as response:
        assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


# -- request-id ----------------------------------------------------------------------------------


def request_id_config(target: str, **options: Any) -> dict[str, Any]:
    return config([target], service={"policies": [{"request-id": options}]})


async def test_request_id_policy_generates_uuid4(echo, start_gateway, http):
    gw = await start_gateway(request_id_config(echo.url, generator="uuid4"))
    async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
        seen = echoed(await response.read())
    generated = response.headers["X-Request-Id"]
    assert uuid.UUID(generated).version == 4
    assert values(seen, "x-request-id") == [generated]


async def test_request_id_policy_uses_a_custom_header_both_ways(echo, start_gateway, http):
    gw = await start_gateway(request_id_config(echo.url, header_name="X-Correlation-Id"))
    headers = {"X-Correlation-Id": "trace-7", "X-Request-Id": "ignored"}
    async with http.get(f"http://127.0.0.1:{gw.port}/a", headers=headers) as response:
        seen = echoed(await response.read())
    assert response.headers["X-Correlation-Id"] == "trace-7"
    assert "X-Request-Id" not in response.headers
    assert values(seen, "x-correlation-id") == ["trace-7"]
    assert values(seen, "x-request-id") == []


async def test_request_id_policy_with_a_custom_header_replaces_the_upstreams_copy(start_gateway):
    own = [("X-Correlation-Id", "upstream-own"), ("X-Request-Id", "upstream-request-id")]
    async with EchoUpstream(response_headers=own) as upstream:
        gw = await start_gateway(request_id_config(upstream.url, header_name="X-Correlation-Id"))
        response = await raw(gw.port, request("GET", "/a", headers=[("X-Correlation-Id", "c-9")]))
    assert response.status == 200
    # One id header, the gateway's; the upstream's X-Request-Id is an ordinary header here.
    assert response.header_values("x-correlation-id") == ["c-9"]
    assert response.header_values("x-request-id") == ["upstream-request-id"]


async def test_request_id_policy_with_echo_off_sends_it_upstream_only(echo, start_gateway, http):
    gw = await start_gateway(request_id_config(echo.url, echo_downstream=False))
    async with http.get(f"http://127.0.0.1:{gw.port}/a") as response:
        seen = echoed(await response.read())
    assert "X-Request-Id" not in response.headers
    assert len(values(seen, "x-request-id")) == 1


# -- request-size-limit --------------------------------------------------------------------------


def size_limit_config(target: str) -> dict[str, Any]:
    routes = [
        {
            "name": "upload",
            "paths": ["/upload"],
            "policies": [{"request-size-limit": {"max_body_size": "1kb"}}],
        },
        {"name": "other", "paths": ["/other"]},
    ]
    return config([target], routes=routes)


async def test_request_size_limit_refuses_a_larger_body_on_its_route_only(
    echo, start_gateway, http
):
    gw = await start_gateway(size_limit_config(echo.url))
    body = b"x" * 2000
    async with http.post(f"http://127.0.0.1:{gw.port}/upload", data=body) as response:
        assert response.status == 413
        assert (await response.json())["error"]["type"] == "request_body_too_large"
    async with http.post(f"http://127.0.0.1:{gw.port}/other", data=body) as response:
        assert response.status == 200
        await response.read()
    async with http.post(f"http://127.0.0.1:{gw.port}/upload", data=b"x" * 1000) as response:
        assert response.status == 200
        await response.read()
    assert [r.path for r in echo.requests] == ["/other", "/upload"]


async def test_request_size_limit_stops_a_chunked_body_at_the_limit(echo, start_gateway):
    gw = await start_gateway(size_limit_config(echo.url))
    headers = [("Transfer-Encoding", "chunked")]
    response = await raw(gw.port, request("POST", "/upload", headers, chunked(b"x" * 800)))
    assert response.status == 200
    big = chunked(b"x" * 800, b"y" * 800)
    response = await raw(gw.port, request("POST", "/upload", headers, big))
    assert response.status == 413
    assert response.json()["error"]["type"] == "request_body_too_large"
    assert [r.body for r in echo.requests] == [b"x" * 800]  # the refused body never arrived whole


class _BigUpstream(EchoUpstream):
    """Answers with a large body in one write, so the gateway must apply flow control."""

    SIZE = 8 * 1024 * 1024

    async def respond(self, request: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            response_bytes(200, [("Content-Type", "application/octet-stream")], b"z" * self.SIZE)
        )
        await writer.drain()
        return True


async def test_a_slow_client_gets_the_whole_response_past_the_upstream_read_timeout(
    start_gateway,
):
    """While the client does not read, the upstream is paused and its read timer stopped."""
    async with _BigUpstream() as big:
        gw = await start_gateway(config([big.url], upstream={"timeouts": {"read": 0.3}}))
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request("GET", "/big"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(64 * 1024)
        await asyncio.sleep(1.0)  # the client stalls for over three read timeouts
        rest = await asyncio.wait_for(reader.readexactly(_BigUpstream.SIZE - 64 * 1024), 10)
        assert rest == b"z" * len(rest)
        writer.close()
