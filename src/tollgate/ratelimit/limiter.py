"""The `rate-limit` policy's request path: limits ready to use, the store, what clients are told.

`tollgate.policies.rate_limit` validates the config and builds these objects once per route;
this module is all that runs per request, and it is compiled with the rest of the request path
(setup.py), which is why it holds no config models.

Per request: the client key (`KeyBuilder`), the (key, algorithm) pairs of the client's limits
(remembered per client, so a returning client costs one dict lookup and its keys' hashes are
already known), one atomic `hit` on the store for all of them, then either the response
fields or the refusal.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, cast

from tollgate.clock import Clock
from tollgate.http.responses import GatewayResponse, error_response
from tollgate.ratelimit.algorithms import CombinedDecision, Decision, RateAlgorithm
from tollgate.ratelimit.headers import (
    LimitHeaders,
    fields_pieces,
    fields_template,
    limit_fields,
    policy_field,
    retry_after_seconds,
    whole_seconds,
)
from tollgate.ratelimit.keys import KeyBuilder
from tollgate.ratelimit.redis_store import RedisStore
from tollgate.ratelimit.resp import RedisReplyError, StoreUnavailable
from tollgate.ratelimit.shm import SharedMemoryStore
from tollgate.ratelimit.store import Limit, Store

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

RATE_LIMITED: Final = "Rate limit exceeded: {}"
# Where an admitted request's concurrency slots wait for the log phase to give them back.
HELD_NOTE: Final = "rate-limit"
# What call records name the policy's outcomes under.
POLICY_NAME: Final = "rate-limit"
# Clients whose (key, algorithm) pairs one set of limits remembers; cleared when full.
KEYED_CACHE_SIZE: Final = 4096


class LimitSpecView:
    """What `CompiledLimits` needs to know of one configured limit."""

    __slots__ = ("algorithm", "fingerprint", "kind", "name", "quota", "window")

    def __init__(
        self,
        name: str,
        kind: str,
        fingerprint: str,
        algorithm: RateAlgorithm[Any],
        quota: int,
        window: float | None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.fingerprint = fingerprint
        self.algorithm = algorithm
        self.quota = quota
        self.window = window


class CompiledLimits:
    """A set of limits ready for the request path: keys' prefixes, algorithms, header parts.

    A limit's key is `scope|name|fingerprint|client`: the policy's place, the limit's name,
    and the algorithm with the settings that shape its state, so two policies never share
    counters while a reload that keeps a limit keeps its counters.
    """

    __slots__ = (
        "_keyed",
        "algorithms",
        "concurrency",
        "headers",
        "messages",
        "names",
        "never",
        "pieces",
        "policy",
        "prefixes",
        "single",
        "templates",
    )

    def __init__(self, specs: Sequence[LimitSpecView], scope: str) -> None:
        self.prefixes = tuple(f"{scope}|{spec.name}|{spec.fingerprint}|" for spec in specs)
        self.names = tuple(spec.name for spec in specs)
        self.algorithms = tuple(spec.algorithm for spec in specs)
        self.concurrency = tuple(
            index for index, spec in enumerate(specs) if spec.kind == "concurrency"
        )
        self.messages = tuple(RATE_LIMITED.format(spec.name) for spec in specs)
        self.headers = tuple(
            LimitHeaders.render(spec.name, spec.quota, spec.window) for spec in specs
        )
        self.policy = policy_field(self.headers)
        self.templates = tuple(fields_template(self.policy, limit) for limit in self.headers)
        self.pieces = tuple(fields_pieces(self.policy, limit) for limit in self.headers)
        # One limit and no concurrency slot to hold: a request the store may decide and render
        # the fields of in one step (`SharedMemoryStore.hit_fields`).
        self.single = len(specs) == 1 and not self.concurrency
        self.never = math.ceil(max(spec.window or 0.0 for spec in specs))
        self._keyed: dict[str, list[Limit]] = {}

    def keyed(self, client: str) -> list[Limit]:
        """The (key, algorithm) of every limit for the client key `client`."""
        limits = self._keyed.get(client)
        if limits is None:
            limits = [
                (prefix + client, algorithm)
                for prefix, algorithm in zip(self.prefixes, self.algorithms, strict=True)
            ]
            if len(self._keyed) >= KEYED_CACHE_SIZE:
                self._keyed.clear()
            self._keyed[client] = limits
        return limits

    def concurrency_keys(self, keyed: list[Limit]) -> tuple[str, ...]:
        """The keys of the concurrency limits among `keyed` (this set's `keyed(client)`)."""
        return tuple([keyed[index][0] for index in self.concurrency])

    def fields(self, combined: CombinedDecision) -> list[tuple[bytes, bytes]]:
        """The response's rate-limit fields, about the limit `combined` names."""
        return limit_fields(self.policy, self.headers[combined.limit_index], combined.decision)

    def block(self, combined: CombinedDecision) -> bytes:
        """The same fields as `fields`, serialised as header lines."""
        decision = combined.decision
        remaining = decision.remaining
        whole = whole_seconds(decision.reset_after)
        return self.templates[combined.limit_index] % (remaining, whole, remaining, whole)

    def __repr__(self) -> str:
        return f"CompiledLimits({self.policy[1].decode()})"


class RequestLimiter:
    """Admits or refuses each request of a route against its limits, in a store."""

    __slots__ = (
        "_clock",
        "_cost",
        "_fast",
        "_headers",
        "_key",
        "_status",
        "by_plan",
        "own",
        "rejected",
        "store",
    )

    def __init__(
        self,
        own: CompiledLimits | None,
        by_plan: dict[str, CompiledLimits] | None,
        key: KeyBuilder,
        store: Store,
        clock: Clock,
        *,
        cost: int,
        status: int,
        headers: bool,
    ) -> None:
        self.own = own
        self.by_plan = by_plan
        self._key = key
        self.store = store
        self._clock = clock
        self._cost = cost
        self._status = status
        self._headers = headers
        # The shared-memory store's one-call path (admit and render), if that is the store.
        self._fast = store.hit_fields if isinstance(store, SharedMemoryStore) else None
        # Requests refused by a limit: the policy's rejection count, for metrics.
        self.rejected = 0

    def limits_for(self, ex: Exchange) -> CompiledLimits | None:
        """The limits that apply to `ex`: its consumer's plan's, else the policy's own."""
        by_plan = self.by_plan
        if by_plan is not None:
            consumer = ex.consumer
            if consumer is not None and consumer.plan is not None:
                return by_plan.get(consumer.plan, self.own)
        return self.own

    def access(self, ex: Exchange) -> GatewayResponse | Awaitable[GatewayResponse | None] | None:
        limits = self.limits_for(ex)
        if limits is None:
            return None
        keyed = limits.keyed(self._key(ex))
        now = self._clock.wall()
        fast = self._fast
        if fast is not None and limits.single:
            key, algorithm = keyed[0]
            decided = fast(key, algorithm, now, self._cost, limits.pieces[0])
            if isinstance(decided, bytes):
                if self._headers:
                    ex.add_response_block(decided)
                return None
            if decided is not None:
                combined = CombinedDecision(Decision(*decided), 0, ())
                return self.outcome(ex, limits, keyed, combined, self.store)
        combined = self.store.hit(keyed, now, self._cost)
        return self.outcome(ex, limits, keyed, combined, self.store)

    def outcome(
        self,
        ex: Exchange,
        limits: CompiledLimits,
        keyed: list[Limit],
        combined: CombinedDecision,
        store: object,
    ) -> GatewayResponse | Awaitable[None] | None:
        """What `access` answers once `store` has decided `combined` on `ex`: the refusal,
        or the fields to send (and the leaky bucket's wait)."""
        decision = combined.decision
        if not decision.allowed:
            self.rejected += 1
            ex.note_outcome(POLICY_NAME, limits.names[combined.limit_index])
            return error_response(
                self._status,
                "rate_limited",
                limits.messages[combined.limit_index],
                ex.request_id,
                limits.fields(combined) if self._headers else None,
                retry_after=retry_after_seconds(decision.retry_after, limits.never),
            )
        if limits.concurrency:
            held = (limits.concurrency_keys(keyed), self._cost, store)
            if ex.policy_notes is None:
                ex.policy_notes = {HELD_NOTE: held}
            else:
                ex.policy_notes[HELD_NOTE] = held
        if self._headers:
            ex.add_response_block(limits.block(combined))
        if decision.delay > 0:
            return asyncio.sleep(decision.delay)  # the leaky bucket spaces requests out
        return None

    def log(self, ex: Exchange) -> None:
        """Give back the concurrency slots the request held: it has ended, one way or another
        (the listener runs `log` for every exchange of a route, a client gone away included)."""
        notes = ex.policy_notes
        if notes is None:
            return
        held = notes.pop(HELD_NOTE, None)
        if held is None:
            return
        keys, cost, store = held
        release_all(store, keys, cost)

    def __repr__(self) -> str:
        plans = sorted(self.by_plan) if self.by_plan is not None else None
        return f"RequestLimiter(own={self.own!r}, plans={plans}, key={self._key!r})"


def release_all(store: object, keys: tuple[str, ...], cost: int) -> None:
    """Give back concurrency slots held under `keys` in `store` (a Redis store's release is
    sent in the background: the log phase never waits)."""
    if isinstance(store, RedisStore):
        for key in keys:
            task = asyncio.ensure_future(store.release(key, cost))
            task.add_done_callback(_ignore_outcome)
    else:
        local = cast(Store, store)
        for key in keys:
            local.release(key, cost)


def _ignore_outcome(task: asyncio.Future[None]) -> None:
    # A release Redis did not get is not retried: the slot's key expires (RedisStore).
    if not task.cancelled():
        task.exception()


class RedisLimiter(RequestLimiter):
    """A `RequestLimiter` on the Redis store: one round trip per request, awaited.

    When Redis cannot answer (`StoreUnavailable`: down, or no reply within the store's
    timeout), `on_store_error` decides: `allow` keeps limiting with this worker's own
    `fallback` store (each worker of each node counts on its own meanwhile), `deny` refuses
    with 503 and `Retry-After`. Both are counted.
    """

    __slots__ = ("allow_on_error", "denied", "fallback", "fallbacks", "remote")

    def __init__(
        self,
        own: CompiledLimits | None,
        by_plan: dict[str, CompiledLimits] | None,
        key: KeyBuilder,
        remote: RedisStore,
        fallback: Store,
        clock: Clock,
        *,
        cost: int,
        status: int,
        headers: bool,
        allow_on_error: bool,
    ) -> None:
        super().__init__(
            own, by_plan, key, fallback, clock, cost=cost, status=status, headers=headers
        )
        self.remote = remote
        self.fallback = fallback
        self.allow_on_error = allow_on_error
        # Requests decided by the fallback store, and requests refused, while Redis was out.
        self.fallbacks = 0
        self.denied = 0

    def access(self, ex: Exchange) -> GatewayResponse | Awaitable[GatewayResponse | None] | None:
        limits = self.limits_for(ex)
        if limits is None:
            return None
        keyed = limits.keyed(self._key(ex))
        reply = self.remote.hit_reply(keyed, self._cost)
        if reply is None:  # no connection up: the coroutine waits for one, or falls back
            return self._remote(ex, limits, keyed)
        # The common case makes no task and no coroutine: the listener resumes the request
        # from `decided`'s done callback, which `_replied` sets from the reply's.
        decided: asyncio.Future[GatewayResponse | None] = reply.get_loop().create_future()
        reply.add_done_callback(partial(self._replied, ex, limits, keyed, decided))
        return decided

    def _replied(
        self,
        ex: Exchange,
        limits: CompiledLimits,
        keyed: list[Limit],
        decided: asyncio.Future[GatewayResponse | None],
        reply: asyncio.Future[Any],
    ) -> None:
        result: GatewayResponse | Awaitable[GatewayResponse | None] | Awaitable[None] | None
        try:
            try:
                combined = self.remote.decision_of(reply.result())
            except StoreUnavailable:
                result = self._unavailable(ex, limits, keyed)
            except RedisReplyError as error:  # NOSCRIPT: load the script, call again
                result = self._retried(ex, limits, keyed, error)
            else:
                result = self._decided(ex, limits, keyed, combined)
            self._settle(decided, result)
        except (Exception, asyncio.CancelledError) as exc:  # the request gets its 500
            if not decided.done():
                decided.set_exception(exc)

    def _settle(
        self,
        decided: asyncio.Future[GatewayResponse | None],
        result: GatewayResponse | Awaitable[GatewayResponse | None] | Awaitable[None] | None,
    ) -> None:
        """`decided` gets `result`, at once, or when `result` (something to await) is done."""
        if result is None or isinstance(result, GatewayResponse):
            decided.set_result(result)
            return
        waited = asyncio.ensure_future(result)
        waited.add_done_callback(partial(_copy_outcome, decided))

    def _decided(
        self, ex: Exchange, limits: CompiledLimits, keyed: list[Limit], combined: CombinedDecision
    ) -> GatewayResponse | Awaitable[None] | None:
        """`outcome` of what Redis decided."""
        store = self.remote
        if ex.t_end and combined.decision.allowed and limits.concurrency:
            # The client left while Redis answered: its log phase has run already.
            release_all(store, limits.concurrency_keys(keyed), self._cost)
            return None
        return self.outcome(ex, limits, keyed, combined, store)

    def _unavailable(
        self, ex: Exchange, limits: CompiledLimits, keyed: list[Limit]
    ) -> GatewayResponse | Awaitable[None] | None:
        """Redis cannot answer: refuse (`deny`), or decide in the fallback store (`allow`)."""
        if not self.allow_on_error:
            self.denied += 1
            ex.note_outcome(POLICY_NAME, "store-unavailable")
            return error_response(
                503,
                "rate_limit_unavailable",
                "Rate limits cannot be checked right now",
                ex.request_id,
                retry_after=1,
            )
        self.fallbacks += 1
        combined = self.fallback.hit(keyed, self._clock.wall(), self._cost)
        return self.outcome(ex, limits, keyed, combined, self.fallback)

    async def _retried(
        self, ex: Exchange, limits: CompiledLimits, keyed: list[Limit], error: RedisReplyError
    ) -> GatewayResponse | None:
        # No `await` inside an `except` block in this compiled module: mypyc's coroutines would
        # leave the handled error set as the thread's current exception.
        try:
            combined = await self.remote.retry_hit(keyed, self._cost, error)
        except StoreUnavailable:
            combined = None
        if combined is None:
            return await _resolved(self._unavailable(ex, limits, keyed))
        return await _resolved(self._decided(ex, limits, keyed, combined))

    async def _remote(
        self, ex: Exchange, limits: CompiledLimits, keyed: list[Limit]
    ) -> GatewayResponse | None:
        try:
            combined = await self.remote.hit(keyed, self._cost)
        except StoreUnavailable:
            combined = None  # no `await` in `except` (see `_retried`)
        if combined is None:
            return await _resolved(self._unavailable(ex, limits, keyed))
        return await _resolved(self._decided(ex, limits, keyed, combined))

    def __repr__(self) -> str:
        plans = sorted(self.by_plan) if self.by_plan is not None else None
        return f"RedisLimiter(own={self.own!r}, plans={plans}, remote={self.remote!r})"


async def _resolved(
    result: GatewayResponse | Awaitable[GatewayResponse | None] | Awaitable[None] | None,
) -> GatewayResponse | None:
    """`result`, awaited if it is something to wait for (the leaky bucket's wait: None)."""
    if result is None or isinstance(result, GatewayResponse):
        return result
    outcome = await result
    return outcome if isinstance(outcome, GatewayResponse) else None


def _copy_outcome(
    decided: asyncio.Future[GatewayResponse | None], waited: asyncio.Future[Any]
) -> None:
    if waited.cancelled():
        decided.cancel()
    elif waited.exception() is not None:
        decided.set_exception(waited.exception())  # type: ignore[arg-type]
    else:
        outcome = waited.result()
        decided.set_result(outcome if isinstance(outcome, GatewayResponse) else None)
