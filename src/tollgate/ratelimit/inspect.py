"""Reading and resetting one client's rate-limit counters, for the admin API.

A policy is named by its place, `service/route` (one rate-limit policy per route), and a client
by its key as the policy's `by` builds it: `consumer=acme`, `ip=203.0.113.7`, `global`,
`credential=key-3f2a1b`, `header:x-tenant=blue`, or parts joined with `|` for a compound `by`.
Every limit that can count that client is reported: the policy's own and, with `plans: true`,
each plan's (the client's plan is not known from its key).

The counters are read where the policy keeps them: the node's shared memory (`store: local`,
which the supervisor maps too) or Redis (`store: redis`). A `store: process` policy keeps them
inside each worker, where the admin API cannot reach: it is refused (`StoreNotShared`).
Reading spends nothing; resetting forgets the key under every limit, so its next request
starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tollgate.errors import TollgateError
from tollgate.ratelimit.algorithms import Decision
from tollgate.ratelimit.limiter import CompiledLimits, RedisLimiter, RequestLimiter
from tollgate.ratelimit.shm import SharedMemoryStore

if TYPE_CHECKING:
    from tollgate.clock import Clock
    from tollgate.runtime.runtime import Runtime


class UnknownPolicy(TollgateError):
    status = 404
    error_type = "not_found"


class StoreNotShared(TollgateError):
    status = 409
    error_type = "store_not_shared"


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit's view of a client key."""

    name: str
    algorithm: str
    plan: str | None
    limit: int
    available: int  # cost a request could spend right now
    reset_after: float  # seconds until the limit is whole again for this key
    retry_after: float  # 0 if a request of cost 1 would be admitted now

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "plan": self.plan,
            "limit": self.limit,
            "available": self.available,
            "reset_after": round(self.reset_after, 3),
            "retry_after": round(self.retry_after, 3) if self.retry_after != float("inf") else None,
        }


def find_limiter(runtime: Runtime, policy: str) -> RequestLimiter:
    """The limiter of the rate-limit policy at `policy` (`service/route`)."""
    from tollgate.policies.rate_limit import RateLimit

    service, slash, route_name = policy.partition("/")
    if not slash:
        raise UnknownPolicy(f"name a rate-limit policy by its route: service/route, not {policy!r}")
    for route in runtime.routes:
        if route.service == service and route.name == route_name:
            for step in route.policies:
                if isinstance(step, RateLimit):
                    return step.limiter
            raise UnknownPolicy(f"route {policy} has no rate-limit policy")
    raise UnknownPolicy(f"no route {policy}")


def store_kind(limiter: RequestLimiter) -> str:
    if isinstance(limiter, RedisLimiter):
        return "redis"
    return "local" if isinstance(limiter.store, SharedMemoryStore) else "process"


def _limit_sets(limiter: RequestLimiter) -> list[tuple[str | None, CompiledLimits]]:
    sets: list[tuple[str | None, CompiledLimits]] = []
    if limiter.own is not None:
        sets.append((None, limiter.own))
    for plan, limits in sorted((limiter.by_plan or {}).items()):
        sets.append((plan, limits))
    return sets


def _shared(limiter: RequestLimiter) -> None:
    if store_kind(limiter) == "process":
        raise StoreNotShared(
            "this policy keeps its counters in each worker (`store: process`), out of the "
            "admin API's reach; use `store: local` or `redis` to read and reset them here"
        )


async def read_key(limiter: RequestLimiter, client: str, clock: Clock) -> list[LimitState]:
    """Every limit's state for the client key `client`; nothing is spent."""
    _shared(limiter)
    states = []
    for plan, limits in _limit_sets(limiter):
        for index, (key, algorithm) in enumerate(limits.keyed(client)):
            if isinstance(limiter, RedisLimiter):
                decision = await limiter.remote.peek(key, algorithm)
            else:
                store = limiter.store
                assert isinstance(store, SharedMemoryStore)
                decision = store.peek(key, algorithm, clock.wall())
            states.append(
                LimitState(
                    limits.names[index],
                    algorithm.kind,
                    plan,
                    decision.limit,
                    _available(decision),
                    max(0.0, decision.reset_after),
                    decision.retry_after,
                )
            )
    return states


async def reset_key(limiter: RequestLimiter, client: str) -> int:
    """Forget the client key `client` under every limit; the number of limits reset."""
    _shared(limiter)
    count = 0
    for _, limits in _limit_sets(limiter):
        for key, _ in limits.keyed(client):
            if isinstance(limiter, RedisLimiter):
                await limiter.remote.reset(key)
            else:
                limiter.store.reset(key)
            count += 1
    return count


def _available(decision: Decision) -> int:
    # A peek is a request of cost 1: admitted, `remaining` is what is left after it.
    return decision.remaining + 1 if decision.allowed else decision.remaining
