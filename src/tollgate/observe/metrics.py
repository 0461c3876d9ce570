"""Prometheus metrics: counted per worker on the request path, merged by the supervisor.

Workers are separate processes, and `GET /metrics` is served by the supervisor's admin API,
so every series is the sum over the node's workers. prometheus_client's multi-process mode
would give that, but it writes every increment to a memory-mapped file through a lock and a
struct pack (several microseconds per request for a handful of series); here each worker keeps
plain counters and bucket arrays in memory, compiled with the rest of the request path
(`observe` is a dict lookup, a bisection per histogram and a few additions), and hands a
snapshot to the supervisor when it scrapes. The supervisor sums the snapshots and renders them
with prometheus_client's own exposition (`MergedCollector`), so the format is the library's.

A worker that dies loses what it counted since the last scrape; what it had counted until
then stays in the totals (the supervisor keeps a retired worker's last snapshot), so counters
never go backwards.

Names (base units, `tollgate_` prefix, DESIGN §4):

    tollgate_http_requests_total{service,route,code,source}
    tollgate_request_duration_seconds{service,route}     histogram, client's view
    tollgate_gateway_duration_seconds{service,route}     histogram, total minus upstream
    tollgate_upstream_duration_seconds{service,route}    histogram, proxied calls only
    tollgate_request_bytes_total / tollgate_response_bytes_total{service,route}
    tollgate_gateway_errors_total{service,route,type}    every error the gateway answered or
                                                         met (unauthorized, rate_limited,
                                                         upstream_unavailable, upstream_timeout,
                                                         client_disconnected...)
    tollgate_rate_limit_rejections_total{policy}, tollgate_rate_limit_store_fallbacks_total,
    tollgate_rate_limit_store_denials_total{policy}
    tollgate_open_connections, tollgate_in_flight_requests, tollgate_log_queue_depth,
    tollgate_log_records_dropped_total, tollgate_log_records_written_total,
    tollgate_worker_restarts_total, tollgate_config_reloads_total, tollgate_workers,
    tollgate_build_info{version,python}
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

# Seconds. Prometheus' `le` bounds: a value lands in the first bucket whose bound is >= it.
# Not `Final`: compiled, a Final tuple of floats is inlined where it is iterated and reads as
# "not set" (NameError) where it is passed on as an object.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """Counts per bucket (the last one is +Inf, not cumulative) and the sum of the values."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A scan from the smallest bound, not `bisect`: compiled, it is a few native float
        # comparisons (most calls end in the first buckets), where a call into the bisect
        # module costs a microsecond per histogram.
        index = 0
        for bound in DURATION_BUCKETS:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.sum += value

    def to_list(self) -> list[Any]:
        return [*self.counts, self.sum]


class Durations:
    """The request, gateway and upstream duration histograms of one route.

    The reference of `tollgate.observe._durations.Durations`, which counts the same in C (no
    Python object per call) and replaces it when the build has it.
    """

    __slots__ = ("gateway", "request", "upstream")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert bounds == DURATION_BUCKETS
        self.request = Histogram()
        self.gateway = Histogram()
        self.upstream = Histogram()

    def observe(self, total: float, upstream: float) -> None:
        """One call's seconds; `upstream` < 0 when it had no upstream."""
        self.request.observe(total)
        if upstream >= 0:
            self.upstream.observe(upstream)
            self.gateway.observe(total - upstream if total > upstream else 0.0)
        else:
            self.gateway.observe(total)

    def lists(self) -> tuple[list[Any], list[Any], list[Any]]:
        return self.request.to_list(), self.gateway.to_list(), self.upstream.to_list()


try:
    from tollgate.observe._durations import (  # type: ignore[import-not-found,unused-ignore]
        Durations as _CompiledDurations,
    )
except ImportError:  # a build without a compiler: the Python class
    _CompiledDurations = None
# What `RouteMetrics` counts durations with: the C type if built, else `Durations`.
DURATIONS: Final[Any] = Durations if _CompiledDurations is None else _CompiledDurations


class RouteMetrics:
    """What one route (service, route) counted in one worker."""

    __slots__ = ("bytes_in", "bytes_out", "durations", "errors", "requests")

    def __init__(self) -> None:
        self.requests: dict[tuple[int, str], int] = {}
        self.errors: dict[str, int] = {}
        self.durations: Any = DURATIONS(DURATION_BUCKETS)
        self.bytes_in = 0
        self.bytes_out = 0

    def to_dict(self) -> dict[str, Any]:
        request, gateway, upstream = self.durations.lists()
        return {
            "requests": [[code, source, count] for (code, source), count in self.requests.items()],
            "errors": self.errors,
            "request_duration": request,
            "gateway_duration": gateway,
            "upstream_duration": upstream,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class WorkerMetrics:
    """Every series one worker counts; `observe` is called once per finished exchange."""

    __slots__ = ("consumer_labels", "consumers", "routes")

    def __init__(self, consumer_labels: bool = False) -> None:
        # (service, route) -> its metrics; an exchange no route matched counts under ("", "").
        self.routes: dict[tuple[str, str], RouteMetrics] = {}
        # Opt-in (`metrics.consumer_labels`): (service, route, consumer, status) -> requests.
        self.consumer_labels = consumer_labels
        self.consumers: dict[tuple[str, str, str, int], int] = {}

    def observe(self, ex: Exchange) -> None:
        route = ex.route
        key = ("", "") if route is None else (route.service, route.name)
        metrics = self.routes.get(key)
        if metrics is None:
            metrics = self.routes[key] = RouteMetrics()
        series = (ex.status, ex.source)
        requests = metrics.requests
        requests[series] = requests.get(series, 0) + 1
        if self.consumer_labels:
            consumer = ex.consumer
            who = (key[0], key[1], "" if consumer is None else consumer.name, ex.status)
            self.consumers[who] = self.consumers.get(who, 0) + 1
        error = ex.error_type
        if error:
            metrics.errors[error] = metrics.errors.get(error, 0) + 1
        end = ex.t_end
        total = end - ex.t_start if end > ex.t_start else 0.0
        upstream_start = ex.t_upstream_start
        upstream = end - upstream_start if upstream_start and end >= upstream_start else -1.0
        metrics.durations.observe(total, upstream)
        metrics.bytes_in += ex.body_bytes
        metrics.bytes_out += ex.bytes_out

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready data, for the supervisor to merge."""
        return {
            "routes": [
                [service, route, metrics.to_dict()]
                for (service, route), metrics in self.routes.items()
            ],
            "consumers": [[*key, count] for key, count in self.consumers.items()],
        }


# -- the supervisor's side ---------------------------------------------------------------------


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum worker snapshots (of `WorkerMetrics.snapshot` plus the worker's gauges)."""
    routes: dict[tuple[str, str], dict[str, Any]] = {}
    gauges: dict[str, float] = {}
    policies: dict[str, dict[str, float]] = {}
    consumers: dict[tuple[str, str, str, int], int] = {}
    for snapshot in snapshots:
        for service, route, consumer, status, count in snapshot.get("consumers", []):
            who = (service, route, consumer, int(status))
            consumers[who] = consumers.get(who, 0) + count
        for service, route, data in snapshot.get("routes", []):
            merged = routes.setdefault((service, route), _empty_route())
            for code, source, count in data["requests"]:
                key = (int(code), str(source))
                merged["requests"][key] = merged["requests"].get(key, 0) + count
            for error, count in data["errors"].items():
                merged["errors"][error] = merged["errors"].get(error, 0) + count
            for name in ("request_duration", "gateway_duration", "upstream_duration"):
                merged[name] = [a + b for a, b in zip(merged[name], data[name], strict=True)]
            merged["bytes_in"] += data["bytes_in"]
            merged["bytes_out"] += data["bytes_out"]
        for name, value in snapshot.get("gauges", {}).items():
            gauges[name] = gauges.get(name, 0) + value
        for policy, counts in snapshot.get("policies", {}).items():
            into = policies.setdefault(policy, {})
            for name, value in counts.items():
                into[name] = into.get(name, 0) + value
    return {"routes": routes, "gauges": gauges, "policies": policies, "consumers": consumers}


def _empty_route() -> dict[str, Any]:
    empty = [0] * (len(DURATION_BUCKETS) + 1) + [0.0]
    return {
        "requests": {},
        "errors": {},
        "request_duration": list(empty),
        "gateway_duration": list(empty),
        "upstream_duration": list(empty),
        "bytes_in": 0,
        "bytes_out": 0,
    }


class MergedCollector:
    """A prometheus_client collector over a merged snapshot and the supervisor's own counts."""

    def __init__(self, merged: Mapping[str, Any], node: Mapping[str, float], version: str) -> None:
        self.merged = merged
        self.node = node
        self.version = version

    def collect(self) -> Iterator[Any]:
        import platform

        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        routes: Mapping[tuple[str, str], Mapping[str, Any]] = self.merged["routes"]
        requests = CounterMetricFamily(
            "tollgate_http_requests",
            "Requests answered, by service, route, status code and who answered "
            "(upstream or gateway).",
            labels=["service", "route", "code", "source"],
        )
        errors = CounterMetricFamily(
            "tollgate_gateway_errors",
            "Errors the gateway answered or met, by type.",
            labels=["service", "route", "type"],
        )
        bytes_in = CounterMetricFamily(
            "tollgate_request_bytes", "Request body bytes received.", labels=["service", "route"]
        )
        bytes_out = CounterMetricFamily(
            "tollgate_response_bytes", "Response bytes sent.", labels=["service", "route"]
        )
        histograms = {
            name: HistogramMetricFamily(
                f"tollgate_{name}_seconds", help_text, labels=["service", "route"]
            )
            for name, help_text in (
                ("request_duration", "Time from the request's first byte to the response's end."),
                ("gateway_duration", "Request duration minus the time spent on the upstream."),
                (
                    "upstream_duration",
                    "Time from the first upstream attempt to the response's end.",
                ),
            )
        }
        for (service, route), data in sorted(routes.items()):
            labels = [service, route]
            for (code, source), count in sorted(data["requests"].items()):
                requests.add_metric([*labels, str(code), source], count)
            for error, count in sorted(data["errors"].items()):
                errors.add_metric([*labels, error], count)
            bytes_in.add_metric(labels, data["bytes_in"])
            bytes_out.add_metric(labels, data["bytes_out"])
            for name, family in histograms.items():
                values = data[name]
                counts, total = values[:-1], values[-1]
                buckets = []
                cumulative = 0
                for bound, count in zip(
                    [*(str(b) for b in DURATION_BUCKETS), "+Inf"], counts, strict=True
                ):
                    cumulative += count
                    buckets.append((bound, cumulative))
                if cumulative:
                    family.add_metric(labels, buckets, total)
        yield requests
        consumers: Mapping[tuple[str, str, str, int], int] = self.merged.get("consumers", {})
        if consumers:
            by_consumer = CounterMetricFamily(
                "tollgate_consumer_requests",
                "Requests answered, by consumer (metrics.consumer_labels).",
                labels=["service", "route", "consumer", "code"],
            )
            for (service, route, consumer, status), count in sorted(consumers.items()):
                by_consumer.add_metric([service, route, consumer, str(status)], count)
            yield by_consumer
        yield errors
        yield bytes_in
        yield bytes_out
        yield from histograms.values()

        policies: Mapping[str, Mapping[str, float]] = self.merged["policies"]
        for name, help_text in (
            ("rejections", "Requests a rate-limit policy refused."),
            ("store_fallbacks", "Requests decided by a worker's own store while Redis was out."),
            ("store_denials", "Requests refused because Redis could not answer (deny)."),
        ):
            policy_family = CounterMetricFamily(
                f"tollgate_rate_limit_{name}", help_text, labels=["policy"]
            )
            for policy, counts in sorted(policies.items()):
                policy_family.add_metric([policy], counts.get(name, 0))
            yield policy_family

        gauges = self.merged["gauges"]
        for name, help_text in (
            ("open_connections", "Client connections open."),
            ("in_flight_requests", "Requests received and not yet answered."),
            ("log_queue_depth", "Call records waiting for the log writer."),
        ):
            gauge = GaugeMetricFamily(f"tollgate_{name}", help_text)
            gauge.add_metric([], gauges.get(name, 0))
            yield gauge
        for name, help_text in (
            ("log_records_dropped", "Call records dropped because the log queue was full."),
            ("log_records_written", "Call records written, summed over the sinks."),
        ):
            counter = CounterMetricFamily(f"tollgate_{name}", help_text)
            counter.add_metric([], gauges.get(name, 0))
            yield counter
        for name, help_text in (
            ("worker_restarts", "Workers restarted after they exited unexpectedly."),
            ("config_reloads", "Configuration reloads applied."),
        ):
            counter = CounterMetricFamily(f"tollgate_{name}", help_text)
            counter.add_metric([], self.node.get(name, 0))
            yield counter
        workers = GaugeMetricFamily("tollgate_workers", "Worker processes running.")
        workers.add_metric([], self.node.get("workers", 0))
        yield workers
        info = GaugeMetricFamily(
            "tollgate_build_info", "Tollgate's version.", labels=["version", "python"]
        )
        info.add_metric([self.version, platform.python_version()], 1)
        yield info


def render(merged: Mapping[str, Any], node: Mapping[str, float], version: str) -> bytes:
    """The Prometheus text exposition of a merged snapshot."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(merged, node, version))
    return generate_latest(registry)
