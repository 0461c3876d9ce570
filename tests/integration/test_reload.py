"""A worker's side of a reload, in-process: prepare a config without serving it, then commit or
discard it; the control messages the supervisor sends; a certificate changed by a reload.

`start_gateway` is the integration fixture (a `Gateway` on an ephemeral port). The supervisor's
side, with real worker processes, is in test_supervisor.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from certificates import client_context, der, issue, shown_certificate, tls_get, write_certificate
from http_wire import RawClient, request
from recording_upstream import RecordingUpstream
from waiting import wait_until

from tollgate.config.loader import parse_config_data
from tollgate.runtime.worker import Gateway, WorkerControl

pytestmark = pytest.mark.timeout(30)

GatewayStarter = Callable[..., Awaitable[Gateway]]
# Far more than a worker needs to drop a config held for a few milliseconds.
DROP_WAIT = 5.0
UNREACHABLE = "http://127.0.0.1:9"  # pools connect lazily: a target nothing is asked of


def config(
    upstream: RecordingUpstream,
    paths: list[str],
    *,
    targets: list[str] | None = None,
    pool: dict[str, Any] | None = None,
    policies: list[dict[str, Any]] | None = None,
    extra_routes: list[dict[str, Any]] | None = None,
    **gateway: Any,
) -> dict[str, Any]:
    """Service `api` routes `paths` to `upstream` (and `targets`, if given)."""
    urls = [upstream.url, *(targets or [])]
    return {
        "gateway": {"listen": "127.0.0.1:0", **gateway},
        "admin": {"listen": None},
        "upstreams": [
            {"name": "backend", "targets": [{"url": url} for url in urls], "pool": pool or {}}
        ],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [{"name": "main", "paths": paths}, *(extra_routes or [])],
                "policies": policies or [],
            }
        ],
    }


LOCAL_LIMIT = {"rate-limit": {"limits": [{"algorithm": "fixed-window", "limit": 5, "window": 60}]}}


async def status(gateway: Gateway, path: str) -> int:
    async with await RawClient.open(gateway.port) as client:
        await client.send(request("GET", path))
        return (await client.response()).status


# -- prepare, commit, discard ------------------------------------------------------------------


async def test_a_prepared_config_serves_nothing_until_it_is_committed(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    prepared = gateway.prepare(parse_config_data(config(upstream, ["/new"])))
    assert prepared.runtime.version == 2
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (200, 404)
    assert gateway.version == 1

    assert gateway.commit(prepared) is gateway.runtime
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (404, 200)
    assert gateway.version == 2


async def test_a_prepared_config_changes_no_pool_until_it_is_committed(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/"], pool={"max_connections": 10}))
    before = dict(gateway.pools.pools)
    (serving_pool,) = before.values()
    grown = config(upstream, ["/"], targets=[UNREACHABLE], pool={"max_connections": 20})
    prepared = gateway.prepare(parse_config_data(grown))
    assert gateway.pools.pools == before
    assert serving_pool.max_connections == 10

    gateway.commit(prepared)
    assert serving_pool.max_connections == 20
    assert len(gateway.pools.pools) == 2
    assert gateway.pools.pools.keys() > before.keys()


async def test_a_discarded_config_closes_what_its_preparation_opened(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/"]))
    before = dict(gateway.pools.pools)
    assert not gateway.shared_state.opened
    redis_route = {
        "name": "counted-in-redis",
        "paths": ["/redis"],
        "policies": [{"rate-limit": {**LOCAL_LIMIT["rate-limit"], "store": "redis"}}],
    }
    bigger = config(
        upstream,
        ["/"],
        targets=[UNREACHABLE],
        policies=[LOCAL_LIMIT],  # `store: local`: opens the node's store
        extra_routes=[redis_route],
    )
    bigger["cluster"] = {"redis": "redis://127.0.0.1:9/0"}  # a store connects on its first call
    prepared = gateway.prepare(parse_config_data(bigger))
    assert gateway.shared_state.opened
    assert prepared.redis and prepared.pools.made

    gateway.discard(prepared)
    assert not gateway.shared_state.opened
    assert gateway.pools.pools == before
    assert not prepared.pools.made
    # The Redis store it made was dropped too: the next preparation makes its own.
    again = gateway.prepare(parse_config_data(bigger))
    assert again.redis == prepared.redis
    gateway.discard(again)
    assert await status(gateway, "/") == 200
    assert gateway.version == 1


async def test_a_config_that_fails_to_prepare_leaves_nothing_open_and_the_old_one_serving(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    before = dict(gateway.pools.pools)
    # The upstream's pools and the node's store are made before the second route fails.
    broken_route = {
        "name": "broken",
        "paths": ["/broken"],
        "policies": [{"rate-limit": {**LOCAL_LIMIT["rate-limit"], "store": "redis"}}],
    }
    broken = config(
        upstream,
        ["/new"],
        targets=[UNREACHABLE],
        policies=[LOCAL_LIMIT],
        extra_routes=[broken_route],
    )
    with pytest.raises(ValueError, match=r"api/broken.*cluster\.redis"):
        gateway.prepare(parse_config_data(broken))
    assert gateway.pools.pools == before
    assert not gateway.shared_state.opened
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (200, 404)
    assert gateway.version == 1


# -- the control messages ------------------------------------------------------------------------


def prepare(reload: int, settings: dict[str, Any], hold: float = 60.0) -> dict[str, Any]:
    return {"type": "prepare", "id": reload, "config": settings, "version": 2, "hold": hold}


async def test_control_prepares_then_commits_the_reload_it_names(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    control = WorkerControl(gateway, asyncio.Event())
    reply = control.handle(prepare(7, config(upstream, ["/new"])))
    assert reply == {"type": "prepared", "version": 2, "id": 7}
    assert await status(gateway, "/new") == 404

    reply = control.handle({"type": "commit", "id": 8, "reload": 6})
    assert reply == {"type": "commit_failed", "error": "nothing prepared for this reload", "id": 8}
    assert control.prepared is not None
    assert control.handle({"type": "commit", "id": 9, "reload": 7}) == {
        "type": "committed",
        "version": 2,
        "id": 9,
    }
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (404, 200)
    assert control.prepared is None


async def test_control_abort_drops_the_prepared_config(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    control = WorkerControl(gateway, asyncio.Event())
    control.handle(prepare(7, config(upstream, ["/new"], policies=[LOCAL_LIMIT])))
    assert gateway.shared_state.opened
    assert control.handle({"type": "abort", "reload": 7}) is None
    assert control.prepared is None
    assert not gateway.shared_state.opened
    assert control.handle({"type": "commit", "id": 8, "reload": 7})["type"] == "commit_failed"
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (200, 404)


async def test_control_drops_a_prepared_config_whose_commit_does_not_come_in_time(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    control = WorkerControl(gateway, asyncio.Event())
    reply = control.handle(prepare(7, config(upstream, ["/new"]), hold=0.05))
    assert reply is not None and reply["type"] == "prepared"
    await wait_until(lambda: control.prepared is None, "the prepared config to drop", DROP_WAIT)

    reply = control.handle({"type": "commit", "id": 8, "reload": 7})
    assert reply is not None and reply["type"] == "commit_failed"
    assert (await status(gateway, "/old"), await status(gateway, "/new")) == (200, 404)
    assert gateway.version == 1


async def test_control_a_new_prepare_replaces_one_that_was_never_committed(
    upstream: RecordingUpstream, start_gateway: GatewayStarter
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    control = WorkerControl(gateway, asyncio.Event())
    control.handle(prepare(7, config(upstream, ["/first"])))
    control.handle(prepare(9, config(upstream, ["/second"])))
    assert control.handle({"type": "commit", "id": 10, "reload": 7})["type"] == "commit_failed"
    assert control.handle({"type": "commit", "id": 11, "reload": 9})["type"] == "committed"
    assert (await status(gateway, "/first"), await status(gateway, "/second")) == (404, 200)


async def test_control_answers_prepare_failed_with_the_reason(
    upstream: RecordingUpstream, start_gateway: GatewayStarter, tmp_path: Path
) -> None:
    gateway = await start_gateway(config(upstream, ["/old"]))
    control = WorkerControl(gateway, asyncio.Event())
    missing = {"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "missing.key")}
    reply = control.handle(prepare(7, config(upstream, ["/new"], tls=missing)))
    assert reply is not None
    assert (reply["type"], reply["id"]) == ("prepare_failed", 7)
    assert "missing.pem" in reply["error"]
    assert control.prepared is None


# -- the listener's certificate ---------------------------------------------------------------


@pytest.fixture
def authority() -> trustme.CA:
    return trustme.CA()


async def serve_certificate(
    certificate: trustme.LeafCert,
    upstream: RecordingUpstream,
    start_gateway: GatewayStarter,
    tmp_path: Path,
) -> tuple[Gateway, dict[str, Any], Path, Path]:
    """A gateway serving `certificate` over TLS from files in `tmp_path`: the gateway, its
    settings, and the certificate and key files."""
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_certificate(certificate, cert_path, key_path)
    settings = config(upstream, ["/"], tls={"cert": str(cert_path), "key": str(key_path)})
    return await start_gateway(settings), settings, cert_path, key_path


async def test_a_reload_shows_the_replaced_certificate_to_new_connections(
    upstream: RecordingUpstream,
    start_gateway: GatewayStarter,
    tmp_path: Path,
    authority: trustme.CA,
) -> None:
    first, second = issue(authority), issue(authority)
    gateway, settings, cert_path, key_path = await serve_certificate(
        first, upstream, start_gateway, tmp_path
    )
    context = client_context(authority)
    async with await RawClient.open(
        gateway.port, ssl_context=context, server_hostname="localhost"
    ) as before:
        assert shown_certificate(before) == der(first)

        write_certificate(second, cert_path, key_path)  # the same paths, new content
        gateway.reload(parse_config_data(settings))
        for server_hostname in ("localhost", ""):  # with a server name, and without one
            shown, response = await tls_get(
                gateway.port, context, "/after", server_hostname=server_hostname
            )
            assert (shown, response.status) == (der(second), 200)
        # A connection made before the reload keeps its session.
        await before.send(request("GET", "/still"))
        assert (await before.response()).status == 200


async def test_a_certificate_that_does_not_load_fails_the_prepare_and_the_old_one_serves_on(
    upstream: RecordingUpstream,
    start_gateway: GatewayStarter,
    tmp_path: Path,
    authority: trustme.CA,
) -> None:
    first, other = issue(authority), issue(authority)
    gateway, settings, cert_path, _key = await serve_certificate(
        first, upstream, start_gateway, tmp_path
    )
    context = client_context(authority)

    other.cert_chain_pems[0].write_to_path(cert_path)  # its key stays the first one's
    with pytest.raises(ValueError, match=r"gateway\.tls: cannot load the certificate .*cert\.pem"):
        gateway.prepare(parse_config_data(settings))
    cert_path.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"gateway\.tls: cannot load the certificate"):
        gateway.prepare(parse_config_data(settings))

    shown, response = await tls_get(gateway.port, context, "/")
    assert (shown, response.status) == (der(first), 200)
    assert gateway.version == 1
