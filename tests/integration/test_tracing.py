"""OpenTelemetry traces from an in-process gateway, against the real recording upstream.

Spans go to the SDK's in-memory exporter (passed to the `Gateway` in place of the OTLP one),
except in the export tests, where the real OTLP exporters post to a tiny local collector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from call_records import sqlite_rows
from http_wire import RawClient, RawResponse, read_response, request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_collector import Collector
from recording_upstream import RecordedRequest, RecordingUpstream
from upstreams import free_port

from tollgate.config.loader import parse_config_data
from tollgate.observe.tracing import parse_traceparent
from tollgate.runtime.worker import Gateway

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
KEY = "tracing-test-key-0123456789"

Starter = Callable[..., Awaitable[Gateway]]


def _config(upstream_url: str, tracing: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "gateway": {"listen": "127.0.0.1:0"},
        "logs": {"enabled": False},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream_url}]}],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [
                    {"name": "items", "paths": ["/items"]},
                    {"name": "things", "paths": ["=/thing", "/things/{id}"]},
                ],
            },
            {
                "name": "private",
                "upstream": "backend",
                "routes": [{"name": "secret", "paths": ["/private"]}],
                "policies": [{"key-auth": {}}],
            },
        ],
        "consumers": [{"name": "acme", "keys": [KEY]}],
    }
    if tracing is not None:
        config["tracing"] = tracing
    config.update(top)
    return config


TRACED = {"enabled": True}


@pytest.fixture
def start(start_gateway: Callable[..., Awaitable[Gateway]]) -> Starter:
    """Start a Gateway from a config mapping, with an exporter of the test's; closed after."""

    async def start(config: dict[str, Any], exporter: Any = None) -> Gateway:
        return await start_gateway(config, span_exporter=exporter)

    return start


async def _call(gateway: Gateway, data: bytes) -> RawResponse:
    async with await RawClient.open(gateway.port) as client:
        await client.send(data)
        return await read_response(client.reader)


async def _get(
    gateway: Gateway, target: str, headers: list[tuple[str, str]] | None = None
) -> RawResponse:
    sent = [("User-Agent", "tests/1.0"), *(headers or [])]
    return await _call(gateway, request("GET", target, sent))


def _spans(gateway: Gateway, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert gateway.tracing is not None
    assert gateway.tracing.force_flush()
    return list(exporter.get_finished_spans())


def _one(spans: list[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    found = [span for span in spans if span.kind is kind]
    assert len(found) == 1, [(span.name, span.kind) for span in spans]
    return found[0]


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def _traceparents(received: RecordedRequest) -> list[str]:
    return [value for name, value in received.headers if name.lower() == "traceparent"]


# -- propagation -------------------------------------------------------------------------------


async def test_an_incoming_traceparent_is_continued_and_sent_upstream_as_the_client_span(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    response = await _get(
        gateway,
        "/items/42?page=2",
        [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "congo=t61rcWkgMzE")],
    )
    assert response.status == 200
    spans = _spans(gateway, exporter)
    assert len(spans) == 2  # no policies on this route: server and client
    server = _one(spans, SpanKind.SERVER)
    client = _one(spans, SpanKind.CLIENT)
    # The server span continues the caller's trace, as a child of the caller's span.
    assert _hex_trace(server) == _hex_trace(client) == TRACE_ID
    assert server.parent is not None and server.parent.is_remote
    assert f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.context is not None and server.context.trace_state.get("congo") == "t61rcWkgMzE"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    # The upstream got one traceparent, of the same trace, whose parent is the client span;
    # tracestate went on as it came.
    (received,) = upstream.requests
    assert _traceparents(received) == [f"00-{TRACE_ID}-{_hex_span(client)}-01"]
    assert received.header("tracestate") == "congo=t61rcWkgMzE"
    # Names and attributes (OpenTelemetry HTTP conventions).
    assert server.name == "GET /items"
    assert server.attributes is not None and client.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "GET",
        "url.path": "/items/42",
        "url.query": "page=2",
        "url.scheme": "http",
        "server.address": "gateway.test",
        "client.address": "127.0.0.1",
        "user_agent.original": "tests/1.0",
        "http.route": "/items",
        "http.response.status_code": 200,
        "tollgate.service": "api",
        "tollgate.route": "items",
        "tollgate.request_id": response.header("x-request-id"),
    }
    assert client.name == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == upstream.port
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["url.full"] == f"{upstream.url}/items/42"
    assert [event.name for event in client.events] == ["connected", "first_byte"]
    assert server.status.status_code is client.status.status_code is StatusCode.UNSET
    # Times: the client span lies within the server span, both end after they start.
    assert server.start_time is not None and server.end_time is not None
    assert client.start_time is not None and client.end_time is not None
    assert server.start_time <= client.start_time < client.end_time <= server.end_time
    assert server.resource.attributes["service.name"] == "tollgate"


async def test_without_a_traceparent_a_new_trace_starts_and_is_propagated(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, {**TRACED, "service_name": "edge"}), exporter)
    assert (await _get(gateway, "/items")).status == 200
    spans = _spans(gateway, exporter)
    server = _one(spans, SpanKind.SERVER)
    client = _one(spans, SpanKind.CLIENT)
    assert server.parent is None
    assert server.resource.attributes["service.name"] == "edge"
    (received,) = upstream.requests
    (traceparent,) = _traceparents(received)
    assert parse_traceparent(traceparent.encode()) == (_hex_trace(server), _hex_span(client), True)


async def test_several_paths_name_the_template_that_matched(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    assert (await _get(gateway, "/things/7")).status == 200
    assert (await _get(gateway, "/thing")).status == 200
    servers = [span for span in _spans(gateway, exporter) if span.kind is SpanKind.SERVER]
    assert [span.name for span in servers] == ["GET /things/{id}", "GET /thing"]


async def test_after_a_reload_spans_name_the_new_routes(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    config = _config(upstream.url, TRACED)
    gateway = await start(config, exporter)
    assert (await _get(gateway, "/items/1")).status == 200
    config["services"][0]["routes"][0]["paths"] = ["/items/{id}"]
    gateway.reload(parse_config_data(config))
    assert (await _get(gateway, "/items/1")).status == 200
    servers = [span for span in _spans(gateway, exporter) if span.kind is SpanKind.SERVER]
    assert [span.name for span in servers] == ["GET /items", "GET /items/{id}"]


MALFORMED = {
    "garbage": "not a traceparent",
    "version 00 with more fields": f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "zero parent id": f"00-{TRACE_ID}-{'0' * 16}-01",
    "upper-case hex": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "short trace id": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "bad flags": f"00-{TRACE_ID}-{PARENT_ID}-0x",
    "empty": "",
}


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_traceparent_starts_a_new_trace(
    start: Starter, upstream: RecordingUpstream, value: str
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    response = await _get(gateway, "/items", [("traceparent", value), ("tracestate", "a=b")])
    assert response.status == 200
    server = _one(_spans(gateway, exporter), SpanKind.SERVER)
    assert server.parent is None
    assert _hex_trace(server) != TRACE_ID
    (received,) = upstream.requests
    (traceparent,) = _traceparents(received)
    parsed = parse_traceparent(traceparent.encode())
    assert parsed is not None and parsed[0] == _hex_trace(server)
    # The tracestate belonged to the trace that was not continued.
    assert received.header("tracestate") is None


async def test_a_higher_version_is_read_for_its_known_fields(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    response = await _get(gateway, "/items", [("traceparent", f"cc-{TRACE_ID}-{PARENT_ID}-01-x")])
    assert response.status == 200
    server = _one(_spans(gateway, exporter), SpanKind.SERVER)
    assert server.parent is not None and _hex_trace(server) == TRACE_ID
    (traceparent,) = _traceparents(upstream.requests[0])
    assert traceparent.startswith(f"00-{TRACE_ID}-")


# -- sampling --------------------------------------------------------------------------------


async def test_ratio_zero_exports_nothing_but_still_propagates_unsampled(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, {**TRACED, "sampling_ratio": 0}), exporter)
    for _ in range(5):
        assert (await _get(gateway, "/items")).status == 200
    assert _spans(gateway, exporter) == []
    trace_ids = set()
    for received in upstream.requests:
        (traceparent,) = _traceparents(received)
        assert traceparent.endswith("-00")
        parsed = parse_traceparent(traceparent.encode())
        assert parsed is not None and parsed[2] is False
        trace_ids.add(parsed[0])
    assert len(trace_ids) == 5  # a new trace each


async def test_the_callers_sampled_flag_wins_over_the_ratio(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, {**TRACED, "sampling_ratio": 0}), exporter)
    sampled = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
    assert (await _get(gateway, "/items", sampled)).status == 200
    spans = _spans(gateway, exporter)
    assert {span.kind for span in spans} == {SpanKind.SERVER, SpanKind.CLIENT}
    assert all(_hex_trace(span) == TRACE_ID for span in spans)
    (traceparent,) = _traceparents(upstream.requests[0])
    assert traceparent == f"00-{TRACE_ID}-{_hex_span(_one(spans, SpanKind.CLIENT))}-01"


async def test_an_unsampled_caller_is_not_sampled_even_at_ratio_one(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    unsampled = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00")]
    assert (await _get(gateway, "/items", unsampled)).status == 200
    assert _spans(gateway, exporter) == []
    (traceparent,) = _traceparents(upstream.requests[0])
    assert traceparent.startswith(f"00-{TRACE_ID}-") and traceparent.endswith("-00")
    assert traceparent != f"00-{TRACE_ID}-{PARENT_ID}-00"  # the gateway is the parent now


# -- disabled ----------------------------------------------------------------------------------


async def test_disabled_passes_trace_context_through_untouched(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url), exporter)  # tracing is off by default
    assert gateway.tracing is None and gateway.state.tracing is None
    sent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    malformed = "00-nonsense"
    assert (await _get(gateway, "/items", [("traceparent", sent), ("tracestate", "a=b")])).status
    assert (await _get(gateway, "/items", [("traceparent", malformed)])).status == 200
    assert (await _get(gateway, "/items")).status == 200
    first, second, third = upstream.requests
    assert _traceparents(first) == [sent] and first.header("tracestate") == "a=b"
    assert _traceparents(second) == [malformed]
    assert _traceparents(third) == []
    assert exporter.get_finished_spans() == ()


# -- gateway answers and failures --------------------------------------------------------------


async def test_answers_the_gateway_makes_get_a_server_span(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    caller = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
    assert (await _get(gateway, "/private", caller)).status == 401
    assert (await _get(gateway, "/nowhere", caller)).status == 404
    assert (await _get(gateway, "/private", [("apikey", KEY)])).status == 200
    spans = _spans(gateway, exporter)
    servers = [span for span in spans if span.kind is SpanKind.SERVER]
    assert [span.name for span in servers] == ["GET /private", "GET", "GET /private"]
    unauthorized, not_found, admitted = servers
    for span in (unauthorized, not_found):
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
        assert span.status.status_code is StatusCode.UNSET  # 4xx is not a server error
        assert span.attributes is not None and "error.type" not in span.attributes
    assert unauthorized.attributes is not None and not_found.attributes is not None
    assert unauthorized.attributes["http.response.status_code"] == 401
    assert unauthorized.attributes["tollgate.error_type"] == "unauthorized"
    assert not_found.attributes["http.response.status_code"] == 404
    assert "http.route" not in not_found.attributes
    assert "tollgate.route" not in not_found.attributes
    # The key-auth route has a policies span under each of its server spans; the refused call
    # has no client span, the admitted one has one, after the policies.
    policies = [span for span in spans if span.kind is SpanKind.INTERNAL]
    assert [span.name for span in policies] == ["policies", "policies"]
    refused, passed = policies
    assert refused.parent is not None and unauthorized.context is not None
    assert refused.parent.span_id == unauthorized.context.span_id
    assert refused.attributes is not None and passed.attributes is not None
    assert list(refused.attributes["tollgate.policies"]) == ["key-auth"]
    assert refused.attributes["error.type"] == "unauthorized"
    assert "error.type" not in passed.attributes
    assert admitted.attributes is not None and admitted.attributes["tollgate.consumer"] == "acme"
    (client,) = [span for span in spans if span.kind is SpanKind.CLIENT]
    assert client.parent is not None and admitted.context is not None
    assert client.parent.span_id == admitted.context.span_id
    assert passed.end_time is not None and client.start_time is not None
    assert passed.end_time <= client.start_time
    assert len(upstream.requests) == 1


async def test_an_upstream_502_is_an_error(start: Starter, upstream: RecordingUpstream) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(upstream.url, TRACED), exporter)
    assert (await _get(gateway, "/items/status/502")).status == 502
    spans = _spans(gateway, exporter)
    server = _one(spans, SpanKind.SERVER)
    client = _one(spans, SpanKind.CLIENT)
    for span in (server, client):
        assert span.attributes is not None
        assert span.attributes["http.response.status_code"] == 502
        assert span.attributes["error.type"] == "502"
        assert span.status.status_code is StatusCode.ERROR


async def test_an_unreachable_upstream_is_an_error_of_the_attempt(start: Starter) -> None:
    exporter = InMemorySpanExporter()
    gateway = await start(_config(f"http://127.0.0.1:{free_port()}", TRACED), exporter)
    assert (await _get(gateway, "/items")).status == 502
    spans = _spans(gateway, exporter)
    server = _one(spans, SpanKind.SERVER)
    client = _one(spans, SpanKind.CLIENT)
    assert server.attributes is not None and client.attributes is not None
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "upstream_connect_error"
    assert client.attributes["error.type"] == "upstream_connect_error"
    assert "http.response.status_code" not in client.attributes
    assert client.status.status_code is StatusCode.ERROR


async def test_a_retried_attempt_has_a_client_span_of_its_own(
    start: Starter, upstream: RecordingUpstream
) -> None:
    exporter = InMemorySpanExporter()
    dead = f"http://127.0.0.1:{free_port()}"
    config = _config(upstream.url, TRACED)
    config["upstreams"] = [
        {"name": "backend", "targets": [{"url": dead}, {"url": upstream.url}], "retries": 1}
    ]
    gateway = await start(config, exporter)
    for _ in range(2):  # round-robin: one of the two starts with the dead target
        assert (await _get(gateway, "/items")).status == 200
    spans = _spans(gateway, exporter)
    clients = [span for span in spans if span.kind is SpanKind.CLIENT]
    assert len(clients) == 3
    by_parent: dict[int, list[ReadableSpan]] = {}
    for span in clients:
        assert span.parent is not None
        by_parent.setdefault(span.parent.span_id, []).append(span)
    failed, retried = next(attempts for attempts in by_parent.values() if len(attempts) == 2)
    assert failed.attributes is not None and retried.attributes is not None
    assert failed.attributes["error.type"] == "upstream_connect_error"
    assert "http.request.resend_count" not in failed.attributes
    assert retried.attributes["http.request.resend_count"] == 1
    assert retried.attributes["http.response.status_code"] == 200
    assert failed.end_time is not None and retried.start_time is not None
    assert failed.end_time <= retried.start_time
    # Each attempt sent (or would have sent) its own traceparent: the live one's reached it.
    sent = {parse_traceparent(_traceparents(r)[0].encode()) for r in upstream.requests}
    assert (_hex_trace(retried), _hex_span(retried), True) in sent


# -- call records ------------------------------------------------------------------------------


async def test_the_call_record_carries_the_trace_id(
    start: Starter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    config = _config(upstream.url, TRACED, logs={"enabled": True, "rollups": False})
    gateway = await start(config, exporter)
    caller = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"), ("X-Request-Id", "continued")]
    assert (await _get(gateway, "/items", caller)).status == 200
    assert (await _get(gateway, "/items", [("X-Request-Id", "new")])).status == 200
    assert (await _get(gateway, "/nowhere", [("X-Request-Id", "missing")])).status == 404
    assert (await _call(gateway, b"BROKEN\r\n\r\n")).status == 400
    server_traces = {
        span.attributes["tollgate.request_id"]: _hex_trace(span)
        for span in _spans(gateway, exporter)
        if span.kind is SpanKind.SERVER and span.attributes is not None
    }
    await gateway.close()
    rows = {row["request_id"]: row["trace_id"] for row in sqlite_rows(tmp_path / "tollgate.db")}
    assert len(rows) == 4
    assert rows.pop("continued") == TRACE_ID  # unsampled: no span, but the record has it
    assert "continued" not in server_traces
    for request_id, trace_id in rows.items():
        assert trace_id == server_traces[request_id]  # the malformed request's too
        assert len(trace_id) == 32


async def test_without_tracing_records_have_no_trace_id(
    start: Starter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = _config(upstream.url, logs={"enabled": True, "rollups": False})
    gateway = await start(config)
    traced = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
    assert (await _get(gateway, "/items", traced)).status == 200
    await gateway.close()
    assert [row["trace_id"] for row in sqlite_rows(tmp_path / "tollgate.db")] == [None]


# -- export ------------------------------------------------------------------------------------


async def test_spans_are_exported_over_otlp_http(
    start: Starter, upstream: RecordingUpstream, collector: Collector
) -> None:
    tracing = {
        **TRACED,
        "endpoint": collector.url,
        "headers": {"x-collector-token": "t0k3n"},
        "flush_interval": "50ms",
    }
    gateway = await start(_config(upstream.url, tracing))
    caller = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]
    assert (await _get(gateway, "/private", [*caller, ("apikey", KEY)])).status == 200
    await asyncio.wait_for(collector.received.wait(), 10)
    await gateway.close()  # flushes whatever is left
    assert collector.posts
    assert {content_type for content_type, _ in collector.posts} == {"application/x-protobuf"}
    assert collector.scopes == {"tollgate"}
    spans = collector.spans
    assert sorted(span.name for span in spans) == ["GET", "GET /private", "policies"]
    assert {span.trace_id.hex() for span in spans} == {TRACE_ID}


async def test_spans_are_exported_over_otlp_grpc(
    start: Starter, upstream: RecordingUpstream
) -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, message: Any, context: Any) -> Any:
            received.append(message)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing = {**TRACED, "exporter": "otlp-grpc", "endpoint": f"http://127.0.0.1:{port}"}
        gateway = await start(_config(upstream.url, tracing))
        assert (await _get(gateway, "/items")).status == 200
        await gateway.close()
    finally:
        server.stop(None)
    names = [
        span.name
        for message in received
        for resource_spans in message.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert sorted(names) == ["GET", "GET /items"]


async def test_exporter_none_propagates_without_exporting(
    start: Starter, upstream: RecordingUpstream
) -> None:
    gateway = await start(_config(upstream.url, {**TRACED, "exporter": "none"}))
    assert gateway.tracing is not None and not gateway.tracing.recording
    assert (await _get(gateway, "/items")).status == 200
    (traceparent,) = _traceparents(upstream.requests[0])
    assert parse_traceparent(traceparent.encode()) is not None
    assert gateway.tracing.spans_built == 0
