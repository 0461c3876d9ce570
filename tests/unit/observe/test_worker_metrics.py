"""Worker metrics: counted per exchange, merged across workers, rendered by prometheus_client."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tollgate.config.loader import parse_config_data
from tollgate.http.exchange import Exchange
from tollgate.observe import metrics as metrics_module
from tollgate.observe.metrics import DURATION_BUCKETS, WorkerMetrics, merge_snapshots, render
from tollgate.runtime.runtime import PoolRegistry, compile_config


def _route() -> Any:
    config = parse_config_data(
        {
            "upstreams": [{"name": "backend", "targets": [{"url": "http://127.0.0.1:9"}]}],
            "services": [{"name": "api", "upstream": "backend", "routes": [{"name": "main"}]}],
        }
    )
    [route] = compile_config(config, PoolRegistry()).routes
    return route


ROUTE = _route()


def exchange(
    status: int,
    *,
    source: str = "upstream",
    total: float = 0.02,
    upstream: float | None = 0.015,
    error: str = "",
    routed: bool = True,
    body: int = 10,
    out: int = 100,
) -> Exchange:
    start = 1000.0
    ex = Exchange()
    ex.route = ROUTE if routed else None
    ex.status = status
    ex.source = source
    ex.error_type = error
    ex.t_start = start
    ex.t_end = start + total
    ex.t_upstream_start = 0.0 if upstream is None else start + total - upstream
    ex.body_bytes = body
    ex.bytes_out = out
    return ex


def families(text: bytes) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family: Any, **labels: str) -> list[Any]:
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def test_counts_and_histograms_of_two_workers_add_up() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    for _ in range(3):
        first.observe(exchange(200))
    first.observe(exchange(401, source="gateway", upstream=None, error="unauthorized"))
    second.observe(exchange(200, total=2.0, upstream=1.5))
    second.observe(exchange(502, source="gateway", error="upstream_unavailable"))
    second.observe(exchange(404, source="gateway", upstream=None, routed=False))

    merged = merge_snapshots([first.snapshot(), second.snapshot()])
    parsed = families(render(merged, {"worker_restarts": 1, "config_reloads": 2}, "9.9"))

    requests = parsed["tollgate_http_requests"]

    def count(**labels: str) -> float:
        [sample] = [s for s in samples(requests, **labels) if s.name.endswith("_total")]
        return float(sample.value)

    assert count(service="api", route="main", code="200", source="upstream") == 4
    assert count(service="api", route="main", code="401", source="gateway") == 1
    assert count(service="api", route="main", code="502", source="gateway") == 1
    assert count(service="", route="", code="404", source="gateway") == 1
    errors = {
        s.labels["type"]: s.value
        for s in parsed["tollgate_gateway_errors"].samples
        if s.name.endswith("_total")
    }
    assert errors == {"unauthorized": 1.0, "upstream_unavailable": 1.0}

    duration = parsed["tollgate_request_duration_seconds"]
    buckets = {
        s.labels["le"]: s.value
        for s in samples(duration, service="api", route="main")
        if s.name.endswith("_bucket")
    }
    assert buckets["+Inf"] == 6
    assert buckets["0.025"] == 5  # every 20 ms call; the 2 s one is above
    assert buckets["2.5"] == 6
    [total] = [s for s in samples(duration, route="main") if s.name.endswith("_sum")]
    assert abs(total.value - (5 * 0.02 + 2.0)) < 1e-9
    upstream = parsed["tollgate_upstream_duration_seconds"]
    [upstream_count] = [s for s in samples(upstream, route="main") if s.name.endswith("_count")]
    assert upstream_count.value == 5  # the 401 never went upstream
    gateway = parsed["tollgate_gateway_duration_seconds"]
    [gateway_sum] = [s for s in samples(gateway, route="main") if s.name.endswith("_sum")]
    assert abs(gateway_sum.value - (4 * 0.005 + 0.02 + 0.5)) < 1e-9
    assert parsed["tollgate_worker_restarts"].samples[0].value == 1
    assert parsed["tollgate_config_reloads"].samples[0].value == 2
    [info] = parsed["tollgate_build_info"].samples
    assert info.labels["version"] == "9.9"


def test_a_value_on_a_bound_lands_in_that_bucket() -> None:
    metrics = WorkerMetrics()
    bound = DURATION_BUCKETS[3]
    metrics.observe(exchange(200, total=bound, upstream=None))
    [_, _, data] = metrics.snapshot()["routes"][0]
    counts = data["request_duration"][:-1]
    assert counts[3] == 1
    assert sum(counts) == 1


def test_gauges_and_policy_counters_are_summed_over_workers() -> None:
    merged = merge_snapshots(
        [
            {
                "gauges": {"open_connections": 3, "log_records_dropped": 1},
                "policies": {"api/main": {"rejections": 2}},
            },
            {
                "gauges": {"open_connections": 4},
                "policies": {"api/main": {"rejections": 5, "store_fallbacks": 1}},
            },
        ]
    )
    parsed = families(render(merged, {}, "1"))
    assert parsed["tollgate_open_connections"].samples[0].value == 7
    assert parsed["tollgate_log_records_dropped"].samples[0].value == 1
    rejections = parsed["tollgate_rate_limit_rejections"]
    [sample] = [s for s in rejections.samples if s.name.endswith("_total")]
    assert (sample.labels["policy"], sample.value) == ("api/main", 7)


def test_consumer_labels_are_opt_in() -> None:
    from tollgate.runtime.context import ConsumerEntry

    acme = ConsumerEntry(name="acme", id="acme", plan=None, tags=(), upstream_headers=())
    plain, labelled = WorkerMetrics(), WorkerMetrics(consumer_labels=True)
    for metrics in (plain, labelled):
        known = exchange(200)
        known.consumer = acme
        metrics.observe(known)
        metrics.observe(exchange(401, source="gateway", upstream=None))
    assert "tollgate_consumer_requests" not in families(
        render(merge_snapshots([plain.snapshot()]), {}, "1")
    )
    parsed = families(render(merge_snapshots([labelled.snapshot()] * 2), {}, "1"))
    counts = {
        (s.labels["consumer"], s.labels["code"]): s.value
        for s in parsed["tollgate_consumer_requests"].samples
        if s.name.endswith("_total")
    }
    assert counts == {("acme", "200"): 2, ("", "401"): 2}


# The C histograms (observe/_durations.c) against the Python reference, call for call.
durations = st.floats(allow_nan=False, allow_infinity=True, min_value=0.0)
upstreams = st.one_of(st.just(-1.0), durations)


def require_compiled_histograms() -> None:
    # The tests run on the compiled build (the README's command): a missing extension fails.
    if metrics_module.DURATIONS is metrics_module.Durations:
        pytest.fail("the compiled histograms (tollgate.observe._durations) are not built")


@settings(max_examples=200)
@given(
    calls=st.lists(
        st.tuples(
            st.one_of(durations, st.sampled_from([*DURATION_BUCKETS, 0.0, 1e-9, 120.0])),
            st.one_of(upstreams, st.sampled_from([*DURATION_BUCKETS, 0.0])),
        ),
        max_size=60,
    )
)
def test_the_compiled_histograms_count_as_the_python_ones(
    calls: list[tuple[float, float]],
) -> None:
    require_compiled_histograms()
    compiled = metrics_module.DURATIONS(DURATION_BUCKETS)
    reference = metrics_module.Durations(DURATION_BUCKETS)
    for total, upstream in calls:
        compiled.observe(total, upstream)
        reference.observe(total, upstream)
    assert compiled.lists() == reference.lists()


def test_the_compiled_histograms_refuse_bounds_they_cannot_hold() -> None:
    require_compiled_histograms()
    with pytest.raises(ValueError, match="ascend"):
        metrics_module.DURATIONS((0.1, 0.1))
    with pytest.raises(ValueError, match="at most 32"):
        metrics_module.DURATIONS(tuple(float(n) for n in range(33)))
