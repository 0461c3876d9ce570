"""rate-limit: admit a request only if every one of its limits admits it (429 otherwise).

Each limit is one of the algorithms of `tollgate.ratelimit.algorithms`, chosen by name with its
own settings. A request is counted under a key (`by`: consumer, ip, header... see
`tollgate.ratelimit.keys`) prefixed with the policy's place (service/route) and each limit's
name and settings, so two policies never share counters while a reload that keeps a limit
keeps its counters. The store decides on all the limits at once: `local` (the default) is the
node's shared-memory store (`tollgate.ratelimit.shm`), one count for every worker of the node;
`process` is a dict per worker (`tollgate.ratelimit.store`); `redis` is one count for every
node (`tollgate.ratelimit.redis_store`), decided in one round trip, with `on_store_error`
choosing between a per-worker fallback and a 503 while Redis cannot answer. What runs per
request is in `tollgate.ratelimit.limiter` (compiled).

With `plans: true`, a consumer whose plan (top-level `plans`) has a `rate-limit` section is
limited by the plan's limits instead of the policy's own.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from tollgate.config.base import Model
from tollgate.config.units import Duration
from tollgate.http.responses import GatewayResponse
from tollgate.policies.base import Policy, register
from tollgate.ratelimit.algorithms import (
    ALGORITHM_KINDS,
    CalendarQuota,
    Concurrency,
    FixedWindow,
    LeakyBucket,
    RateAlgorithm,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)
from tollgate.ratelimit.keys import KeyBuilder, TrustedProxies, check_key_spec, parse_networks
from tollgate.ratelimit.limiter import (
    CompiledLimits,
    LimitSpecView,
    RedisLimiter,
    RequestLimiter,
)
from tollgate.ratelimit.shm import SharedMemoryStore
from tollgate.ratelimit.store import Store, process_store
from tollgate.runtime.context import CompileContext

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

AlgorithmKind = Literal[
    "fixed-window",
    "sliding-window-log",
    "sliding-window",
    "token-bucket",
    "leaky-bucket",
    "concurrency",
    "quota",
]

# The settings each algorithm requires, then those it may take.
_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fixed-window": (("limit", "window"), ()),
    "sliding-window-log": (("limit", "window"), ()),
    "sliding-window": (("limit", "window"), ()),
    "token-bucket": (("rate", "burst"), ()),
    "leaky-bucket": (("rate", "max_delay"), ()),
    "concurrency": (("limit",), ("retry_after",)),
    "quota": (("limit", "period"), ("time_zone",)),
}
if tuple(_SETTINGS) != ALGORITHM_KINDS:
    raise AssertionError("every algorithm of ratelimit.algorithms needs its settings here")

_MEANING = {
    "limit": "the most cost admitted, an integer",
    "window": "the window's length, e.g. 60s or 1h",
    "rate": "units per second",
    "burst": "the most cost admitted at once, an integer",
    "max_delay": "the longest a request may be held back, e.g. 500ms; 0 to never hold one",
    "period": "day or month",
    "time_zone": "an IANA time zone such as Europe/Paris",
    "retry_after": "what a refused request is told to wait, e.g. 1s",
}

# Seconds in the `w` of a daily quota; a month has no fixed length, so its quota has no `w`.
_DAY = 86400.0


# -- config --------------------------------------------------------------------------------


class LimitSpec(Model):
    """One limit: an algorithm by name and the settings that algorithm takes."""

    name: str = Field(
        pattern=_NAME,
        description="Names the limit in headers and messages; default: the algorithm's name.",
    )
    algorithm: AlgorithmKind
    limit: int | None = Field(None, ge=1, description="Most cost per window, period or at once.")
    window: Duration | None = Field(None, gt=0, description="Window length (window algorithms).")
    rate: float | None = Field(None, gt=0, allow_inf_nan=False, description="Units per second.")
    burst: int | None = Field(None, ge=1, description="Token bucket size.")
    max_delay: Duration | None = Field(None, ge=0, description="Leaky bucket: longest hold.")
    period: Literal["day", "month"] | None = Field(None, description="Quota period.")
    time_zone: str | None = Field(None, description="Quota time zone (IANA); default UTC.")
    retry_after: Duration | None = Field(None, gt=0, description="Concurrency: wait hint.")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            algorithm = value.get("algorithm")
            if isinstance(algorithm, str):
                return {**value, "name": algorithm}
        return value

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CalendarQuota(1, "day", value)
            except (KeyError, ValueError):
                raise ValueError(
                    f"unknown time zone {value!r} (an IANA name such as Europe/Paris)"
                ) from None
        return value

    @model_validator(mode="after")
    def _settings(self) -> LimitSpec:
        required, optional = _SETTINGS[self.algorithm]
        for setting in required:
            if getattr(self, setting) is None:
                raise ValueError(f"{self.algorithm} needs `{setting}` ({_MEANING[setting]})")
        for setting in _MEANING:
            if setting not in required + optional and getattr(self, setting) is not None:
                raise ValueError(
                    f"{self.algorithm} does not take `{setting}` "
                    f"(its settings: {', '.join(required + optional)})"
                )
        return self

    def build(self) -> RateAlgorithm[Any]:
        """The algorithm this limit describes."""
        kind = self.algorithm
        if kind == "fixed-window":
            return FixedWindow(self._int("limit"), self._float("window"))
        if kind == "sliding-window-log":
            return SlidingWindowLog(self._int("limit"), self._float("window"))
        if kind == "sliding-window":
            return SlidingWindowCounter(self._int("limit"), self._float("window"))
        if kind == "token-bucket":
            return TokenBucket(self._float("rate"), self._int("burst"))
        if kind == "leaky-bucket":
            return self._leaky_bucket()
        if kind == "concurrency":
            if self.retry_after is None:
                return Concurrency(self._int("limit"))
            return Concurrency(self._int("limit"), self.retry_after)
        return CalendarQuota(self._int("limit"), self.period or "day", self.time_zone or "UTC")

    def fingerprint(self) -> str:
        """The algorithm and the settings that shape its state: a key part that stays the same
        across reloads while they do (a concurrency limit's `retry_after` hint is not one)."""
        required, _ = _SETTINGS[self.algorithm]
        settings = [f"{setting}={getattr(self, setting)!r}" for setting in required]
        if self.algorithm == "quota":
            settings.append(f"time_zone={self.time_zone or 'UTC'!r}")
        return f"{self.algorithm}:{','.join(settings)}"

    def window_seconds(self) -> float | None:
        """The `w` of this limit's policy item: the time over which its quota is given."""
        kind = self.algorithm
        if kind == "token-bucket":
            return self._int("burst") / self._float("rate")
        if kind == "leaky-bucket":
            return self._leaky_bucket().capacity / self._float("rate")
        if kind == "quota":
            return _DAY if self.period == "day" else None
        return self.window

    def quota(self) -> int:
        """The `q` of this limit's policy item: the most cost it admits at once."""
        if self.algorithm == "token-bucket":
            return self._int("burst")
        if self.algorithm == "leaky-bucket":
            return self._leaky_bucket().capacity
        return self._int("limit")

    def _leaky_bucket(self) -> LeakyBucket:
        return LeakyBucket(self._float("rate"), self._float("max_delay"))

    def _int(self, setting: str) -> int:
        value = getattr(self, setting)
        assert isinstance(value, int), f"{setting} is validated as required"
        return value

    def _float(self, setting: str) -> float:
        value = getattr(self, setting)
        assert isinstance(value, int | float), f"{setting} is validated as required"
        return float(value)


def check_local_store(limits: Sequence[LimitSpec]) -> None:
    """ValueError if the node-wide store (`store: local`) cannot hold one of these limits."""
    for index, spec in enumerate(limits):
        try:
            SharedMemoryStore.check_algorithm(spec.build())
        except ValueError as exc:
            raise ValueError(
                f"limits[{index}] ({spec.name!r}) cannot be kept by `store: local`: {exc}; "
                "or keep it per worker with `store: process`"
            ) from None


def check_limits(limits: Sequence[LimitSpec], cost: int | None = None) -> None:
    """ValueError if two limits share a name, or if `cost` can never fit one of them."""
    seen: set[str] = set()
    for spec in limits:
        if spec.name in seen:
            raise ValueError(
                f"two limits are named {spec.name!r}: give each a `name` of its own "
                "(the default is the algorithm's name)"
            )
        seen.add(spec.name)
        if cost is not None:
            decision, _ = spec.build().decide(None, 0.0, cost)
            if math.isinf(decision.retry_after):
                raise ValueError(
                    f"cost {cost} can never fit limit {spec.name!r}, which admits at most "
                    f"{decision.limit} at once: every request would be refused"
                )


class PlanRateLimitConfig(Model):
    """A plan's `rate-limit` section: limits that replace a policy's own (`plans: true`)."""

    limits: list[LimitSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _limits(self) -> PlanRateLimitConfig:
        check_limits(self.limits)
        return self


class RateLimitConfig(Model):
    limits: list[LimitSpec] | None = Field(
        None,
        min_length=1,
        description="Limits that must all admit a request; optional with `plans: true`.",
    )
    plans: bool = Field(
        False, description="Consumers whose plan has `rate-limit` limits get those instead."
    )
    by: str | list[str] = Field(
        "consumer",
        description="consumer, credential, ip, route, service, header:NAME, path, global, "
        "or a list of them (one counter per combination).",
    )
    cost: int = Field(1, ge=1, description="What each request counts for.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDRs of proxies whose X-Forwarded-For is believed.",
    )
    status: int = Field(429, ge=400, le=599, description="Status of a refused request.")
    headers: bool = Field(True, description="Send RateLimit-Policy, RateLimit, X-RateLimit-*.")
    store: Literal["local", "process", "redis"] = Field(
        "local",
        description="Where counters live: local (one count for every worker of the node), "
        "process (each worker counts on its own) or redis (one count for every node, in "
        "`cluster.redis`).",
    )
    on_store_error: Literal["allow", "deny"] = Field(
        "allow",
        description="With `store: redis`, while Redis cannot answer: allow (each worker "
        "limits on its own meanwhile) or deny (503 with Retry-After).",
    )

    @field_validator("by")
    @classmethod
    def _by(cls, value: str | list[str]) -> str | list[str]:
        specs = [value] if isinstance(value, str) else value
        if not specs:
            raise ValueError("`by` needs at least one key part")
        for spec in specs:
            check_key_spec(spec)
        if len(set(specs)) != len(specs):
            raise ValueError("`by` lists a key part twice")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _limits(self) -> RateLimitConfig:
        if self.limits is None:
            if not self.plans:
                raise ValueError(
                    "`limits` is required, unless `plans: true` takes them from consumers' plans"
                )
        else:
            check_limits(self.limits, self.cost)
            if self.store == "local":
                check_local_store(self.limits)
        return self


def compiled_limits(specs: Sequence[LimitSpec], scope: str) -> CompiledLimits:
    """`specs` ready for the request path."""
    return CompiledLimits(
        [
            LimitSpecView(
                spec.name,
                spec.algorithm,
                spec.fingerprint(),
                spec.build(),
                spec.quota(),
                spec.window_seconds(),
            )
            for spec in specs
        ],
        scope,
    )


@register
class RateLimit(Policy):
    name = "rate-limit"
    priority = 910  # after authentication (key-auth is 1250): keys may name the consumer
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, context: CompileContext) -> None:
        super().__init__(config, context)
        key = KeyBuilder(
            [config.by] if isinstance(config.by, str) else config.by,
            service=context.service,
            route=context.route,
            proxies=TrustedProxies(config.trusted_proxies),
        )
        # One rate-limit policy per route (a later entry replaces an earlier one), so the route
        # is the policy's identity: no other policy counts under these keys.
        scope = f"{self.name}|{context.service}/{context.route}"
        own = compiled_limits(config.limits, scope) if config.limits else None
        by_plan: dict[str, CompiledLimits] | None = None
        if config.plans:
            if not context.plans:
                raise ValueError("rate-limit has `plans: true` but the config defines no `plans`")
            by_plan = {}
            for plan_name, plan in context.plans.items():
                if plan.rate_limit is None:
                    continue
                try:
                    check_limits(plan.rate_limit.limits, config.cost)
                    if config.store == "local":
                        check_local_store(plan.rate_limit.limits)
                except ValueError as exc:
                    raise ValueError(f"rate-limit with plan {plan_name!r}: {exc}") from None
                by_plan[plan_name] = compiled_limits(plan.rate_limit.limits, scope)
        store = self._pick_store(config, context)
        if config.store == "redis":
            if context.redis_store is None:
                raise ValueError(
                    "rate-limit has `store: redis` but `cluster.redis` is not set "
                    '(e.g. cluster: {redis: "redis://127.0.0.1:6379/0"})'
                )
            self.limiter: RequestLimiter = RedisLimiter(
                own,
                by_plan,
                key,
                context.redis_store(),
                store,
                context.clock,
                cost=config.cost,
                status=config.status,
                headers=config.headers,
                allow_on_error=config.on_store_error == "allow",
            )
        else:
            self.limiter = RequestLimiter(
                own,
                by_plan,
                key,
                store,
                context.clock,
                cost=config.cost,
                status=config.status,
                headers=config.headers,
            )

    @staticmethod
    def _pick_store(config: RateLimitConfig, context: CompileContext) -> Store:
        if config.store != "local":  # a Redis store's fallback is the worker's own
            return process_store(context.clock)
        if context.shared_store is None:
            raise ValueError("rate-limit has `store: local` but nothing provides the node's store")
        return context.shared_store()

    def phases(self) -> tuple[str, ...]:
        """Without a concurrency limit there is nothing to give back: no log phase (which
        would also make the listener write each answer before the exchange's end)."""
        limiter = self.limiter
        sets = [limiter.own, *(limiter.by_plan or {}).values()]
        if any(limits is not None and limits.concurrency for limits in sets):
            return super().phases()
        return tuple(phase for phase in super().phases() if phase != "log")

    def handler(self, phase: str) -> Callable[..., Any]:
        if phase == "access":
            return self.limiter.access
        if phase == "log":
            return self.limiter.log
        return super().handler(phase)

    def access(self, ex: Exchange) -> GatewayResponse | Awaitable[GatewayResponse | None] | None:
        return self.limiter.access(ex)

    def log(self, ex: Exchange) -> None:
        """Give back the concurrency slots the request held (see `RequestLimiter.log`)."""
        self.limiter.log(ex)

    def __repr__(self) -> str:
        return f"RateLimit({self.limiter!r})"
