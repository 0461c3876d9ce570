"""Config in, immutable Runtime out: the router, per-route policy chains and upstream groups.

The request path reads one reference (`WorkerState.runtime`) per request and then only walks
tuples built here. A reload compiles a new Runtime and swaps that reference; requests in flight
keep the route objects they started with. Connection pools are the one thing shared between
runtimes (by target), so a reload does not throw warm upstream connections away.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

from tollgate.clock import SYSTEM_CLOCK, Clock
from tollgate.config.schema import (
    Config,
    ListenerLimits,
    PolicyEntryBase,
    PoolSettings,
    Route,
    Service,
    ServiceLogs,
    Upstream,
    UpstreamTimeouts,
)
from tollgate.errors import ConfigError, ConfigProblem
from tollgate.http.headers import REQUEST_DROP
from tollgate.http.upstream import Pool
from tollgate.observe.redaction import CapturePolicy
from tollgate.policies.base import Policy, registry
from tollgate.ratelimit.redis_store import RedisStore
from tollgate.ratelimit.store import ProcessStore, Store
from tollgate.routing.router import Router, RouteSpec
from tollgate.runtime.context import CompileContext, ConsumerEntry, ConsumerIndex
from tollgate.runtime.entries import CompiledRoute, TargetEntry, UpstreamGroup
from tollgate.upstream.balancers import create_balancer

__all__ = [
    "CompiledRoute",
    "ConsumerEntry",
    "PoolRegistry",
    "PoolStage",
    "Runtime",
    "UpstreamGroup",
    "compile_config",
]


PoolKey = tuple[Any, ...]


class PoolRegistry:
    """Per-worker connection pools, one per (upstream, target), kept across reloads.

    Keyed by the upstream's name too, so two upstreams with the same target keep their own
    limits and timeouts. A runtime is compiled against a `PoolStage` of the registry; when it
    is committed, the pools the new runtime no longer uses close (their in-flight exchanges
    finish; idle connections close at once)."""

    def __init__(self) -> None:
        self.pools: dict[PoolKey, Pool] = {}

    def stage(self) -> PoolStage:
        """Start compiling a runtime: what it uses is applied only by `PoolStage.commit`."""
        return PoolStage(self)

    def sweep(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def __repr__(self) -> str:
        return f"PoolRegistry({len(self.pools)} pools)"


class PoolStage:
    """The pools one runtime being compiled uses, kept apart from the registry until commit.

    Pools the registry already has are shared, but their new limits and timeouts wait for the
    commit: the runtime serving meanwhile keeps its own. Pools made here join the registry at
    commit, or are closed by `discard` (a reload that was aborted)."""

    def __init__(self, registry: PoolRegistry) -> None:
        self.registry = registry
        self.used: set[PoolKey] = set()
        self.made: dict[PoolKey, Pool] = {}
        self.settings: dict[PoolKey, tuple[PoolSettings, UpstreamTimeouts, float]] = {}

    def get(self, upstream: Upstream, scheme: str, host: str, port: int) -> Pool:
        key = (
            upstream.name,
            scheme,
            host,
            port,
            upstream.tls_verify,
            upstream.ca_file,
            upstream.sni,
        )
        self.used.add(key)
        pool = self.made.get(key) or self.registry.pools.get(key)
        if pool is None:
            ssl_context = None
            if scheme == "https":
                ssl_context = ssl.create_default_context(cafile=upstream.ca_file)
                if not upstream.tls_verify:
                    ssl_context.check_hostname = False
                    ssl_context.verify_mode = ssl.CERT_NONE
            pool = Pool(
                host,
                port,
                ssl_context=ssl_context,
                server_hostname=upstream.sni or host,
                settings=upstream.pool,
                timeouts=upstream.timeouts,
                dns_ttl=upstream.dns_ttl,
            )
            self.made[key] = pool
        elif key not in self.made:
            self.settings[key] = (upstream.pool, upstream.timeouts, upstream.dns_ttl)
        return pool

    def commit(self) -> None:
        """Apply the staged limits and timeouts, add the new pools, close the unused ones."""
        registry = self.registry
        for key, (settings, timeouts, dns_ttl) in self.settings.items():
            pool = registry.pools.get(key)
            if pool is not None:
                pool.configure(settings, timeouts, dns_ttl)
        registry.pools.update(self.made)
        self.made = {}
        for key in [k for k in registry.pools if k not in self.used]:
            registry.pools.pop(key).close_idle()

    def discard(self) -> None:
        """Close the pools made for a runtime that will not serve; the registry is unchanged."""
        for pool in self.made.values():
            pool.close()
        self.made = {}

    def __repr__(self) -> str:
        return (
            f"PoolStage({len(self.used)} used, {len(self.made)} new, "
            f"{len(self.settings)} reconfigured)"
        )


@dataclass(slots=True)
class Runtime:
    version: int
    config: Config
    router: Router
    consumers: ConsumerIndex
    upstreams: dict[str, UpstreamGroup]
    limits: ListenerLimits
    routes: list[CompiledRoute] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Runtime(version={self.version}, {len(self.routes)} routes)"


def _upstream_group(upstream: Upstream, pools: PoolStage, clock: Clock) -> UpstreamGroup:
    targets = []
    for target in upstream.targets:
        parts = urlsplit(target.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        host_header = host if port == default_port else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
        targets.append(
            TargetEntry(
                url=target.url,
                scheme=scheme,
                host=host,
                port=port,
                host_header=host_header.encode("idna"),
                weight=target.weight,
                pool=pools.get(upstream, scheme, host, port),
            )
        )
    balancer = create_balancer(upstream.balance, [t.weight for t in targets], clock=clock)
    return UpstreamGroup(
        upstream.name,
        tuple(targets),
        balancer,
        upstream.hash_on,
        upstream.retries,
        needs_key=upstream.balance == "consistent-hash",
    )


def _effective_policies(
    config: Config, service: Service, route: Route, context: CompileContext
) -> tuple[Policy, ...]:
    """Global, then service, then route entries; a later entry of the same name replaces an
    earlier one. Sorted by priority (higher first), config order among equals."""
    chosen: dict[str, tuple[int, Any]] = {}
    order = 0
    for entries in (config.policies, service.policies, route.policies):
        for entry in entries:
            name, policy_config = cast(PolicyEntryBase, entry).spec()
            chosen[name] = (order, policy_config)
            order += 1
    classes = registry()
    instances = []
    for name, (position, policy_config) in chosen.items():
        cls = classes[name]
        instances.append((-cls.priority, position, cls(policy_config, context)))
    instances.sort(key=lambda item: (item[0], item[1]))
    return tuple(policy for _, _, policy in instances)


def _compile_route(
    config: Config,
    service: Service,
    route: Route,
    group: UpstreamGroup,
    consumers: ConsumerIndex,
    clock: Clock,
    shared_store: Callable[[], Store] | None,
    redis_store: Callable[[], RedisStore] | None,
) -> CompiledRoute:
    context = CompileContext(
        consumers=consumers,
        clock=clock,
        service=service.name,
        route=route.name,
        plans=config.plans,
        shared_store=shared_store,
        redis_store=redis_store,
    )
    policies = _effective_policies(config, service, route, context)
    drop = set(REQUEST_DROP)
    max_body_size = config.gateway.limits.max_body_size
    request_id_header = b"X-Request-Id"
    echo_request_id = True
    for policy in policies:
        drop |= getattr(policy, "drops_request_headers", frozenset())
        size = getattr(policy, "max_body_size", None)
        if size is not None:
            max_body_size = size if not max_body_size else min(max_body_size, size)
        if policy.name == "request-id":
            request_id_header = policy.header_name  # type: ignore[attr-defined]
            echo_request_id = policy.echo  # type: ignore[attr-defined]

    def chain(phase: str) -> tuple[Callable[..., Any], ...]:
        return tuple(p.handler(phase) for p in policies if phase in p.phases())

    return CompiledRoute(
        name=route.name,
        service=service.name,
        upstream=group,
        access=chain("access"),
        upstream_response=chain("upstream_response"),
        body=chain("body"),
        log=chain("log"),
        policies=policies,
        drop_request_headers=frozenset(drop),
        preserve_host=service.preserve_host if route.preserve_host is None else route.preserve_host,
        service_path=service.path.encode(),
        max_body_size=max_body_size,
        request_id_header=request_id_header,
        echo_request_id=echo_request_id,
        custom_request_id=(
            b"" if request_id_header.lower() == b"x-request-id" else request_id_header.lower()
        ),
        capture=_capture_policy(service.logs),
    )


def _capture_policy(logs: ServiceLogs) -> CapturePolicy | None:
    if logs == ServiceLogs():
        return None  # the common case: the listener then skips every capture step
    return CapturePolicy.build(
        request_headers=logs.request_headers,
        response_headers=logs.response_headers,
        request_body=logs.request_body,
        response_body=logs.response_body,
        max_body_bytes=logs.max_body,
        redact_headers=logs.redact_headers,
        redact_json_paths=logs.redact_json,
        query=logs.query,
        redact_query=logs.redact_query,
    )


def redis_store_factory(
    config: Config, clock: Clock | None = None
) -> Callable[[], RedisStore] | None:
    """A factory of one `RedisStore` for `config.cluster` (made on first call, then the same;
    it connects on first use), or None without `cluster.redis`. `clock=None`: Redis time."""
    cluster = config.cluster
    url = cluster.redis
    if url is None:
        return None
    made: list[RedisStore] = []

    def store() -> RedisStore:
        if not made:
            made.append(
                RedisStore(
                    url,
                    timeout=cluster.redis_timeout,
                    max_connections=cluster.redis_connections,
                    clock=clock,
                )
            )
        return made[0]

    return store


def check_compiles(config: Config, source: str) -> None:
    """Raise ConfigError if the config passes validation but cannot be compiled (a route the
    router refuses, an unknown anonymous consumer...): `check` and `serve` report it up front."""
    try:
        # The runtime is thrown away: a store of its own stands in for the node's.
        compile_config(
            config,
            PoolRegistry(),
            shared_store=ProcessStore,
            redis_store=redis_store_factory(config),
        )
    except ValueError as exc:
        raise ConfigError([ConfigProblem(source, "", str(exc))]) from None


def compile_config(
    config: Config,
    pools: PoolRegistry | PoolStage,
    *,
    version: int = 1,
    clock: Clock = SYSTEM_CLOCK,
    shared_store: Callable[[], Store] | None = None,
    redis_store: Callable[[], RedisStore] | None = None,
) -> Runtime:
    """Build a Runtime. Raises ValueError (with the route named) for what validation could not
    catch, such as a route the router cannot compile; the caller keeps the old runtime then.

    Given a `PoolStage`, the pools wait for its commit (or discard); given the registry, they
    are committed when the runtime is built. `shared_store` gives the node's store to policies
    that count node-wide (`store: local`); without it such a policy fails to compile."""
    if isinstance(pools, PoolStage):
        return _compile(config, pools, version, clock, shared_store, redis_store)
    stage = pools.stage()
    try:
        runtime = _compile(config, stage, version, clock, shared_store, redis_store)
    except BaseException:
        stage.discard()
        raise
    stage.commit()
    return runtime


def _compile(
    config: Config,
    pools: PoolStage,
    version: int,
    clock: Clock,
    shared_store: Callable[[], Store] | None,
    redis_store: Callable[[], RedisStore] | None,
) -> Runtime:
    consumers = ConsumerIndex.build(config.consumers)
    groups = {u.name: _upstream_group(u, pools, clock) for u in config.upstreams}
    specs: list[RouteSpec] = []
    routes: list[CompiledRoute] = []
    for service_index, service in enumerate(config.services):
        group = groups[service.upstream]
        for route_index, route in enumerate(service.routes):
            where = f"services[{service_index}].routes[{route_index}] ({service.name}/{route.name})"
            try:
                compiled = _compile_route(
                    config, service, route, group, consumers, clock, shared_store, redis_store
                )
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            routes.append(compiled)
            specs.append(
                RouteSpec(
                    payload=compiled,
                    hosts=tuple(h.lower() for h in route.hosts),
                    paths=tuple(route.paths),
                    methods=frozenset(route.methods),
                    headers=tuple(
                        (
                            name.lower(),
                            frozenset([values] if isinstance(values, str) else values),
                        )
                        for name, values in route.headers.items()
                    ),
                    strip_path=route.strip_path,
                    name=where,
                )
            )
    router = Router(specs)
    return Runtime(
        version=version,
        config=config,
        router=router,
        consumers=consumers,
        upstreams=groups,
        limits=config.gateway.limits,
        routes=routes,
    )
