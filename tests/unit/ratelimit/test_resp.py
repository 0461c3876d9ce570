"""The Redis client's sans-server parts: RESP encoding, URLs, and reply matching fed byte by byte.

A `RedisConnection` is driven by hand here: a transport that records what is written, replies
fed as Redis would send them, one byte at a time. The client against a real server is tested
in tests/integration/redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tollgate.ratelimit.resp import (
    RedisAddress,
    RedisClient,
    RedisConnection,
    RedisReplyError,
    StoreUnavailable,
    encode_argument,
    encode_command,
)

# -- encoding -----------------------------------------------------------------------------------


def test_every_argument_type_is_a_bulk_string() -> None:
    assert encode_argument(b"a\r\nb") == b"$4\r\na\r\nb\r\n"
    assert encode_argument("é") == b"$2\r\n\xc3\xa9\r\n"
    assert encode_argument("") == b"$0\r\n\r\n"
    assert encode_argument(-42) == b"$3\r\n-42\r\n"
    assert encode_argument(0.1) == b"$3\r\n0.1\r\n"
    assert encode_argument(1e300) == b"$6\r\n1e+300\r\n"
    assert encode_argument(float("inf")) == b"$3\r\ninf\r\n"


def test_floats_are_written_so_that_they_read_back_as_the_same_double() -> None:
    for value in (0.1 + 0.2, 1_700_000_000.123456, 5e-324, 2.0**60 + 0.5):
        data = encode_argument(value).split(b"\r\n")[1]
        assert float(data) == value


def test_bools_and_nan_are_refused() -> None:
    with pytest.raises(TypeError, match="bool"):
        encode_argument(True)
    with pytest.raises(ValueError, match="NaN"):
        encode_argument(float("nan"))
    with pytest.raises(TypeError):
        encode_argument(None)  # type: ignore[arg-type]


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command("SET", "k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    with pytest.raises(ValueError, match="name"):
        encode_command()


# -- URLs ---------------------------------------------------------------------------------------


def test_a_plain_url_takes_the_defaults() -> None:
    assert RedisAddress.parse("redis://cache") == RedisAddress(
        "cache", 6379, 0, None, None, tls=False
    )


def test_a_url_carries_password_user_database_and_tls() -> None:
    address = RedisAddress.parse("rediss://:s%40cret@10.0.0.5:6380/3")
    assert address == RedisAddress("10.0.0.5", 6380, 3, None, "s@cret", tls=True)
    address = RedisAddress.parse("redis://gateway:pw@[::1]:7000/1")
    assert (address.host, address.port, address.username, address.password) == (
        "::1",
        7000,
        "gateway",
        "pw",
    )


def test_a_url_renders_without_its_credentials() -> None:
    assert str(RedisAddress.parse("redis://:secret@cache:6380/2")) == "redis://cache:6380/2"
    assert str(RedisAddress.parse("rediss://[::1]")) == "rediss://[::1]:6379/0"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache", "redis://"),
        ("redis://cache/db1", "database"),
        ("redis://cache:port", "port"),
    ],
)
def test_invalid_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisAddress.parse(url)


def test_client_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        RedisClient("redis://cache", timeout=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        RedisClient("redis://cache", connect_timeout=float("inf"))
    with pytest.raises(ValueError, match="max_connections"):
        RedisClient("redis://cache", max_connections=0)


async def test_a_client_not_connected_fails_commands_at_once() -> None:
    client = RedisClient("redis://cache")
    assert not client.available
    with pytest.raises(StoreUnavailable, match="not connected"):
        client.execute("PING")
    await client.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        client.execute("PING")


# -- one connection, driven by hand -------------------------------------------------------------


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def connection(timeout: float = 60.0) -> tuple[RedisConnection, RecordingTransport, list[Any]]:
    lost: list[Any] = []
    made = RedisConnection("redis://test:6379/0", timeout)
    made.on_lost = lost.append
    transport = RecordingTransport()
    made.connection_made(transport)
    return made, transport, lost


def futures(count: int) -> list[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(count)]


def feed_byte_by_byte(target: RedisConnection, data: bytes) -> None:
    for index in range(len(data)):
        target.data_received(data[index : index + 1])


async def test_a_batch_is_one_write_and_replies_resolve_futures_in_order() -> None:
    target, transport, _ = connection()
    first = futures(3)
    target.send(b"<three commands>", first)
    second = futures(1)
    target.send(b"<one more>", second)
    assert transport.written == [b"<three commands>", b"<one more>"]
    assert target.waiting == 4
    feed_byte_by_byte(target, b"+OK\r\n:42\r\n*2\r\n$1\r\na\r\n$-1\r\n$3\r\nend\r\n")
    assert [future.result() for future in first + second] == [b"OK", 42, [b"a", None], b"end"]
    assert target.waiting == 0


async def test_an_error_reply_fails_only_its_own_command() -> None:
    target, _, lost = connection()
    waiting = futures(3)
    target.send(b"...", waiting)
    feed_byte_by_byte(target, b":1\r\n-NOSCRIPT No matching script\r\n:3\r\n")
    assert waiting[0].result() == 1
    error = waiting[1].exception()
    assert isinstance(error, RedisReplyError)
    assert error.message == "NOSCRIPT No matching script"
    assert waiting[2].result() == 3
    assert not lost and not target.closed


async def test_replies_that_mean_not_now_are_store_unavailable() -> None:
    target, _, _ = connection()
    waiting = futures(2)
    target.send(b"...", waiting)
    target.data_received(b"-LOADING Redis is loading the dataset in memory\r\n")
    target.data_received(b"-READONLY You can't write against a read only replica.\r\n")
    for future in waiting:
        assert isinstance(future.exception(), StoreUnavailable)


async def test_a_reply_for_a_caller_that_gave_up_is_skipped_in_order() -> None:
    target, _, _ = connection()
    waiting = futures(3)
    target.send(b"...", waiting)
    waiting[1].cancel()
    target.data_received(b":1\r\n:2\r\n:3\r\n")
    assert waiting[0].result() == 1
    assert waiting[2].result() == 3


async def test_a_protocol_error_drops_the_connection_and_fails_every_waiting_command() -> None:
    target, transport, lost = connection()
    waiting = futures(2)
    target.send(b"...", waiting)
    target.data_received(b"?garbage\r\n")
    assert transport.aborted and target.closed
    assert lost == [target]
    for future in waiting:
        assert isinstance(future.exception(), StoreUnavailable)
    late = futures(1)
    target.send(b"...", late)
    assert isinstance(late[0].exception(), StoreUnavailable)
    assert transport.written == [b"..."]  # nothing written once closed


async def test_a_reply_to_no_command_drops_the_connection() -> None:
    target, transport, lost = connection()
    target.data_received(b"+OK\r\n")
    assert transport.aborted and lost == [target]


async def test_a_batch_without_its_replies_in_time_drops_the_connection() -> None:
    target, transport, lost = connection(timeout=0.01)
    answered = futures(1)
    target.send(b"...", answered)
    target.data_received(b"+OK\r\n")
    waiting = futures(2)
    target.send(b"...", waiting)
    with pytest.raises(StoreUnavailable, match=r"no reply within 0\.01 s"):
        await waiting[0]
    assert isinstance(waiting[1].exception(), StoreUnavailable)
    assert answered[0].result() == b"OK"
    assert transport.aborted and lost == [target]


async def test_a_batch_written_after_the_watchdog_was_armed_gets_its_whole_timeout() -> None:
    # One timer watches the oldest batch still waiting: a batch written later is judged by
    # its own writing time, not by the first batch's.
    target, transport, lost = connection(timeout=0.5)
    first = futures(1)
    target.send(b"...", first)
    await asyncio.sleep(0.3)
    second = futures(1)
    target.send(b"...", second)
    target.data_received(b":1\r\n")
    await asyncio.sleep(0.3)  # the timer fired at 0.5 s: the second batch is 0.2 s old
    assert not target.closed
    target.data_received(b":2\r\n")
    assert (first[0].result(), second[0].result()) == (1, 2)
    await asyncio.sleep(0.3)
    assert not target.closed and not transport.aborted and lost == []


async def test_a_lost_connection_fails_what_waits_and_reports_once() -> None:
    target, _, lost = connection()
    waiting = futures(1)
    target.send(b"...", waiting)
    target.connection_lost(ConnectionResetError("reset by peer"))
    target.connection_lost(None)
    with pytest.raises(StoreUnavailable, match="lost: reset by peer"):
        waiting[0].result()
    assert lost == [target]
    assert "closed" in repr(target)
