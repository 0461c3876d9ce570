"""The phases after `access`: upstream_response, body and log, as the listener runs them.

The chains are swapped on a compiled route, the way `compile_config` would fill them from
policies that define those phase methods.
"""

from __future__ import annotations

from typing import Any

from http_wire import RawClient, request

from tollgate.http.exchange import Exchange


def _config(upstream_url: str) -> dict[str, Any]:
    return {
        "gateway": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "upstreams": [{"name": "app", "targets": [{"url": upstream_url}]}],
        "services": [
            {"name": "svc", "upstream": "app", "routes": [{"name": "all", "paths": ["/"]}]}
        ],
    }


async def test_body_phase_rewrites_the_response_and_the_client_gets_it_chunked(
    upstream, start_gateway
):
    gateway = await start_gateway(_config(upstream.url))
    route = gateway.runtime.routes[0]

    def shout(ex: Exchange, chunk: bytes) -> bytes:
        return chunk.upper()

    route.body = (shout,)
    async with await RawClient.open(gateway.port) as client:
        await client.send(request("GET", "/hello"))
        response = await client.response()
    assert response.status == 200
    assert response.body == b"GET /HELLO 0"
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None


async def test_body_phase_can_hold_bytes_back_and_release_them_at_the_end(upstream, start_gateway):
    gateway = await start_gateway(_config(upstream.url))
    held: list[bytes] = []

    def hold_then_release(ex: Exchange, chunk: bytes) -> bytes:
        if chunk:
            held.append(chunk)
            return b""
        return b"[" + b"".join(held) + b"]"

    gateway.runtime.routes[0].body = (hold_then_release,)
    async with await RawClient.open(gateway.port) as client:
        await client.send(request("GET", "/x"))
        response = await client.response()
        assert response.body == b"[GET /x 0]"
        # The connection stays usable: the chunked body was terminated properly.
        await client.send(request("GET", "/y"))
        assert (await client.response()).body == b"[GET /x 0GET /y 0]"


async def test_upstream_response_phase_sees_and_edits_the_upstream_headers(upstream, start_gateway):
    gateway = await start_gateway(_config(upstream.url))
    seen: list[int] = []

    def tag(ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        seen.append(status)
        headers.append((b"X-Tagged", b"yes"))

    gateway.runtime.routes[0].upstream_response = (tag,)
    async with await RawClient.open(gateway.port) as client:
        await client.send(request("GET", "/status/204"))
        response = await client.response()
    assert response.status == 204
    assert seen == [204]
    assert response.header("x-tagged") == "yes"


async def test_log_phase_runs_after_the_response_with_its_outcome(upstream, start_gateway):
    gateway = await start_gateway(_config(upstream.url))
    logged: list[tuple[int, str, bool]] = []

    def record(ex: Exchange) -> None:
        logged.append((ex.status, ex.source, ex.t_end >= ex.t_first_byte > 0))

    gateway.runtime.routes[0].log = (record,)
    async with await RawClient.open(gateway.port) as client:
        await client.send(request("GET", "/a"))
        await client.response()
    assert logged == [(200, "upstream", True)]
