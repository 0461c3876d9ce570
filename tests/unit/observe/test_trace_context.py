"""The request path's side of tracing: W3C `traceparent` parsing, sampling decisions (the same
as the SDK's sampler), and the trace context `begin` and `attempt` give an exchange."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    set_span_in_context,
)

from tollgate.config.schema import TracingSettings
from tollgate.http.exchange import Exchange
from tollgate.observe.tracing import (
    DEFAULT_HTTP_ENDPOINT,
    TraceContext,
    Tracing,
    format_traceparent,
    make_exporter,
    parse_traceparent,
    sampled_by_ratio,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True)),  # other flags: sampled is bit 0
        (f"00-{TRACE}-{PARENT}-02", (TRACE, PARENT, False)),
        (f" 00-{TRACE}-{PARENT}-01\t", (TRACE, PARENT, True)),  # optional whitespace
        (f"01-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),  # a higher version
        (f"cc-{TRACE}-{PARENT}-01-what-comes-next", (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-01-", None),  # version 00 has nothing after the flags
        (f"00-{TRACE}-{PARENT}-01x", None),
        (f"cc-{TRACE}-{PARENT}-01x", None),  # a higher version's next field follows a dash
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        (f"0-{TRACE}-{PARENT}-01", None),
        (f"00-{TRACE}0-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}0-01", None),
        (f"00-{TRACE}-{PARENT}-1", None),
        (f"00_{TRACE}_{PARENT}_01", None),
        ("", None),
    ],
)
def test_parse_traceparent(value: str, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(value.encode()) == expected


def test_format_traceparent_round_trips() -> None:
    value = format_traceparent(TRACE, PARENT, True)
    assert value == f"00-{TRACE}-{PARENT}-01"
    assert parse_traceparent(value.encode()) == (TRACE, PARENT, True)
    assert format_traceparent(TRACE, PARENT, False).endswith("-00")


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.25, 0.5, 0.9, 1.0])
def test_ratio_sampling_decides_as_the_sdk_sampler(ratio: float) -> None:
    sampler = TraceIdRatioBased(ratio)
    rng = random.Random(7)
    for _ in range(2000):
        trace_id = rng.getrandbits(128) or 1
        expected = sampler.should_sample(None, trace_id, "x").decision is Decision.RECORD_AND_SAMPLE
        assert sampled_by_ratio(trace_id, sampler.bound) is expected


def _exchange(**headers: str) -> Exchange:
    ex = Exchange()
    for name, value in headers.items():
        lname = name.replace("_", "-").encode()
        ex.headers.append((lname, lname, value.encode()))
        ex.header_map.setdefault(lname, value.encode())
    return ex


def _tracing(**settings: Any) -> Tracing:
    return Tracing(
        TracingSettings.model_validate({"enabled": True, **settings}),
        exporter=InMemorySpanExporter(),
    )


def _context(ex: Exchange) -> TraceContext:
    assert ex.trace is not None
    return ex.trace


def test_begin_continues_a_valid_traceparent_and_keeps_tracestate() -> None:
    ex = _exchange(traceparent=f"00-{TRACE}-{PARENT}-01", tracestate="a=b")
    _tracing(sampling_ratio=0).begin(ex)
    context = _context(ex)
    assert (context.trace_id, context.parent_id, context.sampled) == (TRACE, PARENT, True)
    assert 0 < context.span_id < 1 << 64 and context.span_id != int(PARENT, 16)
    assert context.started > 0
    assert ex.upstream_remove == {b"traceparent"}  # replaced per attempt; tracestate goes on


def test_begin_starts_a_new_trace_and_drops_an_orphan_tracestate() -> None:
    ex = _exchange(traceparent="junk", tracestate="a=b")
    _tracing().begin(ex)
    context = _context(ex)
    assert len(context.trace_id) == 32 and context.parent_id == "" and context.sampled
    assert ex.upstream_remove == {b"traceparent", b"tracestate"}
    plain = _exchange()
    _tracing(sampling_ratio=0).begin(plain)
    assert _context(plain).trace_id and not _context(plain).sampled
    assert plain.upstream_remove is None


def test_new_traces_follow_parent_based_ratio_sampling() -> None:
    tracing = _tracing(sampling_ratio=0.5)
    sampler = ParentBased(TraceIdRatioBased(0.5))
    decisions = []
    for _ in range(400):
        ex = _exchange()
        tracing.begin(ex)
        context = _context(ex)
        expected = sampler.should_sample(None, int(context.trace_id, 16), "x").decision
        assert context.sampled is (expected is Decision.RECORD_AND_SAMPLE)
        decisions.append(context.sampled)
    assert 100 < sum(decisions) < 300
    # With a parent, the SDK's sampler follows its flag, as `begin` does.
    for flags in ("00", "01"):
        ex = _exchange(traceparent=f"00-{TRACE}-{PARENT}-{flags}")
        tracing.begin(ex)
        parent = SpanContext(int(TRACE, 16), int(PARENT, 16), True, TraceFlags(int(flags, 16)))
        context = set_span_in_context(NonRecordingSpan(parent), Context())
        expected = sampler.should_sample(context, int(TRACE, 16), "x").decision
        assert _context(ex).sampled is (expected is Decision.RECORD_AND_SAMPLE)


def test_each_attempt_gets_a_span_and_a_traceparent_line() -> None:
    tracing = _tracing()
    ex = _exchange()
    tracing.begin(ex)
    target: Any = object()
    tracing.attempt(ex, target)
    context = _context(ex)
    first = context.header
    tracing.attempt_failed(ex, "upstream_connect_error")
    tracing.attempt(ex, target)
    assert context.attempts is not None and len(context.attempts) == 2
    (span_a, _, _, error_a), (span_b, _, _, error_b) = context.attempts
    assert (error_a, error_b) == ("upstream_connect_error", "")
    assert first == f"traceparent: 00-{context.trace_id}-{span_a:016x}-01\r\n".encode()
    assert context.header == f"traceparent: 00-{context.trace_id}-{span_b:016x}-01\r\n".encode()
    assert span_a != span_b != context.span_id


def test_unsampled_and_unexported_calls_keep_no_attempts() -> None:
    for tracing in (_tracing(sampling_ratio=0), Tracing(TracingSettings(exporter="none"))):
        ex = _exchange()
        tracing.begin(ex)
        tracing.attempt(ex, object())  # type: ignore[arg-type]
        context = _context(ex)
        assert context.header.startswith(b"traceparent: 00-") and context.attempts is None


def test_settings_are_validated() -> None:
    assert TracingSettings().enabled is False
    for bad in (
        {"sampling_ratio": 1.5},
        {"sampling_ratio": -0.1},
        {"exporter": "zipkin"},
        {"endpoint": "collector:4318"},
        {"batch_size": 100, "queue": 10},
        {"service_name": ""},
    ):
        with pytest.raises(ValueError):
            TracingSettings.model_validate(bad)


def test_exporters_and_their_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert make_exporter(TracingSettings(exporter="none")) is None
    http = make_exporter(TracingSettings())
    assert isinstance(http, OTLPSpanExporter)
    assert http._endpoint == DEFAULT_HTTP_ENDPOINT
    http.shutdown()
    grpc = make_exporter(TracingSettings(exporter="otlp-grpc", endpoint="http://10.0.0.1:4317"))
    assert isinstance(grpc, GrpcSpanExporter)
    assert grpc._endpoint == "10.0.0.1:4317" and grpc._insecure
    grpc.shutdown()
    # Without an endpoint in the config, the standard variable wins over the default.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://otel.internal:4318/v1/traces")
    http = make_exporter(TracingSettings())
    assert isinstance(http, OTLPSpanExporter)
    assert http._endpoint == "http://otel.internal:4318/v1/traces"
    http.shutdown()
