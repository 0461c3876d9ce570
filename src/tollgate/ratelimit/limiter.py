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
from typing import TYPE_CHECKING, Any, Final

from tollgate.clock import Clock
from tollgate.http.responses import GatewayResponse, error_response
from tollgate.ratelimit.algorithms import CombinedDecision, RateAlgorithm
from tollgate.ratelimit.headers import (
    LimitHeaders,
    fields_template,
    limit_fields,
    policy_field,
    retry_after_seconds,
)
from tollgate.ratelimit.keys import KeyBuilder
from tollgate.ratelimit.store import Limit, Store

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

RATE_LIMITED: Final = "Rate limit exceeded: {}"
# Where an admitted request's concurrency slots wait for the log phase to give them back.
HELD_NOTE: Final = "rate-limit"
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
        "never",
        "policy",
        "prefixes",
        "templates",
    )

    def __init__(self, specs: Sequence[LimitSpecView], scope: str) -> None:
        self.prefixes = tuple(f"{scope}|{spec.name}|{spec.fingerprint}|" for spec in specs)
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

    def fields(self, combined: CombinedDecision) -> list[tuple[bytes, bytes]]:
        """The response's rate-limit fields, about the limit `combined` names."""
        return limit_fields(self.policy, self.headers[combined.limit_index], combined.decision)

    def block(self, combined: CombinedDecision) -> bytes:
        """The same fields as `fields`, serialised as header lines."""
        decision = combined.decision
        remaining = decision.remaining
        reset = decision.reset_after
        whole = math.ceil(reset) if reset > 0 else 0
        return self.templates[combined.limit_index] % (remaining, whole, remaining, whole)

    def __repr__(self) -> str:
        return f"CompiledLimits({self.policy[1].decode()})"


class RequestLimiter:
    """Admits or refuses each request of a route against its limits, in a store."""

    __slots__ = ("_by_plan", "_clock", "_cost", "_headers", "_key", "_own", "_status", "store")

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
        self._own = own
        self._by_plan = by_plan
        self._key = key
        self.store = store
        self._clock = clock
        self._cost = cost
        self._status = status
        self._headers = headers

    def limits_for(self, ex: Exchange) -> CompiledLimits | None:
        """The limits that apply to `ex`: its consumer's plan's, else the policy's own."""
        by_plan = self._by_plan
        if by_plan is not None:
            consumer = ex.consumer
            if consumer is not None and consumer.plan is not None:
                return by_plan.get(consumer.plan, self._own)
        return self._own

    def access(self, ex: Exchange) -> GatewayResponse | Awaitable[None] | None:
        limits = self.limits_for(ex)
        if limits is None:
            return None
        keyed = limits.keyed(self._key(ex))
        combined = self.store.hit(keyed, self._clock.wall(), self._cost)
        decision = combined.decision
        if not decision.allowed:
            return error_response(
                self._status,
                "rate_limited",
                limits.messages[combined.limit_index],
                ex.request_id,
                limits.fields(combined) if self._headers else None,
                retry_after=retry_after_seconds(decision.retry_after, limits.never),
            )
        if limits.concurrency:
            self._hold(ex, tuple([keyed[index][0] for index in limits.concurrency]))
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
        keys, cost = held
        for key in keys:
            self.store.release(key, cost)

    def _hold(self, ex: Exchange, keys: tuple[str, ...]) -> None:
        held = (keys, self._cost)
        if ex.policy_notes is None:
            ex.policy_notes = {HELD_NOTE: held}
        else:
            ex.policy_notes[HELD_NOTE] = held

    def __repr__(self) -> str:
        plans = sorted(self._by_plan) if self._by_plan is not None else None
        return f"RequestLimiter(own={self._own!r}, plans={plans}, key={self._key!r})"
