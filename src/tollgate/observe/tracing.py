"""OpenTelemetry traces of calls: W3C trace context on the request path, spans after it.

With `tracing.enabled`, every call gets a SERVER span, an INTERNAL `policies` span when its
route has access policies, and a CLIENT span per upstream attempt; an incoming `traceparent`
is continued and a new one is sent upstream whose parent is the attempt's CLIENT span.

The request path does as little as it can (`begin`, `attempt`):
- it parses the incoming `traceparent` (W3C Trace Context, level 1: version, 32-hex trace id
  and 16-hex parent id, neither all zeros, flags; a higher version is read as the spec says)
  with one regular expression, in about 1.4 µs. The SDK's `TraceContextTextMapPropagator`
  does the same work through a `Context`, a `NonRecordingSpan`, a `SpanContext` and a
  `TraceState` parse: 6.6 µs per `extract`, 12.7 µs with a `tracestate` (measured with
  `timeit` on the interpreted tree), and its `inject` would need a live span object and a
  context per attempt. Hence this hand-written parser and formatter, on the request path;
- it draws the ids (`random.getrandbits`, as the SDK's own `RandomIdGenerator` does) and
  decides sampling as `ParentBased(TraceIdRatioBased(ratio))` would (the caller's sampled flag
  wins; a new trace is sampled when the low 64 bits of its id fall under the ratio's bound,
  read from the SDK's `TraceIdRatioBased`), because the decision travels upstream in the
  flags before any span exists;
- it writes the `traceparent` line of each upstream attempt. A client's `tracestate` is
  forwarded as it came when its `traceparent` is continued, and dropped with a new trace.

Spans are built after the call, from the timings the exchange already keeps (monotonic
seconds, turned into epoch nanoseconds with one offset re-read every few seconds), with
explicit ids, parents and start and end times: `finish` (the listener calls it where every
exchange ends) queues a sampled exchange, and a callback scheduled on the event loop, which
runs after the answer is handed to the socket, makes the `ReadableSpan`s and hands them to a
`BatchSpanProcessor`, whose thread encodes and exports them (OTLP over HTTP or gRPC). An
unsampled call costs the request path its ids and header only.

With tracing disabled, the listener never calls into this module: `traceparent` and
`tracestate` are headers like any other, forwarded untouched.

`Tracing` is made per worker process, when the worker starts serving (the processor's thread
must belong to the serving process), and shut down, flushing what is queued, when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from random import getrandbits
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from tollgate import __version__
from tollgate.observe.redaction import query_for_record
from tollgate.routing.router import Router, RouteSpec

if TYPE_CHECKING:
    from tollgate.config.schema import TracingSettings
    from tollgate.http.exchange import Exchange
    from tollgate.runtime.entries import CompiledRoute, TargetEntry
    from tollgate.runtime.runtime import Runtime

__all__ = [
    "DEFAULT_GRPC_ENDPOINT",
    "DEFAULT_HTTP_ENDPOINT",
    "TraceContext",
    "Tracing",
    "format_traceparent",
    "make_exporter",
    "parse_traceparent",
    "sampled_by_ratio",
]

log = logging.getLogger("tollgate.tracing")

DEFAULT_HTTP_ENDPOINT: Final = "http://127.0.0.1:4318/v1/traces"
DEFAULT_GRPC_ENDPOINT: Final = "http://127.0.0.1:4317"
_ENDPOINT_VARIABLES: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# Sampled exchanges waiting for their spans; past this many, they are built at once rather
# than on the next turn of the event loop (which a long burst of callbacks may delay).
MAX_PENDING: Final = 1024
# How often the same OpenTelemetry warning (queue full, export failed, a client's malformed
# tracestate) may reach the log.
WARNING_INTERVAL: Final = 60.0

_now: Final = time.monotonic
_LOW_64: Final = (1 << 64) - 1
_ZERO_TRACE_ID: Final = b"0" * 32
_ZERO_SPAN_ID: Final = b"0" * 16
# Optional whitespace, version, trace id, parent id, flags and, for versions above 00 only,
# more fields after a dash.
_TRACEPARENT: Final = re.compile(
    rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\r\n]*)?[ \t]*"
)
# RFC 9110 methods and PATCH: others are `_OTHER` in spans (OpenTelemetry HTTP conventions).
_KNOWN_METHODS: Final = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NO_TRACE_STATE: Final = TraceState()
_UNSET: Final = Status(StatusCode.UNSET)


class TraceContext:
    """One call's trace context, as `Exchange.trace` (one field: a dozen more instance
    attributes would slow every exchange of the interpreted listener down).

    `trace_id` is lower-case hex (as sent and recorded), `span_id` the gateway's server span's
    id (an int: only spans need it), `parent_id` the caller's span id in hex from a valid
    incoming `traceparent` ("" when the trace began here). `started` is when routing and the
    access chain began (monotonic; 0.0 for a call that never got there), `header` the
    `traceparent` line of the current upstream attempt, and `attempts`, for a recorded call,
    each attempt as [span id (int), start, target, error type]."""

    __slots__ = ("attempts", "header", "parent_id", "sampled", "span_id", "started", "trace_id")

    def __init__(
        self, trace_id: str, span_id: int, parent_id: str, sampled: bool, started: float
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.started = started
        self.header = b""
        self.attempts: list[list[Any]] | None = None

    def __repr__(self) -> str:
        return f"TraceContext({self.trace_id}, span={self.span_id:016x}, sampled={self.sampled})"


def parse_traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """(trace id, parent id, sampled) of a valid `traceparent` value, else None.

    W3C Trace Context §3.2: version 00 is exactly `00-{32 hex}-{16 hex}-{2 hex}`, lower-case;
    the ids may not be all zeros; version ff is invalid; a higher version is read for its first
    four fields when any more fields follow a dash.
    """
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == b"ff" or (rest is not None and version == b"00"):
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return trace_id.decode("ascii"), parent_id.decode("ascii"), int(flags, 16) & 1 == 1


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """A version 00 `traceparent` value."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def sampled_by_ratio(trace_id: int, bound: int) -> bool:
    """`TraceIdRatioBased`'s decision for a new trace: the id's low 64 bits under the bound."""
    return trace_id & _LOW_64 < bound


def make_exporter(settings: TracingSettings) -> SpanExporter | None:
    """The OTLP exporter `settings` ask for; None for `exporter: none`. What the settings leave
    out, the standard `OTEL_EXPORTER_OTLP_*` variables give (the endpoint, when one is set)."""
    if settings.exporter == "none":
        return None
    headers = dict(settings.headers) or None
    endpoint = settings.endpoint
    from_environment = any(name in os.environ for name in _ENDPOINT_VARIABLES)
    if settings.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        if endpoint is None and not from_environment:
            endpoint = DEFAULT_GRPC_ENDPOINT
        # Plain text for http://, TLS for https:// (the exporter reads the scheme).
        return GrpcSpanExporter(endpoint=endpoint, headers=headers, timeout=settings.timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if endpoint is None and not from_environment:
        endpoint = DEFAULT_HTTP_ENDPOINT
    return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=settings.timeout)


class _Quieter(logging.Filter):
    """Lets each OpenTelemetry warning through once a minute: a collector that is down (every
    batch fails, the queue overflows) or clients sending malformed `tracestate` must not flood
    the gateway's log."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = _now()
        key = str(record.msg)
        last = self.last.get(key)
        if last is not None and now - last < WARNING_INTERVAL:
            return False
        self.last[key] = now
        return True


_QUIETED_LOGGERS: Final = (
    "opentelemetry.trace.span",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)
_QUIETER: Final = _Quieter()


class _Resource(Resource):
    """A `Resource` whose hash is computed once: the OTLP encoder groups every span by its
    resource, and `Resource.__hash__` serialises the attributes to JSON each time (a tenth of
    the encoder's time with the gateway's spans)."""

    def __init__(self, attributes: dict[str, Any]) -> None:
        merged = Resource.create(attributes)
        super().__init__(merged.attributes, merged.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _quiet_warnings() -> None:
    for name in _QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIETER not in logger.filters:
            logger.addFilter(_QUIETER)


class Tracing:
    """One worker's traces: trace context on the request path, spans after each call."""

    def __init__(
        self,
        settings: TracingSettings,
        *,
        worker: int = 0,
        exporter: SpanExporter | None = None,
        runtime: Callable[[], Runtime] | None = None,
        scheme: str = "http",
    ) -> None:
        """`exporter` replaces the one `settings` name (tests pass an in-memory one);
        `runtime` gives the current runtime, to name the route template a call matched."""
        self.settings = settings
        ratio = TraceIdRatioBased(settings.sampling_ratio)
        self.bound: int = ratio.bound
        if exporter is None:
            exporter = make_exporter(settings)
        host = socket.gethostname()
        self.resource: Resource = _Resource(
            {
                "service.name": settings.service_name,
                "service.version": __version__,
                "service.instance.id": f"{host}-{worker}-{os.getpid()}",
                "host.name": host,
                "tollgate.worker": worker,
            }
        )
        # The provider holds the resource, the sampler spans made through its tracers would use
        # (the one `begin` applies by hand) and the processor; the listener's spans go to the
        # processor directly, as finished spans.
        self.provider = TracerProvider(sampler=ParentBased(ratio), resource=self.resource)
        self.processor: SpanProcessor | None = None
        if exporter is not None:
            self.processor = BatchSpanProcessor(
                exporter,
                max_queue_size=settings.queue,
                schedule_delay_millis=settings.flush_interval * 1000,
                max_export_batch_size=settings.batch_size,
                export_timeout_millis=settings.timeout * 1000,
            )
            self.provider.add_span_processor(self.processor)
        # Sampled calls get spans only when something takes them.
        self.recording = self.processor is not None
        self.scope = InstrumentationScope("tollgate", __version__)
        self.scheme = scheme
        self.offset_ns = 0
        self.sync_clock()
        self.spans_built = 0
        self.build_errors = 0
        self._pending: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runtime = runtime
        # Per route of the current runtime: its path template(s) (`http.route`: one path, a
        # router over several, None for none) and its policies' names. Made afresh when the
        # runtime changes, so old runtimes' routes are not kept alive.
        self._routes: dict[CompiledRoute, tuple[str | Router | None, tuple[str, ...]]] = {}
        self._indexed: Runtime | None = None
        self._closed = False
        _quiet_warnings()

    def start(self) -> None:
        """Build spans on this (running) event loop, after the answers are written."""
        self._loop = asyncio.get_running_loop()

    def sync_clock(self) -> None:
        """Exchanges keep monotonic times, spans epoch nanoseconds: re-read the difference."""
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    # -- the request path -----------------------------------------------------------------

    def begin(self, ex: Exchange) -> None:
        """The trace context of a call about to be routed."""
        ex.trace = self._context(ex, _now())

    def _context(self, ex: Exchange, started: float) -> TraceContext:
        header_map = ex.header_map
        incoming = header_map.get(b"traceparent")
        if incoming is not None:
            ex.remove_upstream_header(b"traceparent")  # each attempt sends its own
            parent = parse_traceparent(incoming)
            if parent is not None:
                trace_id, parent_id, sampled = parent
                return TraceContext(trace_id, getrandbits(64) or 1, parent_id, sampled, started)
        if b"tracestate" in header_map:
            ex.remove_upstream_header(b"tracestate")  # it belongs to a trace not continued
        trace = getrandbits(128) or 1
        return TraceContext(
            f"{trace:032x}", getrandbits(64) or 1, "", trace & _LOW_64 < self.bound, started
        )

    def attempt(self, ex: Exchange, target: TargetEntry) -> None:
        """A new upstream attempt (its start is `ex.t_upstream_start`): its span id, and the
        `traceparent` line its request carries."""
        context = ex.trace
        if context is None:
            return
        span_id = getrandbits(64) or 1
        sampled = context.sampled
        # Flags: 01 sampled, 00 not (`%d` of a bool).
        context.header = b"traceparent: 00-%s-%016x-0%d\r\n" % (
            context.trace_id.encode(),
            span_id,
            sampled,
        )
        if sampled and self.recording:
            entry: list[Any] = [span_id, ex.t_upstream_start, target, ""]
            attempts = context.attempts
            if attempts is None:
                context.attempts = [entry]
            else:
                attempts.append(entry)

    def attempt_failed(self, ex: Exchange, error_type: str) -> None:
        """The current attempt failed and another follows."""
        context = ex.trace
        if context is not None and context.attempts:
            context.attempts[-1][3] = error_type

    def finish(self, ex: Exchange) -> None:
        """The call has ended: queue its spans, built once the loop's current work is done."""
        context = ex.trace
        if context is None:
            # A call that never got to routing (a malformed request).
            context = ex.trace = self._context(ex, 0.0)
        if not context.sampled or not self.recording:
            return
        pending = self._pending
        pending.append(ex)
        if len(pending) == 1:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon(self.export_pending)
            else:
                self.export_pending()
        elif len(pending) >= MAX_PENDING:
            self.export_pending()

    # -- after the call -------------------------------------------------------------------

    def export_pending(self) -> None:
        """Build the spans of the calls queued by `finish` and hand them to the processor."""
        pending = self._pending
        processor = self.processor
        if not pending or processor is None:
            return
        self._pending = []
        on_end = processor.on_end
        for ex in pending:
            try:
                spans = self.spans(ex)
            except Exception:
                self.build_errors += 1
                if self.build_errors == 1:
                    log.exception("building the spans of a call failed")
                continue
            for span in spans:
                on_end(span)
            self.spans_built += len(spans)

    def spans(self, ex: Exchange) -> list[ReadableSpan]:
        """The finished spans of a traced call: server, policies, one client per attempt."""
        context = ex.trace
        assert context is not None
        offset = self.offset_ns
        trace = int(context.trace_id, 16)
        route = ex.route
        parent: SpanContext | None = None
        state = _NO_TRACE_STATE
        if context.parent_id:
            state = _trace_state(ex)
            parent = SpanContext(trace, int(context.parent_id, 16), True, _SAMPLED, state)
        server = SpanContext(trace, context.span_id, False, _SAMPLED, state)
        method = ex.method
        known = method in _KNOWN_METHODS
        http_route = self._http_route(route, ex) if route is not None else None
        status = ex.status
        error_type = ex.error_type
        disconnected = error_type == "client_disconnected"
        # Each attribute costs the OTLP encoder about 2 µs: the conventions' required and
        # recommended ones, and the gateway's own.
        attributes: dict[str, Any] = {
            "http.request.method": method if known else "_OTHER",
            "url.path": ex.path,
            "url.scheme": self.scheme,
            "server.address": ex.host,
            "client.address": ex.client_ip,
            "tollgate.request_id": ex.request_id,
        }
        if not known:
            attributes["http.request.method_original"] = method
        if ex.query:
            query = query_for_record(ex.query)
            if query:
                attributes["url.query"] = query
        if status and not disconnected:
            attributes["http.response.status_code"] = status
        agent = ex.header_map.get(b"user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        if http_route is not None:
            attributes["http.route"] = http_route
        if route is not None:
            attributes["tollgate.service"] = route.service
            attributes["tollgate.route"] = route.name
        consumer = ex.consumer
        if consumer is not None:
            attributes["tollgate.consumer"] = consumer.name
        if error_type:
            attributes["tollgate.error_type"] = error_type
        # Server spans fail on 5xx, on no answer and on an answer the client never got.
        failed = status >= 500 or status == 0 or disconnected
        if failed:
            attributes["error.type"] = error_type or str(status)
        if not known:
            name = "HTTP"
        elif http_route is not None:
            name = f"{method} {http_route}"
        else:
            name = method
        spans = [
            ReadableSpan(
                name,
                server,
                parent,
                self.resource,
                attributes,
                (),
                (),
                SpanKind.SERVER,
                None,
                Status(StatusCode.ERROR, error_type) if failed else _UNSET,
                int(ex.t_start * 1e9) + offset,
                int(ex.t_end * 1e9) + offset,
                self.scope,
            )
        ]
        attempts = context.attempts
        if route is not None and route.access and context.started:
            spans.append(self._policies_span(ex, route, server, context.started, attempts))
        if attempts:
            last = len(attempts) - 1
            for index, attempt in enumerate(attempts):
                end = ex.t_end if index == last else attempts[index + 1][1]
                spans.append(
                    self._client_span(ex, server, attempt, index, index == last, end, known)
                )
        return spans

    def _policies_span(
        self,
        ex: Exchange,
        route: CompiledRoute,
        server: SpanContext,
        started: float,
        attempts: list[list[Any]] | None,
    ) -> ReadableSpan:
        """Routing and the access chain: from the call's start of routing to its first upstream
        attempt, or to its answer when no attempt was made (a policy answered)."""
        offset = self.offset_ns
        found = self._route_info(route)
        names = found[1] if found is not None else tuple(p.name for p in route.policies)
        attributes: dict[str, Any] = {"tollgate.policies": names}
        end = attempts[0][1] if attempts else ex.t_end
        if not attempts and 400 <= ex.status < 500 and ex.error_type:
            attributes["error.type"] = ex.error_type  # the refusal: unauthorized, rate_limited...
        return ReadableSpan(
            "policies",
            SpanContext(server.trace_id, getrandbits(64) or 1, False, _SAMPLED, server.trace_state),
            server,
            self.resource,
            attributes,
            (),
            (),
            SpanKind.INTERNAL,
            None,
            _UNSET,
            int(started * 1e9) + offset,
            int(end * 1e9) + offset,
            self.scope,
        )

    def _client_span(
        self,
        ex: Exchange,
        server: SpanContext,
        attempt: list[Any],
        index: int,
        last: bool,
        end: float,
        known: bool,
    ) -> ReadableSpan:
        """One upstream attempt; the last one lasts until the call's end."""
        offset = self.offset_ns
        span_id, started, target, error_type = attempt
        attributes: dict[str, Any] = {
            "http.request.method": ex.method if known else "_OTHER",
            "server.address": target.host,
            "server.port": target.port,
            "url.full": target.url + ex.upstream_path.decode("latin-1"),
        }
        if not known:
            attributes["http.request.method_original"] = ex.method
        if index:
            attributes["http.request.resend_count"] = index
        events: list[Event] = []
        if last:
            error_type = ex.error_type
            if ex.source == "upstream" and error_type != "client_disconnected":
                attributes["http.response.status_code"] = ex.status
                if not error_type and ex.status >= 400:
                    error_type = str(ex.status)
            if ex.t_connected > started:  # a new connection (a pooled one is ready at once)
                events.append(Event("connected", None, int(ex.t_connected * 1e9) + offset))
            if ex.t_first_byte >= started:
                events.append(Event("first_byte", None, int(ex.t_first_byte * 1e9) + offset))
        if error_type:
            attributes["error.type"] = error_type
        return ReadableSpan(
            ex.method if known else "HTTP",
            SpanContext(server.trace_id, span_id, False, _SAMPLED, server.trace_state),
            server,
            self.resource,
            attributes,
            events,
            (),
            SpanKind.CLIENT,
            None,
            Status(StatusCode.ERROR, error_type) if error_type else _UNSET,
            int(started * 1e9) + offset,
            int(end * 1e9) + offset,
            self.scope,
        )

    def _http_route(self, route: CompiledRoute, ex: Exchange) -> str | None:
        """The path template the call matched (`http.route`): the route's one path, or the one
        of its paths the router would pick; None for a route without paths."""
        found = self._route_info(route)
        template = found[0] if found is not None else None
        if template is None or isinstance(template, str):
            return template
        match = template.match(ex.method, "", ex.path, ex.header_map)
        return None if isinstance(match, int) else str(match.payload)

    def _route_info(
        self, route: CompiledRoute
    ) -> tuple[str | Router | None, tuple[str, ...]] | None:
        """What `_routes` holds for `route`; None for a route of a runtime replaced since."""
        found = self._routes.get(route)
        if found is None and self._runtime is not None:
            runtime = self._runtime()
            if runtime is not self._indexed:
                self._index_routes(runtime)
                found = self._routes.get(route)
        return found

    def _index_routes(self, runtime: Runtime) -> None:
        self._routes = {}
        self._indexed = runtime
        configured = [route for service in runtime.config.services for route in service.routes]
        if len(configured) != len(runtime.routes):
            return
        for compiled, route in zip(runtime.routes, configured, strict=True):
            templates = [path[1:] if path.startswith("=") else path for path in route.paths]
            template: str | Router | None = None
            if len(templates) == 1:
                template = templates[0]
            elif templates:
                template = Router(
                    [
                        RouteSpec(payload=shown, paths=(path,))
                        for shown, path in zip(templates, route.paths, strict=True)
                    ]
                )
            names = tuple(policy.name for policy in compiled.policies)
            self._routes[compiled] = (template, names)

    # -- lifecycle ------------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Build what is queued and export everything now (blocking); True if done in time."""
        self.export_pending()
        processor = self.processor
        return True if processor is None else bool(processor.force_flush(timeout_millis))

    async def aclose(self) -> None:
        """Build what is queued, then flush and stop the exporter (in a thread)."""
        if self._closed:
            return
        self._closed = True
        self.export_pending()
        await asyncio.to_thread(self.provider.shutdown)

    def __repr__(self) -> str:
        return (
            f"Tracing(exporter={self.settings.exporter}, ratio={self.settings.sampling_ratio}, "
            f"{self.spans_built} spans)"
        )


def _trace_state(ex: Exchange) -> TraceState:
    """The caller's `tracestate` (every field line of it), for the spans' contexts."""
    values = [value.decode("latin-1") for lname, _, value in ex.headers if lname == b"tracestate"]
    if not values:
        return _NO_TRACE_STATE
    return TraceState.from_header(values)
