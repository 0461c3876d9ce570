"""Typed models of the config file (DESIGN §4). Validation happens once, at load.

Pydantic v2 was chosen over msgspec: loading and validating a config with 5,000 routes takes
about the same time with both (tens of milliseconds, never on the request path), and pydantic's
errors carry the full location of every problem, which `tollgate check` turns into
file:line: path messages.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)

from tollgate.config.base import Model
from tollgate.config.units import Duration, Size
from tollgate.observe.redaction import DEFAULT_MAX_BODY_BYTES, compile_json_path
from tollgate.policies import registry
from tollgate.policies.rate_limit import PlanRateLimitConfig
from tollgate.ratelimit.resp import RedisAddress
from tollgate.ratelimit.shm import MAX_CAPACITY

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


# -- listeners -----------------------------------------------------------------------------


class TLSSettings(Model):
    cert: str = Field(description="Path of the PEM certificate chain.")
    key: str = Field(description="Path of the PEM private key.")


class ListenerLimits(Model):
    """Limits of the client-facing listener; each breach gets its own status."""

    max_request_line: Size = Field(8 * 1024, description="Longest request target (414 past it).")
    max_header_size: Size = Field(32 * 1024, description="Request line and headers together (431).")
    max_headers: int = Field(100, ge=1, description="Most request header fields (431).")
    max_body_size: Size = Field(
        100 * 1024 * 1024, description="Largest request body on any route (413); 0 = no limit."
    )
    header_timeout: Duration = Field(10.0, gt=0, description="Time to receive the head (408).")
    body_timeout: Duration = Field(
        60.0, gt=0, description="Longest pause between two pieces of a request body (408)."
    )
    keepalive_timeout: Duration = Field(
        75.0, gt=0, description="Idle keep-alive connection is closed after this."
    )
    keepalive_requests: int = Field(
        0, ge=0, description="Close a connection after this many requests; 0 = no limit."
    )


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8080 or [::1]:8080)")
    return value


class SharedStateSettings(Model):
    """The node-wide state every worker of a node maps (the `store: local` rate-limit counters)."""

    capacity: int = Field(
        100_000,
        ge=1,
        le=MAX_CAPACITY,
        description="Records (64 bytes each) of the shared table: twice the keys live at once.",
    )


class GatewaySettings(Model):
    listen: str = Field("127.0.0.1:8080", description="host:port of the data plane.")
    workers: int | Literal["auto"] = Field(
        1, description="Worker processes sharing the port (SO_REUSEPORT); auto = one per CPU."
    )
    tls: TLSSettings | None = Field(None, description="Terminate TLS with this certificate.")
    limits: ListenerLimits = Field(default_factory=ListenerLimits)
    drain_timeout: Duration = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    shared_state: SharedStateSettings = Field(default_factory=SharedStateSettings)

    _listen = field_validator("listen")(_check_listen)

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("workers must be between 1 and 256, or auto")
        return value


class AdminSettings(Model):
    listen: str | None = Field(
        "127.0.0.1:8001", description="host:port of the admin API; null turns it off."
    )
    token: SecretStr | None = Field(
        None, description="Bearer token for the admin API; without it only /health answers."
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        # `token: "${TOLLGATE_ADMIN_TOKEN:-}"` with the variable unset: the API stays closed.
        return None if value == "" else value


class ClusterSettings(Model):
    redis: str | None = Field(
        None,
        description="redis://[[user]:password@]host[:port][/db] or rediss://... shared by "
        "every node (rate-limit counters with `store: redis`).",
    )
    redis_timeout: Duration = Field(
        0.1,
        gt=0,
        description="Longest wait for Redis' answer; past it the call fails and each policy's "
        "`on_store_error` decides.",
    )
    redis_connections: int = Field(
        2, ge=1, le=64, description="Connections to Redis per worker (commands are pipelined)."
    )

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                RedisAddress.parse(value)
            except ValueError as exc:
                # The URL may hold a password: the message names it without repeating it.
                raise ValueError(str(exc).replace(repr(value), "the URL")) from None
        return value


# -- upstreams -----------------------------------------------------------------------------


class Target(Model):
    url: str = Field(description="http(s)://host:port of one target.")
    weight: int = Field(1, ge=0, le=65535, description="Share of traffic; 0 = drained.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+/?$", value):
            raise ValueError(f"{value!r} is not http(s)://host[:port]")
        return value.rstrip("/")


class UpstreamTimeouts(Model):
    connect: Duration = Field(5.0, gt=0, description="TCP (and TLS) connect (504 past it).")
    write: Duration = Field(60.0, gt=0, description="Longest stall sending the request (504).")
    read: Duration = Field(
        60.0, gt=0, description="Longest wait for the first byte or between two reads (504)."
    )


class PoolSettings(Model):
    max_connections: int = Field(1024, ge=1, description="Open connections per target at most.")
    max_idle: int = Field(256, ge=0, description="Idle keep-alive connections kept per target.")
    idle_timeout: Duration = Field(60.0, gt=0, description="An idle connection is closed after.")


class Upstream(Model):
    name: str = Field(pattern=_NAME)
    targets: list[Target] = Field(min_length=1)
    balance: Literal["round-robin", "least-connections", "consistent-hash", "peak-ewma"] = (
        "round-robin"
    )
    hash_on: str = Field(
        "ip", description="For consistent-hash: ip, consumer, header:NAME or cookie:NAME."
    )
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    tls_verify: bool = Field(True, description="Verify an https target's certificate.")
    ca_file: str | None = Field(None, description="CA bundle for https targets.")
    sni: str | None = Field(None, description="Server name sent in TLS; default: the host.")
    dns_ttl: Duration = Field(30.0, ge=0, description="How long a resolved address is reused.")
    retries: int = Field(
        1, ge=0, le=10, description="Idempotent requests that failed to connect are retried."
    )

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, value: str) -> str:
        kind, _, arg = value.partition(":")
        if kind in ("ip", "consumer") and not arg:
            return value
        if kind in ("header", "cookie") and arg:
            return value
        raise ValueError(f"{value!r}: use ip, consumer, header:NAME or cookie:NAME")


# -- services, routes, policies ------------------------------------------------------------


class PolicyEntryBase(Model):
    """`{policy-name: {options}}`: exactly one registered policy per list item."""

    @model_validator(mode="before")
    @classmethod
    def _one_policy(cls, value: Any) -> Any:
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("each policy is one mapping {policy-name: {options}}")
        ((name, options),) = value.items()
        return {name: {} if options is None else options}

    def spec(self) -> tuple[str, Any]:
        """The (registered name, validated config) this entry holds."""
        for field_name, info in type(self).model_fields.items():
            config = getattr(self, field_name)
            if config is not None:
                return str(info.alias), config
        raise AssertionError("a validated policy entry holds one policy")


def _policy_entry_model() -> type[PolicyEntryBase]:
    fields: dict[str, Any] = {
        name.replace("-", "_"): (cls.Config | None, Field(None, alias=name))
        for name, cls in sorted(registry().items())
    }
    model: type[PolicyEntryBase] = create_model("PolicyEntry", __base__=PolicyEntryBase, **fields)
    return model


PolicyEntry = _policy_entry_model()


# -- call records --------------------------------------------------------------------------


class ServiceLogs(Model):
    """Per-service captures in call records: off unless turned on, capped, redacted."""

    request_headers: bool = Field(False, description="Keep the request's headers.")
    response_headers: bool = Field(False, description="Keep the response's headers.")
    request_body: bool = Field(False, description="Keep the start of the request body.")
    response_body: bool = Field(False, description="Keep the start of the response body.")
    max_body: Size = Field(
        DEFAULT_MAX_BODY_BYTES, description="Bytes of a body kept at most (the rest is noted)."
    )
    redact_headers: list[str] = Field(
        default_factory=list,
        description="Header names whose values are redacted, beyond Authorization, Cookie, "
        "Set-Cookie and credential-like names.",
    )
    redact_json: list[str] = Field(
        default_factory=list,
        description="JSON paths (`$.password`, `messages[*].content`, `..token`) redacted in "
        "captured JSON bodies.",
    )
    query: bool = Field(True, description="Keep the query string (credential-like names redacted).")
    redact_query: list[str] = Field(
        default_factory=list, description="Query parameter names whose values are redacted too."
    )

    @field_validator("redact_json")
    @classmethod
    def _json_paths(cls, value: list[str]) -> list[str]:
        for index, path in enumerate(value):
            try:
                compile_json_path(path)
            except ValueError as exc:
                # Messages name a value's place, never the value itself.
                raise ValueError(str(exc).replace(repr(path), f"[{index}]")) from None
        return value


class JsonlSinkSettings(Model):
    path: str = Field(
        description="File of JSON lines; `{worker}` becomes the worker's number (each worker "
        "needs a file of its own: with several workers and no `{worker}`, `-N` is added)."
    )
    max_bytes: Size = Field(100 * 1024 * 1024, description="Rotate before passing this; 0 = never.")
    backup_count: int = Field(5, ge=0, description="Rotated files kept; 0 = never rotate.")


class HttpSinkSettings(Model):
    url: str = Field(description="http(s)://host[:port]/path receiving a JSON array per batch.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra request headers (a collector's token...)."
    )
    timeout: Duration = Field(10.0, gt=0, description="Connect and read timeout of each POST.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+", value):
            raise ValueError("use http://host[:port]/path or https://...")
        return value


class EmptySinkSettings(Model):
    """`storage` and `stdout` take no options."""


LOG_SINK_KINDS = ("storage", "stdout", "jsonl", "http")


class LogSink(Model):
    """`storage`, `stdout`, `{jsonl: {...}}` or `{http: {...}}`: exactly one sink per item."""

    storage: EmptySinkSettings | None = None
    stdout: EmptySinkSettings | None = None
    jsonl: JsonlSinkSettings | None = None
    http: HttpSinkSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_sink(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {value: {}}
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("a sink is storage, stdout, {jsonl: {...}} or {http: {...}}")
        ((name, options),) = value.items()
        return {name: {} if options is None else options}

    @property
    def kind(self) -> str:
        """Which sink this item is: one of LOG_SINK_KINDS."""
        for kind in LOG_SINK_KINDS:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a validated sink item holds one sink")


class LogRetention(Model):
    """How long the `storage` database keeps what it holds; reckoned hourly."""

    records: Duration = Field(14 * 86400.0, gt=0, description="Raw call records.")
    minute_rollups: Duration = Field(7 * 86400.0, gt=0, description="Per-minute rollups.")
    hour_rollups: Duration = Field(90 * 86400.0, gt=0, description="Per-hour rollups.")
    day_rollups: Duration | None = Field(None, gt=0, description="Per-day rollups; null = forever.")


class LogsSettings(Model):
    """Call records: one per call, queued per worker and written to the sinks in batches."""

    enabled: bool = Field(True, description="Make call records at all (false: a branch only).")
    sinks: list[LogSink] = Field(
        default_factory=lambda: [LogSink.model_validate("storage")],
        description="Where records go: storage, stdout, {jsonl: ...}, {http: ...}.",
    )
    queue: int = Field(65536, ge=1, description="Records queued per worker; past it, dropped.")
    batch_size: int = Field(1000, ge=1, description="Records per write to a sink at most.")
    flush_interval: Duration = Field(
        0.2, gt=0, description="Queued records reach the sinks at most this late."
    )
    rollups: bool = Field(True, description="Per-minute analytics rollups into `storage`.")
    retention: LogRetention = Field(default_factory=LogRetention)
    node: str | None = Field(None, description="Node name in records; default: the host name.")

    @field_validator("sinks")
    @classmethod
    def _distinct_sinks(cls, value: list[LogSink]) -> list[LogSink]:
        for kind in ("storage", "stdout"):
            if sum(sink.kind == kind for sink in value) > 1:
                raise ValueError(f"{kind} is listed more than once")
        return value


# -- tracing -------------------------------------------------------------------------------


class TracingSettings(Model):
    """OpenTelemetry traces: a server span per call, W3C trace context continued upstream."""

    enabled: bool = Field(
        False, description="Trace calls (false: traceparent passes through untouched)."
    )
    exporter: Literal["otlp-http", "otlp-grpc", "none"] = Field(
        "otlp-http", description="Where spans go; none: propagate trace context, export nothing."
    )
    endpoint: str | None = Field(
        None,
        description="The collector: default http://127.0.0.1:4318/v1/traces (otlp-http), "
        "http://127.0.0.1:4317 (otlp-grpc).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent with every export (a collector's token)."
    )
    sampling_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces sampled; a caller's decision wins."
    )
    service_name: str = Field("tollgate", min_length=1, description="The `service.name` resource.")
    timeout: Duration = Field(10.0, gt=0, description="Longest wait for one export.")
    queue: int = Field(
        2048, ge=1, description="Spans held per worker for export; past it, dropped."
    )
    batch_size: int = Field(512, ge=1, description="Spans per export at most.")
    flush_interval: Duration = Field(5.0, gt=0, description="Spans are exported at most this late.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s?#]+", value):
            raise ValueError("use http://host:port[/path] or https://...")
        return value

    @model_validator(mode="after")
    def _batch_fits(self) -> TracingSettings:
        if self.batch_size > self.queue:
            raise ValueError("batch_size cannot be larger than queue")
        return self


class Route(Model):
    name: str = Field(pattern=_NAME)
    hosts: list[str] = Field(default_factory=list, description="Exact or *.wildcard hosts.")
    paths: list[str] = Field(
        default_factory=list,
        description="/prefix, =/exact, /items/{id} templates, ~regex; empty = any path.",
    )
    methods: list[str] = Field(default_factory=list, description="Empty = any method.")
    headers: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Header name -> accepted value(s)."
    )
    strip_path: bool = Field(False, description="Remove the matched prefix before proxying.")
    preserve_host: bool | None = Field(None, description="Default: the service's setting.")
    policies: list[PolicyEntry] = Field(default_factory=list)  # type: ignore[valid-type]

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = []
        for method in value:
            if not re.fullmatch(r"[A-Za-z]+", method):
                raise ValueError(f"{method!r} is not an HTTP method")
            out.append(method.upper())
        return out

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            body = path[1:] if path.startswith("=") else path
            if path.startswith("~"):
                try:
                    re.compile(path[1:])
                except re.error as exc:
                    raise ValueError(f"{path!r}: invalid regex: {exc}") from None
            elif not body.startswith("/"):
                raise ValueError(f"{path!r}: a path starts with /, =/ (exact) or ~ (regex)")
        return value


class Service(Model):
    name: str = Field(pattern=_NAME)
    type: Literal["http"] = "http"
    upstream: str = Field(description="Name of an upstream.")
    path: str = Field("", description="Prefix prepended to the path sent upstream.")
    preserve_host: bool = Field(False, description="Send the client's Host upstream.")
    routes: list[Route] = Field(min_length=1)
    policies: list[PolicyEntry] = Field(default_factory=list)  # type: ignore[valid-type]
    logs: ServiceLogs = Field(
        default_factory=ServiceLogs,
        description="What this service's call records keep beyond the defaults (opt-in).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("path starts with /")
        return value.rstrip("/")


def _check_key(key: SecretStr) -> SecretStr:
    # An unset `${VAR:-}` must not become a key; the message never repeats a key.
    if not key.get_secret_value():
        raise ValueError("an API key cannot be empty")
    return key


ApiKey = Annotated[SecretStr, AfterValidator(_check_key)]


class Consumer(Model):
    name: str = Field(pattern=_NAME)
    id: str | None = Field(None, description="Stable id sent upstream; default: the name.")
    keys: list[ApiKey] = Field(default_factory=list, description="API keys (stored hashed).")
    plan: str | None = None
    tags: list[str] = Field(default_factory=list)


# -- plans ---------------------------------------------------------------------------------


class Plan(Model):
    """What a consumer's `plan` gives it. Policies read the sections they own."""

    rate_limit: PlanRateLimitConfig | None = Field(
        None,
        alias="rate-limit",
        description="Limits replacing a rate-limit policy's own where it sets `plans: true`.",
    )


def _check_plan_names(plans: dict[str, Plan]) -> dict[str, Plan]:
    for name in plans:
        if not re.match(_NAME, name):
            raise ValueError(
                f"plan name {name!r}: letters, digits, '.', '_' and '-', starting with a letter "
                "or digit"
            )
    return plans


Plans = Annotated[dict[str, Plan], AfterValidator(_check_plan_names)]


class MetricsSettings(Model):
    consumer_labels: bool = Field(
        False,
        description="Also count requests per consumer (tollgate_consumer_requests_total): one "
        "series per consumer, route and status, so only for a bounded number of consumers.",
    )


class Config(Model):
    version: Literal[1] = 1
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    storage: str = "sqlite:///./tollgate.db"
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    logs: LogsSettings = Field(default_factory=LogsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    upstreams: list[Upstream] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    consumers: list[Consumer] = Field(default_factory=list)
    plans: Plans = Field(
        default_factory=dict, description="Named plans that consumers' `plan` selects."
    )
    policies: list[PolicyEntry] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Applied to every route."
    )
