"""`tollgate serve` as users run it: a supervisor, its worker processes, signals, admin API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import trustme
import yaml
from certificates import client_context, der, issue, tls_get, write_certificate
from upstreams import free_port

if TYPE_CHECKING:
    import ssl

    from conftest import Gateway, RunTollgate, StartGateway, StartUpstream, Upstream

DEMO_KEY = "demo-key-change-me"  # what `tollgate init` writes while DEMO_KEY is unset
# The quick start promises a first call within a minute; a loaded machine still needs seconds.
FIRST_CALL_DEADLINE = 20.0
REQUEST_ID_PREFIX = 16  # hex digits of a generated id that are random per worker process
LOAD_REQUESTS = 5_000
LOAD_CONCURRENCY = 8
RELOADS = 10
SLOW_CALLS = 100
SLOW_CALL_MS = 3_000  # long enough to send them all, signal, and see the listener close
DRAIN_TIMEOUT = 15.0
NODE_LIMIT = 100
BURST_REQUESTS = 1_000
BURST_CONNECTIONS = 100  # enough that the kernel hands connections to both workers
BURST_MARGIN = 15.0  # seconds a burst of BURST_REQUESTS surely takes less than
# New connections tried to reach both workers: the kernel spreads them by a hash of the
# client's port, so missing one of two workers this often does not happen.
CONNECTIONS_TO_REACH_ALL = 200

Json = dict[str, Any]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _parent_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^PPid:\s+(\d+)$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def _logged(gateway: Gateway, text: str, times: int = 1) -> Callable[[], bool]:
    return lambda: gateway.stderr().count(text) >= times


def _config_version_is(gateway: Gateway, version: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await gateway.status())["config_version"] == version)

    return check


async def _get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.get(url, **kwargs) as reply:
        body = await reply.json() if reply.content_type == "application/json" else None
        return reply.status, body


class LoadLoop:
    """Clients sending GETs over keep-alive connections until stopped, counting outcomes.

    With `retry_once`, a request that fails is sent once more before it counts as failed.
    """

    def __init__(self, url: str, concurrency: int, *, retry_once: bool) -> None:
        self.url = url
        self.concurrency = concurrency
        self.retry_once = retry_once
        self.succeeded = 0
        self.retried = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"LoadLoop({self.succeeded} ok, {self.retried} retried, {len(self.failures)} failed)"

    def reached(self, count: int) -> Callable[[], bool]:
        return lambda: self.succeeded >= count

    async def run(self, until: Callable[[], bool] = lambda: False) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, until) for _ in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, until: Callable[[], bool]) -> None:
        while not self.stop.is_set() and not until():
            problem = await self._once(session)
            if problem is not None and self.retry_once:
                self.retried += 1
                problem = await self._once(session)
            if problem is not None:
                self.failures.append(problem)

    async def _once(self, session: aiohttp.ClientSession) -> str | None:
        try:
            async with session.get(self.url) as reply:
                await reply.read()
                if reply.status != 200:
                    return f"status {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return repr(exc)
        self.succeeded += 1
        return None


async def _prefixes_over_new_connections(url: str, count: int) -> set[str]:
    """Request-id prefixes (one per worker process) seen over `count` new connections."""
    prefixes = set()
    # A new connection per request: the kernel spreads connections, not requests, over workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(count):
            async with session.get(url) as reply:
                assert reply.status == 200
                request_id = reply.headers["X-Request-Id"]
                assert (await reply.json())["request_id"] == request_id  # sent upstream too
                prefixes.add(request_id[:REQUEST_ID_PREFIX])
    return prefixes


# -- 1. quick start --------------------------------------------------------------------------


async def test_quick_start_init_check_serve_proxies_a_first_call_with_the_demo_key(
    tmp_path: Path,
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
    run_tollgate: RunTollgate,
) -> None:
    init = await run_tollgate("init", cwd=tmp_path)
    assert init.code == 0, init.stderr
    config_path = tmp_path / "tollgate.yaml"
    text = config_path.read_text()
    # The example's own addresses, unless another program holds one of them here.
    addresses: dict[str, str] = {}
    for role, address in (
        ("gateway", "127.0.0.1:8080"),
        ("admin", "127.0.0.1:8001"),
        ("upstream", "127.0.0.1:9000"),
    ):
        assert address in text, f"the example config no longer uses {address}"
        if not _port_is_free(int(address.rpartition(":")[2])):
            replacement = f"127.0.0.1:{free_port()}"
            text = text.replace(address, replacement)
            address = replacement
        addresses[role] = address
    config_path.write_text(text)
    start_upstream(int(addresses["upstream"].rpartition(":")[2]))

    check = await run_tollgate("check", "-c", "tollgate.yaml", cwd=tmp_path)
    assert check.code == 0, check.stdout + check.stderr

    started = time.monotonic()
    gateway = await start_gateway(
        None, cwd=tmp_path, listen=addresses["gateway"], admin=addresses["admin"]
    )
    async with aiohttp.ClientSession() as session:
        status, body = await _get(session, gateway.url("/hello"), headers={"apikey": DEMO_KEY})
        assert status == 200, body
        assert body["path"] == "/hello"
        assert time.monotonic() - started < FIRST_CALL_DEADLINE
        status, body = await _get(session, gateway.url("/hello"))
        assert status == 401, body


# -- 2. workers ------------------------------------------------------------------------------


async def test_two_workers_are_children_of_the_supervisor_and_both_accept_connections(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(upstream.config(workers=2))
    pids = await gateway.worker_pids()
    assert len(set(pids)) == 2
    assert all(_parent_pid(pid) == gateway.pid for pid in pids)
    assert len(await _prefixes_over_new_connections(gateway.url("/echo"), 40)) == 2


# -- 3. crash restart ------------------------------------------------------------------------


async def test_a_killed_worker_is_replaced_while_requests_keep_succeeding(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(upstream.config(workers=2))
    victim, survivor = await gateway.worker_pids()
    before = await _prefixes_over_new_connections(gateway.url("/echo"), 40)
    assert len(before) == 2
    load = LoadLoop(gateway.url("/echo"), concurrency=4, retry_once=True)
    running = asyncio.create_task(load.run())
    await gateway.wait_for(load.reached(200), "requests before the kill")

    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        return victim not in await gateway.worker_pids()

    await gateway.wait_for(replaced, "the supervisor to start a new worker")
    status = await gateway.status()
    assert status["worker_restarts"] == 1
    new_pids = [int(worker["pid"]) for worker in status["workers"]]
    assert survivor in new_pids
    replacement = next(pid for pid in new_pids if pid != survivor)
    assert _parent_pid(replacement) == gateway.pid

    async def replacement_serves() -> bool:
        return bool(await _prefixes_over_new_connections(gateway.url("/echo"), 10) - before)

    await gateway.wait_for(replacement_serves, "the new worker to answer")
    await gateway.wait_for(load.reached(load.succeeded + 200), "requests after the restart")
    load.stop.set()
    await running
    assert load.failures == [], load


# -- 4. drain --------------------------------------------------------------------------------


async def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_zero(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(upstream.config(workers=2, drain_timeout=f"{DRAIN_TIMEOUT}s"))
    workers = await gateway.worker_pids()
    connector = aiohttp.TCPConnector(limit=0)  # one connection per call
    async with aiohttp.ClientSession(connector=connector) as session:

        async def slow_call() -> int:
            async with session.get(gateway.url(f"/slow?ms={SLOW_CALL_MS}")) as reply:
                await reply.read()
                return reply.status

        calls = [asyncio.create_task(slow_call()) for _ in range(SLOW_CALLS)]
        await gateway.wait_for(
            lambda: upstream.arrived == SLOW_CALLS, f"{SLOW_CALLS} calls at the upstream"
        )
        signalled = time.monotonic()
        gateway.send_signal(signal.SIGTERM)

        async def refuses() -> bool:
            return not await gateway.accepts_connections()

        await gateway.wait_for(refuses, "the listener to close", within=DRAIN_TIMEOUT)
        assert upstream.in_flight == SLOW_CALLS, "the listener closed only after the calls ended"
        statuses = await asyncio.gather(*calls)
    assert statuses == [200] * SLOW_CALLS
    assert await gateway.wait_exit(DRAIN_TIMEOUT) == 0
    assert time.monotonic() - signalled < DRAIN_TIMEOUT
    assert not [pid for pid in workers if _exists(pid)], "workers outlived the supervisor"


# -- 5. reload under load --------------------------------------------------------------------


def _versioned(config: Json, version: int) -> Json:
    """`config` whose route `main` serves /echo always and /marker-<version> only here."""
    changed: Json = yaml.safe_load(yaml.safe_dump(config))
    (service,) = changed["services"]
    service["routes"] = [{"name": "main", "paths": ["/echo", f"/marker-{version}"]}]
    return changed


async def test_ten_reloads_under_load_lose_no_request_and_the_last_config_is_live(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    base = upstream.config(workers=2)
    gateway = await start_gateway(_versioned(base, 0))
    load = LoadLoop(gateway.url("/echo"), LOAD_CONCURRENCY, retry_once=False)
    step = LOAD_REQUESTS // (RELOADS + 1)

    async def reload_while_loaded() -> None:
        for number in range(1, RELOADS + 1):
            await gateway.wait_for(load.reached(number * step), "load")
            gateway.rewrite_config(_versioned(base, number))
            if number % 2:
                gateway.send_signal(signal.SIGHUP)
                await gateway.wait_for(
                    _config_version_is(gateway, number + 1), f"reload {number} by SIGHUP"
                )
            else:
                code, body = await gateway.admin("POST", "/admin/reload")
                assert (code, body) == (200, {"reloaded": True, "config_version": number + 1})

    reloads = asyncio.create_task(reload_while_loaded())
    await load.run(until=lambda: reloads.done() and load.succeeded >= LOAD_REQUESTS)
    await reloads
    assert load.failures == [], load
    assert load.succeeded >= LOAD_REQUESTS

    status = await gateway.status()
    assert (status["reloads"], status["config_version"]) == (RELOADS, RELOADS + 1)
    async with aiohttp.ClientSession() as session:
        assert (await _get(session, gateway.url(f"/marker-{RELOADS}")))[0] == 200
        assert (await _get(session, gateway.url(f"/marker-{RELOADS - 1}")))[0] == 404


# -- 6. bad reload ---------------------------------------------------------------------------


async def test_an_invalid_config_is_refused_on_reload_and_the_old_one_keeps_serving(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = upstream.config()
    gateway = await start_gateway(config)
    good = yaml.safe_dump(config, sort_keys=False)
    added_line = good.count("\n") + 1
    bad_files = [
        # (file text, a problem it must report)
        (good + "gatway: {workers: 2}\n", rf"tollgate\.yaml:{added_line}: .*gatway.*'gateway'"),
        (good + "services: [{name: x\n", r"tollgate\.yaml:\d+: invalid YAML"),
    ]
    async with aiohttp.ClientSession() as session:
        for rejected, (text, expected) in enumerate(bad_files, start=1):
            gateway.rewrite_config(text)
            code, body = await gateway.admin("POST", "/admin/reload")
            assert code == 400, body
            assert body["error"]["type"] == "config_error"
            problems = body["error"]["problems"]
            assert any(re.match(expected, problem) for problem in problems), problems

            gateway.send_signal(signal.SIGHUP)
            await gateway.wait_for(
                _logged(gateway, "reload rejected", times=rejected), "the rejected reload"
            )
            assert problems[0] in gateway.stderr()

            assert (await _get(session, gateway.url("/still-served")))[0] == 200
            status, health = await _get(session, gateway.admin_url("/health"))
            assert (status, health["status"], health["config_version"]) == (200, "ok", 1)


# -- 7. admin API ----------------------------------------------------------------------------

ADMIN_ENDPOINTS = [("GET", "/admin/status"), ("POST", "/admin/reload"), ("GET", "/nothing-here")]


async def _status_of(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str]
) -> int:
    """The status of an admin API answer, which is JSON whatever it is."""
    async with session.request(method, url, headers=headers) as reply:
        assert reply.content_type == "application/json"
        return reply.status


async def test_admin_api_without_a_token_answers_403_except_health(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(upstream.config(token=None))
    async with aiohttp.ClientSession() as session:
        for method, path in ADMIN_ENDPOINTS:
            for headers in ({}, {"Authorization": "Bearer guess"}):
                code = await _status_of(session, method, gateway.admin_url(path), headers)
                assert code == 403, (method, path, headers)
        assert await _status_of(session, "GET", gateway.admin_url("/health"), {}) == 200


async def test_admin_api_with_a_token_needs_the_right_bearer(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(upstream.config(token="s3cret-token"))
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}]
    right = {"Authorization": "Bearer s3cret-token"}
    async with aiohttp.ClientSession() as session:
        for method, path in ADMIN_ENDPOINTS[:2]:
            url = gateway.admin_url(path)
            for headers in wrong:
                assert await _status_of(session, method, url, headers) == 401, headers
            assert await _status_of(session, method, url, right) == 200, (method, path)
        assert await _status_of(session, "GET", gateway.admin_url("/health"), {}) == 200


# -- 8. config errors at start ---------------------------------------------------------------


async def test_serve_with_an_invalid_config_exits_non_zero_with_located_problems(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    text = yaml.safe_dump(upstream.config(), sort_keys=False).replace("workers:", "wrokers:")
    line = text.splitlines().index("  wrokers: 1") + 1
    gateway = await start_gateway(text, wait=False)
    assert await gateway.wait_exit() != 0
    output = gateway.stderr()
    assert re.search(rf"^tollgate\.yaml:{line}: .*wrokers", output, re.MULTILINE), output


async def test_a_second_serve_on_the_same_address_exits_non_zero_and_the_first_serves_on(
    upstream: Upstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    config = upstream.config(workers=2)
    first = await start_gateway(config)
    workers = await first.worker_pids()
    # Its own admin port: only the data plane's address is shared.
    port = int(first.listen.rpartition(":")[2])
    (tmp_path / "second").mkdir()
    second = await start_gateway(
        upstream.config(workers=2, listen_port=port), cwd=tmp_path / "second", wait=False
    )
    assert await second.wait_exit() == 2
    assert f"cannot listen on {first.listen}: address already in use" in second.stderr()
    # Every new connection still reaches one of the first gateway's two workers, unchanged.
    assert len(await _prefixes_over_new_connections(first.url("/echo"), 40)) == 2
    assert await first.worker_pids() == workers


@pytest.mark.parametrize("section", ["gateway", "admin"])
async def test_serve_on_an_address_in_use_exits_non_zero_naming_it(
    section: str, upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = upstream.config()
    address = config[section]["listen"]
    host, _, port = address.rpartition(":")
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()
        gateway = await start_gateway(config, wait=False)
        assert await gateway.wait_exit() != 0
    output = gateway.stderr()
    assert address in output and "in use" in output, output


# -- 9. logs ---------------------------------------------------------------------------------


async def test_json_log_format_writes_one_json_object_per_stderr_line(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = upstream.config()
    gateway = await start_gateway(config, "--log-format", "json")
    async with aiohttp.ClientSession() as session:
        assert (await _get(session, gateway.url("/")))[0] == 200
    # A rejected reload logs a message of several lines: it must still be one JSON line.
    gateway.rewrite_config(yaml.safe_dump(config) + "gatway: {}\n")
    gateway.send_signal(signal.SIGHUP)
    await gateway.wait_for(_logged(gateway, "reload rejected"), "the rejected reload")
    gateway.send_signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0

    lines = gateway.stderr().splitlines()
    assert len(lines) >= 3
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(entry, dict) for entry in entries)
    assert all({"ts", "level", "logger", "pid", "msg"} <= entry.keys() for entry in entries)
    assert gateway.pid in {entry["pid"] for entry in entries}
    assert any("\n" in entry["msg"] for entry in entries)


# -- 10. node-wide rate limit ----------------------------------------------------------------


def _mapped_store(pid: int) -> Path:
    """The shared-memory store file that process `pid` maps."""
    paths = {
        line.split(maxsplit=5)[-1]
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if line.endswith("/ratelimit.shm")
    }
    assert len(paths) == 1, paths
    return Path(paths.pop())


async def test_two_workers_share_one_count_and_admit_exactly_the_limit(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = upstream.config(workers=2)
    per_minute = {"algorithm": "fixed-window", "limit": NODE_LIMIT, "window": "1m"}
    config["services"][0]["policies"] = [
        {"rate-limit": {"limits": [per_minute], "by": "global"}}  # store: local, the default
    ]
    gateway = await start_gateway(config)
    # The window is aligned to the wall clock's minutes: keep the burst inside one of them.
    left_in_minute = 60 - time.time() % 60
    if left_in_minute < BURST_MARGIN:
        await asyncio.sleep(left_in_minute)

    connector = aiohttp.TCPConnector(limit=BURST_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call() -> tuple[int, str]:
            async with session.get(gateway.url("/echo")) as reply:
                await reply.read()
                return reply.status, reply.headers["X-Request-Id"][:REQUEST_ID_PREFIX]

        answers = await asyncio.gather(*(call() for _ in range(BURST_REQUESTS)))

    statuses = [status for status, _ in answers]
    assert statuses.count(200) == NODE_LIMIT
    assert statuses.count(429) == BURST_REQUESTS - NODE_LIMIT
    assert len({prefix for _, prefix in answers}) == 2, "both workers served"
    stores = {_mapped_store(pid) for pid in await gateway.worker_pids()}
    assert len(stores) == 1, stores
    gateway.send_signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0
    assert not stores.pop().parent.exists(), "the supervisor left its shared state behind"


# -- 11. TLS certificate on reload -----------------------------------------------------------


async def _certificates_by_worker(port: int, context: ssl.SSLContext) -> dict[str, set[bytes]]:
    """The certificates new TLS connections were shown, by worker, until both answered."""
    seen: dict[str, set[bytes]] = {}
    for _ in range(CONNECTIONS_TO_REACH_ALL):
        shown, response = await tls_get(port, context, "/echo")
        assert response.status == 200, response
        request_id = response.header("X-Request-Id")
        assert request_id is not None
        seen.setdefault(request_id[:REQUEST_ID_PREFIX], set()).add(shown)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only {len(seen)} of 2 workers answered")


async def test_a_reload_shows_a_replaced_certificate_to_new_connections_in_every_worker(
    upstream: Upstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    authority = trustme.CA()
    first, second = issue(authority), issue(authority)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_certificate(first, cert_path, key_path)
    config = upstream.config(workers=2)
    config["gateway"]["tls"] = {"cert": str(cert_path), "key": str(key_path)}
    gateway = await start_gateway(config)
    port = int(gateway.listen.rpartition(":")[2])
    context = client_context(authority)
    assert list((await _certificates_by_worker(port, context)).values()) == [{der(first)}] * 2

    write_certificate(second, cert_path, key_path)  # the same paths, new files
    code, body = await gateway.admin("POST", "/admin/reload")
    assert (code, body) == (200, {"reloaded": True, "config_version": 2})
    assert list((await _certificates_by_worker(port, context)).values()) == [{der(second)}] * 2

    # A key that does not match the certificate: every worker fails to prepare, none changes.
    first.private_key_pem.write_to_path(key_path)
    code, body = await gateway.admin("POST", "/admin/reload")
    assert code == 500, body
    assert body["error"]["type"] == "reload_failed"
    assert "gateway.tls: cannot load the certificate" in body["error"]["message"]
    assert (await gateway.status())["config_version"] == 2
    assert list((await _certificates_by_worker(port, context)).values()) == [{der(second)}] * 2

    # Turning TLS off takes a restart: the reload says so, and the listener keeps TLS.
    del config["gateway"]["tls"]
    gateway.rewrite_config(config)
    code, body = await gateway.admin("POST", "/admin/reload")
    assert (code, body) == (200, {"reloaded": True, "config_version": 3})
    assert "gateway.tls turned on or off changes only on restart" in gateway.stderr()
    assert list((await _certificates_by_worker(port, context)).values()) == [{der(second)}] * 2
