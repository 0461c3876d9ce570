"""A lean asyncio Redis client: pipelined, coalesced commands over a small pool of connections.

Written on `asyncio.Protocol` + `hiredis.Reader` rather than redis-py: measured with 64
requests in flight, redis-py's asyncio client spends 43-68 µs of client CPU per call (a
connection checked out of a pool, a lock, a task and a parser per command), which alone caps
a core near 15,000 calls a second. The rate-limit store needs one thing, a script call per
request, so this client does only what that needs, cheaply:

- **Pipelining.** A connection writes commands without waiting for replies and keeps a deque
  of the futures waiting; Redis answers in order, so each reply resolves the oldest future.
- **Coalescing.** Every command submitted during one turn of the event loop goes out in one
  `transport.write` (the first schedules a flush with `call_soon`; the rest join its buffer):
  64 requests in flight cost a few system calls, not 64. A connection has at most one batch
  in flight: while all of them wait for replies, new commands wait too and leave together
  when one is answered, so batches grow with the load (as auto-pipelining clients do).
- **A small pool**, `max_connections` (2 by default), taking the flushes in turn: a
  connection lost or dropped leaves the others serving while it is replaced.
- **Timeouts.** The connection (TCP, TLS, AUTH, SELECT and a PING) must be up within
  `connect_timeout`; a command must have its reply within `timeout`, or its connection is
  dropped and every command waiting on it fails with `StoreUnavailable`: a connection that
  does not answer may be dead (a half-open TCP connection never says so), and every command
  pipelined behind the late one would wait as long.
- **Failing fast.** While no connection is up, commands fail at once with `StoreUnavailable`
  rather than each trying to connect; one background task reconnects, with backoff, and
  `available` says which state the client is in.

RESP is encoded here by hand (bulk strings only, which is what Redis expects from clients);
replies are parsed by hiredis, in C. Error replies come back as `RedisReplyError`, except those
that mean the server cannot serve right now (loading, busy, read-only replica...), which are
`StoreUnavailable` as a lost connection is. URLs: ``redis://[[user]:password@]host[:port][/db]``
and ``rediss://`` (TLS).
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

import hiredis

from tollgate.errors import TollgateError

DEFAULT_PORT: Final = 6379
# A command waits this long for its reply: a Redis on the same network answers in well under
# a millisecond, and a rate-limit check must not hold a request up for longer than this.
DEFAULT_TIMEOUT: Final = 0.1
# TCP (and TLS) handshakes, AUTH, SELECT and a PING: milliseconds on a LAN; a second covers a
# loaded server without holding the first requests long.
DEFAULT_CONNECT_TIMEOUT: Final = 1.0
# Redis is single-threaded: more connections add no throughput, two keep one slow read from
# delaying every batch.
DEFAULT_MAX_CONNECTIONS: Final = 2
# Reconnection attempts start soon after a connection is lost and back off to one a second: a
# Redis back from a restart serves again within a second, and one attempt a second at an
# absent server costs nothing. Each wait is jittered so that many workers do not all
# reconnect in the same millisecond.
RECONNECT_FIRST_DELAY: Final = 0.05
RECONNECT_MAX_DELAY: Final = 1.0

# Error replies that mean "not now" rather than "wrong command": the server is starting up,
# busy with a long script, a replica after a failover, or a cluster reconfiguring.
UNAVAILABLE_REPLIES: Final = (
    "LOADING",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
)

Argument = bytes | str | int | float


class StoreUnavailable(TollgateError):
    """Redis cannot be reached, did not answer in time, or cannot serve right now."""

    status = 503
    error_type = "store_unavailable"


class RedisReplyError(TollgateError):
    """An error reply from Redis: the command was refused (`message` is Redis' own)."""

    error_type = "redis_error"


# -- RESP encoding -----------------------------------------------------------------------------


def encode_argument(argument: Argument) -> bytes:
    """One argument as a RESP bulk string: ``$<length>\\r\\n<bytes>\\r\\n``.

    Strings are UTF-8; integers in decimal; floats as `repr` writes them, the shortest text
    that reads back as the same double (Redis parses it with `strtod`, exactly).
    """
    if isinstance(argument, bytes):
        data = argument
    elif isinstance(argument, str):
        data = argument.encode()
    elif isinstance(argument, bool):
        raise TypeError("a Redis argument is bytes, str, int or float, not bool")
    elif isinstance(argument, int):
        data = b"%d" % argument
    elif isinstance(argument, float):
        if math.isnan(argument):
            raise ValueError("NaN is not a number Redis accepts")
        data = repr(argument).encode()
    else:
        raise TypeError(f"a Redis argument is bytes, str, int or float, not {argument!r}")
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*arguments: Argument) -> bytes:
    """A command (name first) as a RESP array of bulk strings."""
    if not arguments:
        raise ValueError("a command needs at least its name")
    return b"*%d\r\n" % len(arguments) + b"".join(map(encode_argument, arguments))


# -- addresses ---------------------------------------------------------------------------------


class RedisAddress(NamedTuple):
    """Where a Redis server is and how to log in, from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """``redis://[[user]:password@]host[:port][/db]``; ``rediss://`` for TLS."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number (/0, /1...), not {path!r}")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            host=parts.hostname or "localhost",
            port=port,
            db=int(path) if path else 0,
            username=username,
            password=password,
            tls=parts.scheme == "rediss",
        )

    def __str__(self) -> str:
        """The URL without the credentials (for messages and logs)."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


# -- one connection ----------------------------------------------------------------------------


class RedisConnection(asyncio.Protocol):
    """One pipelined connection: writes batches of commands, matches replies in order.

    `send` takes the encoded commands of one batch and their futures; every reply resolves
    the oldest waiting future. A batch without every reply `timeout` seconds after it was
    written drops the connection (one timer watches the oldest batch still waiting). Once
    dropped (or lost), every waiting future fails with `StoreUnavailable` and `on_lost` is
    called once.
    """

    __slots__ = (
        "_batches",
        "_loop",
        "_pending",
        "_reader",
        "_received",
        "_sent",
        "_timeout",
        "_transport",
        "_watchdog",
        "_where",
        "closed",
        "on_idle",
        "on_lost",
        "writes",
    )

    def __init__(self, where: str, timeout: float) -> None:
        self._where = where
        self._timeout = timeout
        # Called with this connection once it is lost or dropped (set once it is set up).
        self.on_lost: Callable[[RedisConnection], None] | None = None
        # Called with this connection when the last reply it waited for has come in.
        self.on_idle: Callable[[RedisConnection], None] | None = None
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Commands written and replies read since the connection was made: a batch is answered
        # once `_received` reaches the `_sent` it was written at.
        self._sent = 0
        self._received = 0
        # (`_sent` after the batch, loop time it was written) of the batches that may still be
        # waiting, oldest first, and the one timer that checks the oldest: a timer per batch
        # costs about 2.5 µs in uvloop, more than the rest of a small batch's client work.
        self._batches: deque[tuple[int, float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.writes = 0
        self.closed = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        pending = self._pending
        reader.feed(data)
        received = 0
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                future = pending.popleft()
                received += 1
                if not future.done():  # its caller may have given up (cancelled)
                    if isinstance(reply, RedisReplyError):
                        future.set_exception(_classify(reply))
                    else:
                        future.set_result(reply)
        except hiredis.ProtocolError as error:
            self.drop(f"Redis at {self._where} broke the protocol: {error}")
        except IndexError:
            self.drop(f"Redis at {self._where} sent a reply to no command")
        self._received += received
        if received and not pending and not self.closed and self.on_idle is not None:
            self.on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._lose(f"the connection to Redis at {self._where} was lost{reason}")

    # -- commands

    def send(self, data: bytes, futures: Sequence[asyncio.Future[Any]]) -> None:
        """Write one batch of encoded commands; `futures` get their replies, in order."""
        transport = self._transport
        if self.closed or transport is None:
            error = f"the connection to Redis at {self._where} is closed"
            for future in futures:
                if not future.done():
                    future.set_exception(StoreUnavailable(error))
            return
        self._pending.extend(futures)
        sent = self._sent = self._sent + len(futures)
        transport.write(data)
        self.writes += 1
        loop = self._loop
        assert loop is not None
        self._batches.append((sent, loop.time()))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_answered)

    def _check_answered(self) -> None:
        """Drop the connection if its oldest batch still waiting is `timeout` old; else look
        again when it will be."""
        self._watchdog = None
        if self.closed:
            return
        batches = self._batches
        received = self._received
        while batches and batches[0][0] <= received:
            batches.popleft()
        if not batches:
            return
        loop = self._loop
        assert loop is not None
        due = batches[0][1] + self._timeout
        if loop.time() >= due:
            self.drop(f"Redis at {self._where} sent no reply within {self._timeout:g} s")
        else:
            self._watchdog = loop.call_at(due, self._check_answered)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    @property
    def waiting(self) -> int:
        """Commands written and not yet answered."""
        return len(self._pending)

    def drop(self, reason: str) -> None:
        """Close the connection now, failing every command waiting on it with `reason`."""
        if self._transport is not None:
            self._transport.abort()
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._batches.clear()
        pending = self._pending
        while pending:
            future = pending.popleft()
            if not future.done():
                future.set_exception(StoreUnavailable(reason))
        if self.on_lost is not None:
            self.on_lost(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"RedisConnection({self._where}, {state}, waiting={len(self._pending)}, "
            f"writes={self.writes})"
        )


def _classify(reply: RedisReplyError) -> TollgateError:
    """The error a caller sees for an error reply: `StoreUnavailable` if it means "not now"."""
    if reply.message.startswith(UNAVAILABLE_REPLIES):
        return StoreUnavailable(f"Redis cannot serve now: {reply.message}")
    return reply


# -- the client --------------------------------------------------------------------------------


class _Lifecycle(Enum):
    """A client is made, opened by `connect`, closed by `close`; never opened again."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class RedisClient:
    """Commands to one Redis server over a pool of pipelined connections.

    `await connect()` opens the pool (`StoreUnavailable` if no connection comes up; the
    client then keeps trying in the background). `execute` and `execute_encoded` queue a
    command for this turn of the event loop and return the future of its reply. While no
    connection is up they raise `StoreUnavailable` at once.
    """

    __slots__ = (
        "_connect_timeout",
        "_connections",
        "_last_error",
        "_loop",
        "_max_connections",
        "_next",
        "_queued",
        "_queued_futures",
        "_reconnecting",
        "_ssl_context",
        "_state",
        "_timeout",
        "address",
        "writes",
    )

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if isinstance(max_connections, bool) or max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        self.address = RedisAddress.parse(url)
        self._timeout = float(timeout)
        self._connect_timeout = float(connect_timeout)
        self._max_connections = max_connections
        if self.address.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl_context = ssl_context if self.address.tls else None
        self._connections: list[RedisConnection] = []  # the live ones
        self._next = 0  # the live connection that takes the next flush
        # Commands submitted this turn of the event loop, and their futures.
        self._queued: list[bytes] = []
        self._queued_futures: list[asyncio.Future[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._last_error = "not connected yet"
        self._state = _Lifecycle.NEW
        # Batches written, every connection included: a statistic (and how tests see coalescing).
        self.writes = 0

    @property
    def available(self) -> bool:
        """Whether a connection is up: commands are sent rather than failed at once."""
        return bool(self._connections)

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def connections(self) -> tuple[RedisConnection, ...]:
        """The connections up now."""
        return tuple(self._connections)

    async def connect(self) -> None:
        """Open the pool. `StoreUnavailable` if no connection comes up (retried in background).

        Calling it again is harmless; a closed client cannot be opened again.
        """
        if self._state is _Lifecycle.CLOSED:
            raise StoreUnavailable("the Redis client is closed")
        if self._state is _Lifecycle.OPEN:
            return
        self._state = _Lifecycle.OPEN
        self._loop = asyncio.get_running_loop()
        opened = await asyncio.gather(
            *(self._open() for _ in range(self._max_connections)), return_exceptions=True
        )
        for outcome in opened:
            if isinstance(outcome, RedisConnection):
                if self._state is _Lifecycle.CLOSED:
                    outcome.drop("the Redis client is closed")
                else:
                    self._connections.append(outcome)
            elif isinstance(outcome, StoreUnavailable):
                self._last_error = outcome.message
            else:
                raise outcome
        if len(self._connections) < self._max_connections:
            self._reconnect_soon()
        if not self._connections:
            raise StoreUnavailable(self._last_error)

    def execute(self, *arguments: Argument) -> asyncio.Future[Any]:
        """Queue a command; the future resolves to its reply (an error reply raises)."""
        return self.execute_encoded(encode_command(*arguments))

    def execute_encoded(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one command already encoded in RESP (see `encode_command`)."""
        if not self._connections:
            raise self.unavailable_error()
        loop = self._loop
        assert loop is not None
        future = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append(command)
        self._queued_futures.append(future)
        return future

    def _flush(self) -> None:
        """Write what is queued, in one write, on a connection with no batch in flight.

        While every connection waits for replies, the commands wait too, and go out together
        as soon as one connection has all its replies (`_idle`): at most one batch is in
        flight per connection, so under load batches grow instead of system calls, in the
        gateway and in Redis (a batch costs Redis a read, a write and a wake-up whatever its
        size). With nothing in flight, a command goes out at the end of its loop turn, as
        it would without the wait.
        """
        commands = self._queued
        if not commands:
            return
        connections = self._connections
        if not connections:
            futures = self._queued_futures
            self._queued = []
            self._queued_futures = []
            error = self.unavailable_error()
            for future in futures:
                if not future.done():
                    future.set_exception(StoreUnavailable(error.message))
            return
        count = len(connections)
        for step in range(count):
            index = (self._next + step) % count
            connection = connections[index]
            if not connection.waiting:
                break
        else:
            return  # every connection has a batch in flight: `_idle` sends these
        self._next = index + 1
        futures = self._queued_futures
        self._queued = []
        self._queued_futures = []
        connection.send(b"".join(commands), futures)
        self.writes += 1

    def _idle(self, connection: RedisConnection) -> None:
        """`connection` has every reply it waited for: send what waited meanwhile."""
        if self._queued:
            self._flush()

    def unavailable_error(self) -> StoreUnavailable:
        """The error a command gets while no connection is up, with the last reason known."""
        if self._state is _Lifecycle.CLOSED:
            return StoreUnavailable("the Redis client is closed")
        if self._state is _Lifecycle.NEW:
            return StoreUnavailable(f"the Redis client for {self.address} is not connected yet")
        return StoreUnavailable(f"Redis at {self.address} is unavailable: {self._last_error}")

    # -- connections

    async def _open(self) -> RedisConnection:
        """A new connection, logged in, on the database, answering: or StoreUnavailable."""
        loop = asyncio.get_running_loop()
        address = self.address
        where = str(address)
        connection = RedisConnection(where, self._timeout)
        setup: list[bytes] = []
        if address.password is not None:
            if address.username:
                setup.append(encode_command("AUTH", address.username, address.password))
            else:
                setup.append(encode_command("AUTH", address.password))
        if address.db:
            setup.append(encode_command("SELECT", address.db))
        # A server that accepts connections but answers nothing (stopped, wedged) is down.
        setup.append(encode_command("PING"))
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    address.host,
                    address.port,
                    ssl=self._ssl_context,
                    server_hostname=address.host if self._ssl_context is not None else None,
                )
                replies = [loop.create_future() for _ in setup]
                connection.send(b"".join(setup), replies)
                for reply in replies:
                    await reply
        except (OSError, TimeoutError, TollgateError) as error:
            connection.drop("connection setup failed")
            reason = str(error) or type(error).__name__
            if isinstance(error, TimeoutError):
                reason = f"no connection within {self._connect_timeout:g} s"
            raise StoreUnavailable(f"cannot connect to Redis at {where}: {reason}") from error
        except BaseException:
            connection.drop("connection setup cancelled")
            raise
        connection.on_lost = self._lost
        connection.on_idle = self._idle
        return connection

    def _lost(self, connection: RedisConnection) -> None:
        try:
            self._connections.remove(connection)
        except ValueError:
            return
        self._last_error = "connection lost"
        self._reconnect_soon()
        if self._queued and self._loop is not None:
            # Commands waiting for a busy connection: another one takes them, or they fail.
            self._loop.call_soon(self._flush)

    def _reconnect_soon(self) -> None:
        if self._state is not _Lifecycle.OPEN or self._reconnecting is not None:
            return
        assert self._loop is not None
        self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        try:
            while self._state is _Lifecycle.OPEN and len(self._connections) < self._max_connections:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                try:
                    connection = await self._open()
                except StoreUnavailable as error:
                    self._last_error = error.message
                    delay = min(2 * delay, RECONNECT_MAX_DELAY)
                    continue
                if self._state is not _Lifecycle.OPEN:
                    connection.drop("the Redis client is closed")
                    return
                self._connections.append(connection)
                delay = RECONNECT_FIRST_DELAY
        finally:
            self._reconnecting = None

    async def close(self) -> None:
        """Close every connection (waiting commands fail) and stop reconnecting."""
        if self._state is _Lifecycle.CLOSED:
            return
        self._state = _Lifecycle.CLOSED
        task = self._reconnecting
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        connections = self._connections
        self._connections = []
        for connection in connections:
            connection.drop("the Redis client is closed")
        self._flush()  # fails whatever was queued this turn

    def __repr__(self) -> str:
        return (
            f"RedisClient({self.address}, {self._state.value}, "
            f"connections={len(self._connections)}/{self._max_connections}, "
            f"writes={self.writes})"
        )
