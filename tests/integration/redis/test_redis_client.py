"""The Redis store's connection behaviour against real servers: coalescing, losing Redis and
finding it again, timeouts, script reloads, authentication and TLS."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from redis_server import RedisServer, free_port

from tollgate.clock import FakeClock
from tollgate.ratelimit import FixedWindow, SlidingWindowCounter, TokenBucket
from tollgate.ratelimit.redis_script import FUNCTION_NAME
from tollgate.ratelimit.redis_store import RedisStore
from tollgate.ratelimit.resp import RedisClient, StoreUnavailable

# The `make_store` fixture (conftest.py): connected stores, closed after the test.
StoreMaker = Callable[..., Awaitable[RedisStore]]

LIMIT = [("rate-limit|svc/route|minute|fp|consumer=acme", SlidingWindowCounter(1_000_000, 60))]
# How long a failing call may take beyond the store's timeout on a loaded machine.
LEEWAY = 0.5


async def wait_until_available(store: RedisStore, within: float = 10.0) -> float:
    """Seconds until `store` has reconnected by itself."""
    started = time.monotonic()
    while not store.available:
        assert time.monotonic() - started < within, "the store never reconnected"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# -- coalescing ---------------------------------------------------------------------------------


async def test_calls_made_in_one_turn_of_the_loop_go_out_in_one_write(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    writes: list[int] = []
    for connection in store.client.connections:
        transport = connection.transport
        assert transport is not None
        write = transport.write

        def counting(data: Any, write: Any = write) -> None:
            writes.append(len(data))
            write(data)

        transport.write = counting  # type: ignore[method-assign]
    before = store.client.writes
    outcomes = await asyncio.gather(*(store.hit(LIMIT, 1) for _ in range(50)))
    assert all(combined.decision.allowed for combined in outcomes)
    assert len(writes) == 1  # one transport.write for all 50 script calls
    assert store.client.writes - before == 1
    # ...and they are answered in order: each saw the count the one before left.
    assert [combined.decision.remaining for combined in outcomes] == [
        1_000_000 - count for count in range(1, 51)
    ]


async def test_flushes_take_the_connections_in_turn(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url, max_connections=2)
    connections = store.client.connections
    assert len(connections) == 2
    before = [connection.writes for connection in connections]
    for _ in range(4):
        await store.hit(LIMIT, 1)
    after = [connection.writes for connection in connections]
    assert [now - then for now, then in zip(after, before, strict=True)] == [2, 2]


async def test_commands_wait_for_a_busy_connection_and_leave_together(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    # At most one batch in flight per connection: what comes meanwhile goes out in one write
    # when the batch is answered, so batches grow with the load instead of system calls.
    store = await make_store(redis.url, max_connections=1, timeout=5.0)
    (connection,) = store.client.connections
    transport = connection.transport
    assert transport is not None
    before = connection.writes
    transport.pause_reading()  # Redis answers; the reply waits in the socket
    first = asyncio.ensure_future(store.hit(LIMIT, 1))
    await asyncio.sleep(0.05)
    assert connection.writes == before + 1 and connection.waiting == 1
    later = [asyncio.ensure_future(store.hit(LIMIT, 1)) for _ in range(3)]
    await asyncio.sleep(0.01)
    later.append(asyncio.ensure_future(store.hit(LIMIT, 1)))  # another turn of the loop
    await asyncio.sleep(0.01)
    assert connection.writes == before + 1  # all four wait for the first reply
    transport.resume_reading()
    outcomes = await asyncio.gather(first, *later)
    assert connection.writes == before + 2  # ...and left in one write
    assert [combined.decision.remaining for combined in outcomes] == [
        1_000_000 - count for count in range(1, 6)
    ]


async def test_a_caller_that_gives_up_leaves_the_replies_in_order(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url, max_connections=1)
    abandoned = asyncio.create_task(store.hit(LIMIT, 1))
    kept = asyncio.create_task(store.hit(LIMIT, 1))
    await asyncio.sleep(0)  # both calls are queued for this turn's write
    abandoned.cancel()
    assert (await kept).decision.remaining == 1_000_000 - 2  # the abandoned call still counted
    assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 3


# -- the script ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("functions", "flush"),
    [
        (False, [("SCRIPT", "FLUSH")]),  # EVALSHA answered NOSCRIPT
        (True, [("FUNCTION", "FLUSH")]),  # FCALL answered "Function not found"
        (True, [("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH")]),
    ],
)
async def test_a_flushed_script_is_loaded_again_transparently(
    redis: RedisServer, make_store: StoreMaker, functions: bool, flush: list[tuple[str, str]]
) -> None:
    redis.command("CONFIG", "RESETSTAT")
    store = await make_store(redis.url, functions=functions)
    assert (await store.hit(LIMIT, 1)).decision.allowed
    for command in flush:
        redis.command(*command)
    outcomes = await asyncio.gather(*(store.hit(LIMIT, 1) for _ in range(10)))
    assert sorted(combined.decision.remaining for combined in outcomes) == list(
        range(1_000_000 - 11, 1_000_000 - 1)
    )
    await store.reset("rate-limit|svc/route|minute|fp|consumer=acme")
    for command in flush:
        redis.command(*command)
    assert (await store.peek(*LIMIT[0])).remaining == 1_000_000 - 1
    assert calls_by(redis) == ({"fcall"} if functions else {"evalsha"})
    # The errors were handled and are gone: none is left as the exception being handled (an
    # `await` inside an `except` block, compiled, leaves it set, and every later exception of
    # the thread would then carry it as its context).
    assert sys.exc_info() == (None, None, None)


def calls_by(server: RedisServer) -> set[str]:
    """How the script was called since the statistics were reset: fcall, evalsha, eval."""
    stats = server.command("INFO", "commandstats").decode()
    return {name for name in ("fcall", "evalsha", "eval") if f"cmdstat_{name}:calls=" in stats}


async def test_calls_go_by_fcall_where_redis_has_functions(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    redis.command("CONFIG", "RESETSTAT")
    store = await make_store(redis.url)
    assert (await store.hit(LIMIT, 1)).decision.allowed
    await store.release("rate-limit|svc/route|minute|fp|consumer=acme", 1)
    assert calls_by(redis) == {"fcall"}
    [library] = redis.command("FUNCTION", "LIST")
    assert library[1] == FUNCTION_NAME.encode()  # named by the script's digest


async def test_a_user_refused_functions_calls_by_evalsha(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    # Managed Redis services and careful operators give gateways users without FUNCTION.
    redis.command("ACL", "SETUSER", "gateway", "on", ">secret", "~*", "+@all", "-function")
    try:
        redis.command("CONFIG", "RESETSTAT")
        port = redis.port
        store = await make_store(f"redis://gateway:secret@127.0.0.1:{port}/0")
        assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 1
        assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 2
        assert calls_by(redis) == {"evalsha"}
        assert redis.command("FUNCTION", "LIST") == []
    finally:
        redis.command("ACL", "DELUSER", "gateway")


async def test_a_library_lost_and_refused_afterwards_leaves_calls_to_evalsha(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    redis.command("ACL", "SETUSER", "gateway", "on", ">secret", "~*", "+@all")
    try:
        store = await make_store(f"redis://gateway:secret@127.0.0.1:{redis.port}/0")
        assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 1
        redis.command("ACL", "SETUSER", "gateway", "-function")
        redis.command("FUNCTION", "FLUSH")
        redis.command("CONFIG", "RESETSTAT")
        # The FCALL finds no function, the library cannot be loaded again: the same call goes
        # by EVALSHA, and so do the next ones.
        assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 2
        assert (await store.hit(LIMIT, 1)).decision.remaining == 1_000_000 - 3
        stats = redis.command("INFO", "commandstats").decode()
        assert "cmdstat_fcall:calls=1," in stats
        assert "cmdstat_evalsha:calls=2," in stats
    finally:
        redis.command("ACL", "DELUSER", "gateway")


# -- losing Redis -------------------------------------------------------------------------------


async def test_a_killed_redis_fails_calls_fast_and_is_found_again_on_restart(
    own_redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(own_redis.url, timeout=0.1)
    assert (await store.hit(LIMIT, 1)).decision.allowed
    own_redis.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.hit(LIMIT, 1)
    assert time.monotonic() - started < 0.1 + LEEWAY
    await asyncio.sleep(0.01)  # the other connection's loss is seen on the next turn too
    assert not store.available
    # While Redis is down, calls fail at once, without trying to connect.
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.hit(LIMIT, 1)
    assert time.monotonic() - started < 0.1
    own_redis.start()  # the same port; its script cache is empty
    await wait_until_available(store)
    assert (await store.hit(LIMIT, 1)).decision.allowed


async def test_a_redis_that_stops_answering_times_out_and_is_found_again(
    own_redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(own_redis.url, timeout=0.1, connect_timeout=0.2)
    assert (await store.hit(LIMIT, 1)).decision.allowed
    own_redis.pause()
    try:
        for _ in store.client.connections:  # each connection times out on its own call
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no reply within 0\.1 s"):
                await store.hit(LIMIT, 1)
            assert time.monotonic() - started < 0.1 + LEEWAY
        assert not store.available
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.hit(LIMIT, 1)
    finally:
        own_redis.resume()
    await wait_until_available(store)
    assert (await store.hit(LIMIT, 1)).decision.allowed


async def test_a_store_started_while_redis_is_down_connects_once_it_is_up() -> None:
    server = RedisServer()
    store = RedisStore(server.url, timeout=0.1, connect_timeout=0.2)
    try:
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            await store.connect()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await store.hit(LIMIT, 1)
        server.start()
        await wait_until_available(store)
        assert (await store.hit(LIMIT, 1)).decision.allowed
    finally:
        await store.close()
        server.close()


async def test_a_closed_store_fails_calls(redis: RedisServer) -> None:
    store = RedisStore(redis.url)
    assert (await store.hit(LIMIT, 1)).decision.allowed  # the first call connects
    assert store.available
    await store.close()
    assert not store.available
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.hit(LIMIT, 1)
    await store.close()


async def test_the_client_alone_pipelines_any_command(redis: RedisServer) -> None:
    client = RedisClient(redis.url)
    await client.connect()
    try:
        replies = await asyncio.gather(
            client.execute("SET", "k", 1.5),
            client.execute("INCRBYFLOAT", "k", 0.25),
            client.execute("GET", "missing"),
            client.execute("RPUSH", "list", b"\x00\xff", "é"),
            client.execute("LRANGE", "list", 0, -1),
        )
        assert list(replies) == [b"OK", b"1.75", None, 2, [b"\x00\xff", "é".encode()]]
        assert "connections=2/2" in repr(client)
    finally:
        await client.close()


# -- logging in ---------------------------------------------------------------------------------


async def test_password_and_database_come_from_the_url(make_store: StoreMaker) -> None:
    with RedisServer(password="s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        store = await make_store(url, clock=FakeClock())
        await store.hit([("acme", FixedWindow(5, 60))], 1)
        assert server.command("DBSIZE", db=3) == 1
        assert server.command("DBSIZE") == 0
        wrong = RedisStore(f"redis://:nope@127.0.0.1:{server.port}/0", connect_timeout=0.5)
        try:
            with pytest.raises(StoreUnavailable, match=r"WRONGPASS|invalid"):
                await wrong.connect()
        finally:
            await wrong.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Any:
    """A server that speaks TLS on `tls_port` (and plain TCP on `port`, to set it up)."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    paths = {"cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}
    certificate.cert_chain_pems[0].write_to_path(paths["cert"])
    certificate.private_key_pem.write_to_path(paths["key"])
    authority.cert_pem.write_to_path(tmp_path / "ca.pem")
    tls_port = free_port()
    extra = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(paths["cert"]),
        "--tls-key-file",
        str(paths["key"]),
        "--tls-ca-cert-file",
        str(tmp_path / "ca.pem"),
        "--tls-auth-clients",
        "no",
    )
    with RedisServer(extra=extra):
        context = ssl.create_default_context()
        authority.configure_trust(context)
        yield tls_port, context


async def test_rediss_urls_speak_tls(tls_redis: Any, make_store: StoreMaker) -> None:
    port, context = tls_redis
    store = await make_store(f"rediss://127.0.0.1:{port}", ssl_context=context)
    assert (await store.hit(LIMIT, 1)).decision.allowed
    untrusting = RedisStore(f"rediss://127.0.0.1:{port}", connect_timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.connect()
    finally:
        await untrusting.close()


async def test_calls_for_different_clients_in_one_turn_share_one_write(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    # Different limits and clients in one turn: still one write, each answered on its own.
    store = await make_store(redis.url, clock=FakeClock())
    before = store.client.writes
    outcomes = await asyncio.gather(
        *(store.hit([(f"r|bucket|fp|client-{index}", TokenBucket(1, 3))], 2) for index in range(5)),
        store.hit([("r|bucket|fp|client-0", TokenBucket(1, 3))], 2),
    )
    assert store.client.writes - before == 1
    assert [combined.decision.allowed for combined in outcomes] == [True] * 5 + [False]
