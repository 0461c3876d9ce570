"""Analytics over 30 days: how long does P99 (and the rest of a report) take from rollups?

    python bench/analytics_query.py [--calls N] [--days D] [--db FILE] [--seed S]

Builds, in a SQLite file, the day rollups of N calls (10,000,000 by default) spread over D
days (30), then times `query_analytics` over the whole range: unfiltered (route level), for
one service, and for one consumer; each first on a fresh connection, then the median of
`--repeat` runs.

How the calls are made up. 5 services with 5 routes each; 400 consumers with Zipf(1.1)
traffic shares, each calling 3 routes; a diurnal cycle (peak to trough 3:1) and a weekly one
(weekends at 60%). Each route has its own latency: lognormal around a median between 8 and
250 ms for 85% of calls, a slow mode at 8x the median for 14%, a Pareto tail capped at 60 s
for 1%. Status classes: 2xx 93%, 4xx 5% (answered by the gateway in ~1 ms), 5xx 2%.

The rollups are generated directly, not by pushing 10M records through the writer: for
each (day, route, consumer, status class) cell, its number of calls n is drawn from the
traffic shares, and its sketches get n calls as up to `--samples` (128) distinct latencies
drawn from the route's distribution, with counts adding up to n. Route-level rows are the
merge of their consumer-level cells (all status classes), as the writer builds them. What a
query costs depends on the number of rows it reads and on the width of their sketches,
which this reproduces; not on how the values were drawn.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tollgate.observe.database import SqliteDatabase
from tollgate.observe.query import query_analytics
from tollgate.observe.rollups import (
    DAY,
    RollupRow,
    encode_sketch,
    ensure_rollup_schema,
    merge_rows,
)
from tollgate.observe.sketch import LatencySketch

T0 = 1_764_547_200  # 2025-12-01T00:00:00Z
TIMEOUT_MS = 60_000.0
CLASSES = ((2, 0.93), (4, 0.05), (5, 0.02))


def zipf_shares(count: int, exponent: float) -> list[float]:
    weights = [1.0 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(weights)
    return [weight / total for weight in weights]


def day_weights(days: int) -> list[float]:
    weights = [0.6 if (T0 // DAY + day + 3) % 7 in (5, 6) else 1.0 for day in range(days)]
    total = sum(weights)
    return [weight / total for weight in weights]


def latency_drawer(rng: random.Random, median_ms: float) -> Callable[[], float]:
    mu = math.log(median_ms)

    def draw() -> float:
        pick = rng.random()
        if pick < 0.85:
            return rng.lognormvariate(mu, 0.5)
        if pick < 0.99:
            return rng.lognormvariate(mu + math.log(8.0), 0.6)
        return min(TIMEOUT_MS, median_ms * 20 * rng.paretovariate(1.5))

    return draw


def cell_sketches(
    rng: random.Random, calls: int, klass: int, draw: Callable[[], float], samples: int
) -> tuple[bytes, bytes, bytes]:
    total, gateway, upstream = LatencySketch(), LatencySketch(), LatencySketch()
    distinct = min(calls, samples)
    base, extra = divmod(calls, distinct)
    for index in range(distinct):
        weight = base + (1 if index < extra else 0)
        gateway_ms = rng.lognormvariate(math.log(0.4), 0.4)
        if klass == 4:  # answered by the gateway: no upstream
            total.add(gateway_ms * 2.5, weight)
            gateway.add(gateway_ms * 2.5, weight)
            continue
        upstream_ms = draw()
        total.add(upstream_ms + gateway_ms, weight)
        gateway.add(gateway_ms, weight)
        upstream.add(upstream_ms, weight)
    return encode_sketch(total), encode_sketch(gateway), encode_sketch(upstream)


def generate(database: SqliteDatabase, calls: int, days: int, samples: int, seed: int) -> int:
    rng = random.Random(seed)
    routes = [(f"svc-{s}", f"route-{s}-{r}") for s in range(5) for r in range(5)]
    medians = {route: math.exp(rng.uniform(math.log(8), math.log(250))) for route in routes}
    draws = {route: latency_drawer(rng, medians[route]) for route in routes}
    consumers = [f"consumer-{n:03d}" for n in range(400)]
    shares = zipf_shares(len(consumers), 1.1)
    route_shares = zipf_shares(len(routes), 0.8)
    plans: list[tuple[str, tuple[str, str], float]] = []
    for consumer, share in zip(consumers, shares, strict=True):
        chosen = rng.sample(range(len(routes)), 3)
        weights = [route_shares[index] for index in chosen]
        for index, weight in zip(chosen, weights, strict=True):
            plans.append((consumer, routes[index], share * weight / sum(weights)))
    connection = database.connect()
    ensure_rollup_schema(database, connection)
    rows = 0
    made = 0
    for day, day_share in enumerate(day_weights(days)):
        bucket = T0 + day * DAY
        consumer_rows: dict[Any, RollupRow] = {}
        route_rows: dict[Any, RollupRow] = {}
        for consumer, (service, route), share in plans:
            expected = calls * day_share * share
            for klass, class_share in CLASSES:
                # Poisson-ish: the expected count, rounded at random so that totals add up.
                mean = expected * class_share
                count = int(mean) + (1 if rng.random() < mean - int(mean) else 0)
                if count == 0:
                    continue
                made += count
                blobs = cell_sketches(rng, count, klass, draws[service, route], samples)
                errors = (count if klass == 4 else 0, count if klass == 5 else 0)
                bytes_in, bytes_out = count * 220, count * 1_800
                row = RollupRow()
                row.add_row(count, *errors, bytes_in, bytes_out, blobs)
                consumer_rows[bucket, service, route, consumer, klass] = row
                key = (bucket, service, route, "", 0)  # the route level folds classes
                if key not in route_rows:
                    route_rows[key] = RollupRow()
                route_rows[key].add_row(count, *errors, bytes_in, bytes_out, blobs)
        with database.transaction(connection) as cursor:
            merge_rows(database, cursor, "consumer", DAY, consumer_rows)
            merge_rows(database, cursor, "route", DAY, route_rows)
        rows += len(consumer_rows) + len(route_rows)
        print(
            f"  day {day + 1:2d}/{days}: {len(consumer_rows)} consumer rows, "
            f"{len(route_rows)} route rows",
            flush=True,
        )
    connection.close()
    print(f"generated {made:,} calls in {rows:,} day rows")
    return made


def timed(label: str, database: SqliteDatabase, repeat: int, **filters: Any) -> None:
    start, end = T0, T0 + ARGS.days * DAY

    def once(connection: Any | None) -> tuple[float, Any]:
        began = time.perf_counter()
        report = query_analytics(database, start, end, connection=connection, **filters)
        return (time.perf_counter() - began) * 1000, report

    first, report = once(None)  # opens its own connection
    connection = database.connect()
    runs = [once(connection)[0] for _ in range(repeat)]
    connection.close()
    p = report.percentiles
    print(
        f"{label:<28} first {first:7.1f} ms   median {statistics.median(runs):7.1f} ms   "
        f"calls {report.count:>11,}   p50 {p['p50']:.1f}  p90 {p['p90']:.1f}  "
        f"p95 {p['p95']:.1f}  p99 {p['p99']:.1f} ms   "
        f"5xx {report.error_rate_5xx:.2%}   {len(report.series)} points"
    )


def main() -> None:
    workdir = None
    path = ARGS.db
    if path is None:
        workdir = tempfile.mkdtemp(prefix="tollgate-analytics-")
        path = os.path.join(workdir, "rollups.db")
    database = SqliteDatabase(path)
    if not os.path.exists(path) or os.path.getsize(path) == 0 or ARGS.db is None:
        began = time.perf_counter()
        generate(database, ARGS.calls, ARGS.days, ARGS.samples, ARGS.seed)
        print(
            f"generation took {time.perf_counter() - began:.0f} s; "
            f"file {os.path.getsize(path) / 1e6:.0f} MB"
        )
    timed("all calls (route level)", database, ARGS.repeat)
    timed("one service", database, ARGS.repeat, service="svc-2")
    timed("one consumer (busiest)", database, ARGS.repeat, consumer="consumer-000")
    timed("one consumer (a quiet one)", database, ARGS.repeat, consumer="consumer-321")
    timed("gateway latency, all", database, ARGS.repeat, latency="gateway")
    if workdir is not None:
        for name in os.listdir(workdir):
            os.remove(os.path.join(workdir, name))
        os.rmdir(workdir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", help="keep the rollups in this file (reused if it exists)")
    ARGS = parser.parse_args()
    main()
