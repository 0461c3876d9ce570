"""The cluster-wide store of rate-limit state: Redis, decided by a script in one round trip.

Every gateway node shares the counters. A request's limits are decided together by one call
of the script in `tollgate.ratelimit.redis_script`: Redis runs it alone, so reading the
states, deciding with every limit and writing the new states (only if all admit) is one
atomic step, as `decide_all` over a `ProcessStore` is in one worker.

The script is loaded twice over, in one round trip: as a script (``SCRIPT LOAD``) and as a
function library (``FUNCTION LOAD``, Redis 7 and later). Calls are ``FCALL`` where the library
loaded, which costs Redis less per call (it makes the script's helpers once), and ``EVALSHA``
where it did not (Redis 6, or a user the ACL refuses ``FUNCTION``). Both are loaded again when
Redis answers that it lacks them (``NOSCRIPT``, or ``Function not found``: after a restart, a
failover, ``SCRIPT FLUSH`` or ``FUNCTION FLUSH``), and the call is then sent again, which is
safe: a call that found nothing to run ran nothing. The library is named after the script's
digest, so that gateways of two versions sharing one Redis call each their own; a version's
library stays in Redis (functions are kept, as data is) until ``FUNCTION DELETE``.

The script makes the decisions the pure algorithms make (see the script's module for why they
are equal bit for bit) and reports the one `decide_all` would, so that the client only turns
seven values into a `Decision`. Its API is that of the other stores, made async: `hit`,
`peek`, `reset`, `release`.

**Time.** By default every decision reads the Redis server's clock (``TIME`` inside the
script), so nodes whose clocks disagree still agree on windows and buckets. A `clock` given to
the store (tests) is read instead and its time passed in, so that decisions can be compared
with the pure algorithms at chosen instants.

**Quotas** count per calendar day or month in a time zone, and Lua has no time-zone database:
the store computes, from its own clock, the current period's start and end and the next
period's end, and the script takes the current period, or the next one once Redis' time has
reached its start. The node's clock therefore only matters within its skew of a period
boundary: a node whose clock is behind Redis' is exact, and one ahead by `s` seconds counts
the requests of the old period's last `s` seconds in the new period.

**Keys.** A limit key ``{scope}|{limit name}|{fingerprint}|{client key}`` is stored under
``<prefix>{<tag>}<kind code>:<limit key>``. The ``{tag}`` is a Redis Cluster hash tag: only it
chooses the cluster slot, and a script's keys must all live in one slot. The tag is a hash of
the key's last ``|``-separated part: the keys of one request differ only in their limit's
name and fingerprint and end with the same client key, so they share the tag (a compound
client key, ``consumer=acme|ip=1.2.3.4``, ends with the same part too); different clients
spread over the slots. Hashing keeps braces in client keys from breaking the tag and bounds
its length. The kind code (one letter per algorithm) keeps two algorithms on one key apart.

Keys expire (``PX``/``PEXPIRE``) a second after the algorithm's `expires_at`, so idle state
vanishes by itself. A concurrency key holds what is in flight until released, and expires
after an hour with no acquire or release (what a dead node held comes back).

**Failures.** Redis unreachable, a reply not back within `timeout`, or a server that cannot
serve now all raise `StoreUnavailable` (from `tollgate.ratelimit.resp`, which also fails fast
while Redis is down and reconnects in the background): the policy decides whether that admits
or rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import struct
from collections.abc import Sequence
from typing import Any, Final

from tollgate.clock import SYSTEM_CLOCK, Clock
from tollgate.ratelimit.algorithms import (
    TOKEN_EPSILON,
    CalendarQuota,
    CombinedDecision,
    Concurrency,
    Decision,
    FixedWindow,
    LeakyBucket,
    RateAlgorithm,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from tollgate.ratelimit.redis_script import (
    FUNCTION_NAME,
    KIND_CODES,
    LIBRARY,
    PARAMETERS,
    SCRIPT,
    SCRIPT_SHA,
)
from tollgate.ratelimit.resp import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    RedisClient,
    RedisReplyError,
    StoreUnavailable,
    encode_argument,
)
from tollgate.ratelimit.store import Limit

DEFAULT_KEY_PREFIX: Final = "tollgate:rl:"
# Bytes of the hash in a key's tag (12 hex digits): enough to spread clients over the 16,384
# slots of a cluster.
TAG_BYTES: Final = 6
# Limits whose encoded key and parameters a store remembers, cleared when full: hashing and
# encoding are a good part of a call's client CPU, and the same keys come back request after
# request.
KEY_CACHE_SIZE: Final = 4096
# Quotas whose current period a store remembers (a handful per config), cleared when full.
QUOTA_CACHE_SIZE: Final = 1024

_COST_ERROR = "a request's cost is an integer of at least 1, not {!r}"

_EVALSHA = encode_argument("EVALSHA") + encode_argument(SCRIPT_SHA)
_FCALL = encode_argument("FCALL") + encode_argument(FUNCTION_NAME)
# What Redis answers a call of a script or function it does not have.
_NO_SCRIPT = "NOSCRIPT"
_NO_FUNCTION = "ERR Function not found"
_HIT = encode_argument("h")
_PEEK = encode_argument("p")
_RELEASE = encode_argument("r")
_SERVER_TIME = encode_argument("")
_DEL = encode_argument("DEL")
# Encoded once: costs, key counts and array lengths are small integers.
_SMALL = 64
_INTEGERS = tuple(encode_argument(number) for number in range(_SMALL))
_ARRAYS = tuple(b"*%d\r\n" % length for length in range(_SMALL))


def _parameters(algorithm: RateAlgorithm[Any]) -> tuple[Any, ...]:
    """The script's arguments for `algorithm`: its kind's code, then its PARAMETERS."""
    if isinstance(algorithm, FixedWindow | SlidingWindowCounter | SlidingWindowLog):
        values: tuple[Any, ...] = (algorithm.limit, algorithm.window)
    elif isinstance(algorithm, TokenBucket):
        values = (algorithm.burst, algorithm.rate)
    elif isinstance(algorithm, LeakyBucket):
        # LeakyBucket's `_room`, from the same operands in the same order.
        room = algorithm.max_delay * algorithm.rate + TOKEN_EPSILON
        values = (algorithm.rate, room, algorithm.capacity)
    elif isinstance(algorithm, Concurrency):
        values = (algorithm.limit, algorithm.retry_after)
    else:  # quotas take their periods per call: see RedisStore._quota_parameters
        raise ValueError(f"the Redis store has no script for {algorithm!r}")
    return (KIND_CODES[algorithm.kind], *values)


def hash_tag(key: str) -> str:
    """The Redis Cluster hash tag of a limit key: a hash of its last `|`-separated part."""
    client = key.rpartition("|")[2]
    return hashlib.blake2b(client.encode(), digest_size=TAG_BYTES).hexdigest()


class RedisStore:
    """Rate-limit states in Redis, shared by every node; one script call per request.

    The first call connects (or call `connect` at start-up). With `clock=None` time is the
    Redis server's; a `clock` (tests) is read instead. `key_prefix` starts every key (no
    braces: they would move the hash tag). With `functions=False` calls go by EVALSHA even
    where Redis has functions.
    """

    __slots__ = (
        "_client",
        "_clock",
        "_encoded",
        "_functions",
        "_invoke",
        "_key_prefix",
        "_loading",
        "_quota_bounds",
        "_ready",
        "_starting",
    )

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        clock: Clock | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        functions: bool = True,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"a key prefix has no braces (they make hash tags): {key_prefix!r}")
        self._client = RedisClient(
            url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            ssl_context=ssl_context,
        )
        self._clock = clock
        self._key_prefix = key_prefix
        # (limit key, algorithm) -> its Redis key and its parameters, encoded as arguments,
        # and how many arguments the parameters are. A quota's parameters change with the
        # period: the entry holds the quota, and `_quota_parameters` encodes them.
        self._encoded: dict[Limit, tuple[bytes, bytes | CalendarQuota, int]] = {}
        # quota -> (period start, period end, its encoded parameters), by the local clock.
        self._quota_bounds: dict[CalendarQuota, tuple[float, float, bytes]] = {}
        self._starting: asyncio.Future[None] | None = None
        self._ready = False  # the first connection attempt is over (whatever its outcome)
        self._loading: asyncio.Future[None] | None = None
        # How a call starts: FCALL once the library is loaded, else EVALSHA.
        self._functions = functions
        self._invoke = _EVALSHA

    @property
    def available(self) -> bool:
        """Whether Redis is connected: calls are sent rather than failed at once."""
        return self._client.available

    @property
    def client(self) -> RedisClient:
        """The connections to Redis (their statistics: `writes`, `connections`)."""
        return self._client

    async def connect(self) -> None:
        """Connect and load the script now rather than on the first call.

        `StoreUnavailable` if Redis cannot be reached; the store keeps trying in the
        background, and calls fail fast meanwhile.
        """
        starting = self._starting
        if starting is None:
            starting = self._starting = asyncio.ensure_future(self._start())
        if not starting.done():
            await asyncio.shield(starting)
        elif not self._client.available:
            raise self._client.unavailable_error()

    async def _start(self) -> None:
        try:
            await self._client.connect()
            await self._load_script()
        finally:
            self._ready = True

    async def close(self) -> None:
        """Close the connections; calls fail with `StoreUnavailable` from now on."""
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        await self._client.close()

    # -- the Store API, async

    async def hit(self, limits: Sequence[Limit], cost: int) -> CombinedDecision:
        """Decide on a request of `cost` against every limit at once, in one round trip.

        As `decide_all`: admitted only if every limit admits, and then every limit counts it;
        if any rejects, none does. The decision and `limit_index` are those `decide_all`
        reports; `states` is empty (the states stay in Redis).
        """
        _check_hit(limits, cost)
        # `_evaluate`, inlined: a coroutine less per request.
        if not self._ready:
            await self._first_connection()
        command = self._call(_HIT, limits, cost)  # once connected: FCALL or EVALSHA
        # No `await` inside an `except` block in this compiled module: mypyc's coroutines would
        # leave the handled error set as the thread's current exception (a test checks).
        failed: RedisReplyError | None = None
        try:
            reply = await self._client.execute_encoded(command)
        except RedisReplyError as error:
            failed = error
        if failed is not None:
            reply = await self._after_error(failed, command)
        index, decision = _reported(reply)
        return CombinedDecision(decision, index, ())

    def hit_reply(self, limits: Sequence[Limit], cost: int) -> asyncio.Future[Any] | None:
        """`hit`'s round trip started, for the request path: the Future of the script's reply
        (`decision_of` reads it; NOSCRIPT and the store's failures are its exceptions), or
        None if the store has no connection up (`hit` then waits for one or fails)."""
        _check_hit(limits, cost)
        if not self._ready or not self._client.available:
            return None
        return self._client.execute_encoded(self._call(_HIT, limits, cost))

    @staticmethod
    def decision_of(reply: bytes) -> CombinedDecision:
        """What a `hit_reply` reply says (the states stay in Redis)."""
        index, decision = _reported(reply)
        return CombinedDecision(decision, index, ())

    async def retry_hit(
        self, limits: Sequence[Limit], cost: int, error: RedisReplyError
    ) -> CombinedDecision:
        """`hit` after its reply was `error`: a script or function Redis lacks is loaded and
        the call sent again (it ran nothing); any other error is raised."""
        reply = await self._after_error(error, self._call(_HIT, limits, cost))
        return self.decision_of(reply)

    async def peek(self, key: str, algorithm: RateAlgorithm[Any]) -> Decision:
        """What a request of cost 1 for `key` would be told now; nothing is spent."""
        reply = await self._evaluate(self._call(_PEEK, [(key, algorithm)], 1))
        return _reported(reply)[1]

    async def reset(self, key: str) -> None:
        """Forget `key`'s state under every algorithm: its next request starts afresh."""
        keys = [self._redis_key(code, key) for code in KIND_CODES.values()]
        await self._execute(b"*%d\r\n" % (len(keys) + 1) + _DEL + b"".join(keys))

    async def release(self, key: str, cost: int) -> None:
        """A request of `cost` that the concurrency limit under `key` admitted has ended.

        Releasing more than is in flight leaves nothing in flight, never less.
        """
        if type(cost) is not int or cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        command = (
            _ARRAYS[7]
            + self._invoke
            + _INTEGERS[1]
            + self._redis_key(KIND_CODES["concurrency"], key)
            + _RELEASE
            + _SERVER_TIME
            + (_INTEGERS[cost] if cost < _SMALL else encode_argument(cost))
        )
        await self._evaluate(command)

    # -- encoding

    def _call(self, operation: bytes, limits: Sequence[Limit], cost: int) -> bytes:
        """``EVALSHA sha <n> key... op now cost params...`` (or ``FCALL name``), encoded."""
        clock = self._clock
        now = _SERVER_TIME if clock is None else encode_argument(clock.wall())
        cost_argument = _INTEGERS[cost] if cost < _SMALL else encode_argument(cost)
        encoded = self._encoded
        if len(limits) == 1:
            limit = limits[0]
            key_argument, parameters, count = encoded.get(limit) or self._encode_limit(limit)
            if not isinstance(parameters, bytes):  # a quota (`isinstance` of an ABC is slow)
                parameters = self._quota_parameters(parameters)
            count += 7  # EVALSHA sha 1 key op now cost
            return b"".join(
                [
                    _ARRAYS[count] if count < _SMALL else b"*%d\r\n" % count,
                    self._invoke,
                    _INTEGERS[1],
                    key_argument,
                    operation,
                    now,
                    cost_argument,
                    parameters,
                ]
            )
        keys: list[bytes] = []
        arguments: list[bytes] = []
        count = 6 + len(limits)  # EVALSHA sha n op now cost, and the keys
        for limit in limits:
            key_argument, parameters, parameter_count = encoded.get(limit) or self._encode_limit(
                limit
            )
            if not isinstance(parameters, bytes):  # a quota (`isinstance` of an ABC is slow)
                parameters = self._quota_parameters(parameters)
            keys.append(key_argument)
            arguments.append(parameters)
            count += parameter_count
        if len(set(keys)) < len(keys):
            raise ValueError("a key appears twice with one algorithm kind in one hit")
        return b"".join(
            [
                _ARRAYS[count] if count < _SMALL else b"*%d\r\n" % count,
                self._invoke,
                _INTEGERS[len(limits)] if len(limits) < _SMALL else encode_argument(len(limits)),
                *keys,
                operation,
                now,
                cost_argument,
                *arguments,
            ]
        )

    def _encode_limit(self, limit: Limit) -> tuple[bytes, bytes | CalendarQuota, int]:
        """A limit's Redis key and parameters, encoded (and remembered)."""
        key, algorithm = limit
        parameters: bytes | CalendarQuota
        if isinstance(algorithm, CalendarQuota):
            code = KIND_CODES["quota"]
            parameters, count = algorithm, 1 + len(PARAMETERS[code])
        else:
            values = _parameters(algorithm)
            code = values[0]
            parameters = b"".join([encode_argument(value) for value in values])
            count = len(values)
        entry = (self._redis_key(code, key), parameters, count)
        encoded = self._encoded
        if len(encoded) >= KEY_CACHE_SIZE:
            encoded.clear()
        encoded[limit] = entry
        return entry

    def _quota_parameters(self, quota: CalendarQuota) -> bytes:
        """The quota's limit and its current and next periods, by this node's clock."""
        now = (self._clock or SYSTEM_CLOCK).wall()
        bounds = self._quota_bounds.get(quota)
        if bounds is not None and bounds[0] <= now < bounds[1]:
            return bounds[2]
        # The quota's own calendar arithmetic (and its memo of the current period).
        start = quota._period_start(now)
        end = quota._period_end(start)
        following = quota._period_end(end)
        values = (KIND_CODES["quota"], quota.limit, start, end, following)
        encoded = b"".join([encode_argument(value) for value in values])
        if len(self._quota_bounds) >= QUOTA_CACHE_SIZE:
            self._quota_bounds.clear()
        self._quota_bounds[quota] = (start, end, encoded)
        return encoded

    def _redis_key(self, code: str, key: str) -> bytes:
        """`key`'s Redis key under kind `code`, encoded as an argument."""
        return encode_argument(f"{self._key_prefix}{{{hash_tag(key)}}}{code}:{key}")

    # -- calls

    async def _evaluate(self, command: bytes) -> Any:
        """The reply to a script call, loading the script again if Redis lost it."""
        if not self._ready:
            await self._first_connection()
        failed: RedisReplyError | None = None  # no `await` in `except` (see `hit`)
        try:
            return await self._client.execute_encoded(command)
        except RedisReplyError as error:
            failed = error
        return await self._after_error(failed, command)

    async def _after_error(self, error: RedisReplyError, command: bytes) -> Any:
        """After NOSCRIPT or a missing function, load both and call again (the call ran
        nothing): by FCALL only if the library loaded."""
        message = error.message
        if not (message.startswith(_NO_SCRIPT) or message.startswith(_NO_FUNCTION)):
            raise error
        await self._load_script()
        if self._invoke is _EVALSHA:
            header = command.index(b"\r\n") + 2  # the array's length, then the call's name
            if command.startswith(_FCALL, header):
                command = command[:header] + _EVALSHA + command[header + len(_FCALL) :]
        return await self._client.execute_encoded(command)

    async def _execute(self, command: bytes) -> Any:
        if not self._ready:
            await self._first_connection()
        return await self._client.execute_encoded(command)

    async def _first_connection(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.connect()  # if Redis is down, the call itself fails fast, with why

    async def _load_script(self) -> None:
        """Load the script and the library, once however many calls found them missing."""
        loading = self._loading
        if loading is None or loading.done():
            loading = self._loading = asyncio.ensure_future(self._load())
        await asyncio.shield(loading)

    async def _load(self) -> None:
        """``SCRIPT LOAD`` and ``FUNCTION LOAD``, in one round trip (queued in one turn).

        The script must load; the library may not (Redis 6 has no functions, an ACL may refuse
        them), and calls then go by EVALSHA.
        """
        client = self._client
        calls = [client.execute("SCRIPT", "LOAD", SCRIPT)]
        if self._functions:
            calls.append(client.execute("FUNCTION", "LOAD", "REPLACE", LIBRARY))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:  # the connection's failures first (StoreUnavailable)
            if isinstance(reply, BaseException) and not isinstance(reply, RedisReplyError):
                raise reply
        sha = replies[0]
        if isinstance(sha, RedisReplyError):
            raise sha
        if sha != SCRIPT_SHA.encode():
            raise RedisReplyError(f"SCRIPT LOAD answered {sha!r}, not the digest {SCRIPT_SHA}")
        name = replies[1] if len(replies) > 1 else None
        if name is None or isinstance(name, RedisReplyError):
            self._invoke = _EVALSHA
        elif name == FUNCTION_NAME.encode():
            self._invoke = _FCALL
        else:
            raise RedisReplyError(f"FUNCTION LOAD answered {name!r}, not {FUNCTION_NAME}")

    def __repr__(self) -> str:
        clock = "server time" if self._clock is None else repr(self._clock)
        return f"RedisStore({self._client!r}, prefix={self._key_prefix!r}, {clock})"


_REPLY: Final = struct.Struct("<7d")


def _check_hit(limits: Sequence[Limit], cost: int) -> None:
    if type(cost) is not int or cost < 1:
        raise ValueError(_COST_ERROR.format(cost))
    if not limits:
        raise ValueError("a hit needs at least one limit")


def _reported(reply: bytes) -> tuple[int, Decision]:
    """The script's reply: the index of the limit it reports on, and that limit's decision."""
    index, allowed, limit, remaining, reset_after, retry_after, delay = _REPLY.unpack(reply)
    decision = Decision(allowed == 1, int(limit), int(remaining), reset_after, retry_after, delay)
    return int(index), decision
