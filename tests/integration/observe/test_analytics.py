from __future__ import annotations

import math
from typing import Any

import pytest
from call_records import T0, generate_records, make_record

from tollgate.clock import FakeClock
from tollgate.observe import rollups
from tollgate.observe.database import Database
from tollgate.observe.query import PERCENTILES, choose_step, cover, query_analytics
from tollgate.observe.records import CallRecord
from tollgate.observe.rollups import (
    DAY,
    HOUR,
    MINUTE,
    RollupAggregator,
    RollupSink,
    decode_sketch,
    ensure_rollup_schema,
    merge_minutes,
    prune_rollups,
)
from tollgate.observe.sketch import LatencySketch


def load(database: Database, records: list[CallRecord], flushes: int = 3) -> None:
    """Merge `records` in `flushes` parts, as a writer flushing every few seconds would."""
    connection = database.connect()
    try:
        ensure_rollup_schema(database, connection)
        size = -(-len(records) // flushes)
        for start in range(0, len(records), size):
            aggregator = RollupAggregator()
            aggregator.add_batch(records[start : start + size])
            merge_minutes(database, connection, aggregator.take())
    finally:
        connection.close()


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def fetch(database: Database, sql: str) -> list[Any]:
    connection = database.connect()
    try:
        cursor = connection.cursor()
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        connection.close()


def test_percentiles_from_rollups_are_within_1_percent_of_exact(database: Database) -> None:
    count = 200_000 if database.kind == "sqlite" else 40_000
    records = generate_records(count, start=T0, seconds=3 * HOUR, seed=21)
    load(database, records)
    report = query_analytics(database, T0, T0 + 3 * HOUR, step=HOUR)
    assert report.count == count
    totals = [record.total_ms for record in records]
    for name, q in PERCENTILES.items():
        got = report.percentiles[name]
        assert got is not None
        assert got == pytest.approx(exact(totals, q), rel=0.01), name
    upstream = query_analytics(database, T0, T0 + 3 * HOUR, latency="upstream")
    waits = [r.upstream_ms for r in records if r.upstream_ms is not None]
    assert upstream.percentiles["p99"] == pytest.approx(exact(waits, 0.99), rel=0.01)


def test_hour_rows_equal_the_sketch_of_their_records(database: Database) -> None:
    records = generate_records(6_000, start=T0, seconds=2 * HOUR, seed=8)
    load(database, records, flushes=4)
    direct: dict[tuple[int, str, str, str, int], LatencySketch] = {}
    for record in records:
        key = (
            int(record.time // HOUR) * HOUR,
            record.service or "",
            record.route or "",
            record.consumer or "",
            record.status // 100,
        )
        direct.setdefault(key, LatencySketch()).add(record.total_ms)
    stored = fetch(
        database,
        "SELECT bucket, service, route, consumer, status_class, count, total_sketch "
        "FROM rollup_consumer_hour",
    )
    assert len(stored) == len(direct)
    for bucket, service, route, consumer, klass, count, blob in stored:
        expected = direct[bucket, service, route, consumer, klass]
        sketch = decode_sketch(bytes(blob))
        assert count == expected.count
        got, want = sketch.to_dict(), expected.to_dict()
        assert got.pop("sum") == pytest.approx(want.pop("sum"), rel=1e-9)
        assert got == want
    for table in ("consumer_minute", "consumer_day", "route_minute", "route_hour"):
        assert int(fetch(database, f"SELECT SUM(count) FROM rollup_{table}")[0][0]) == 6_000
    route_hours = fetch(database, "SELECT bucket, service, route FROM rollup_route_hour")
    assert len(route_hours) == len({key[:3] for key in direct})


def test_filters_counts_error_rates_and_top_lists(database: Database) -> None:
    records = generate_records(8_000, start=T0, seconds=DAY, seed=9)
    load(database, records)

    def expected(**filters: str | None) -> list[CallRecord]:
        return [r for r in records if all(getattr(r, k) == v for k, v in filters.items())]

    whole = query_analytics(database, T0, T0 + DAY)
    assert whole.step == HOUR and len(whole.series) == 24
    assert whole.count == 8_000 == sum(point.count for point in whole.series)
    assert whole.errors_4xx == sum(1 for r in records if 400 <= r.status < 500)
    assert whole.errors_5xx == sum(1 for r in records if r.status >= 500)
    assert whole.error_rate_5xx == pytest.approx(whole.errors_5xx / 8_000)
    assert whole.throughput == pytest.approx(8_000 / DAY)
    assert whole.bytes_out == sum(r.bytes_out for r in records)
    by_consumer: dict[str | None, int] = {}
    for record in records:
        by_consumer[record.consumer] = by_consumer.get(record.consumer, 0) + 1
    assert dict(whole.top_consumers) == by_consumer
    assert sum(n for _s, _r, n in whole.top_routes) == 8_000

    for filters in (
        {"service": "llm"},
        {"service": "orders-api", "route": "get-order"},
        {"consumer": "globex"},
        {"consumer": ""},
        {"route": "list-orders", "consumer": "acme"},
    ):
        report = query_analytics(database, T0, T0 + DAY, **filters)  # type: ignore[arg-type]
        wanted = expected(**{k: (v or None) for k, v in filters.items()})
        assert report.count == len(wanted), filters
        assert report.errors_4xx == sum(1 for r in wanted if 400 <= r.status < 500)
        assert report.percentiles["p50"] == pytest.approx(
            exact([r.total_ms for r in wanted], 0.5), rel=0.01
        )
    only = query_analytics(database, T0, T0 + DAY, consumer="globex", top=2)
    assert [name for name, _n in only.top_consumers] == ["globex"]
    assert len(only.top_routes) == 2


def test_a_ragged_range_counts_exactly_the_calls_in_it(database: Database) -> None:
    records = generate_records(5_000, start=T0, seconds=3 * DAY, seed=10)
    load(database, records)
    start, end = T0 + 5 * HOUR + 7 * MINUTE, T0 + 2 * DAY + 3 * HOUR + 11 * MINUTE
    report = query_analytics(database, start, end, step=DAY)
    assert report.count == sum(1 for r in records if start <= r.time < end)
    assert [point.start for point in report.series] == [
        int(start),
        int(T0 + DAY),
        int(T0 + 2 * DAY),
    ]
    assert report.series[0].count == sum(1 for r in records if start <= r.time < T0 + DAY)


def test_an_empty_range_has_no_percentiles(database: Database) -> None:
    report = query_analytics(database, T0, T0 + HOUR)
    assert report.count == 0 and report.percentiles == dict.fromkeys(PERCENTILES)
    assert report.top_consumers == [] and report.error_rate_4xx == 0.0
    assert report.to_dict()["series"][0]["p99"] is None
    with pytest.raises(ValueError):
        query_analytics(database, T0, T0 + HOUR, latency="nope")
    with pytest.raises(ValueError):
        query_analytics(database, T0 + HOUR, T0)


def test_rollup_retention_keeps_coarse_rows_longer(database: Database) -> None:
    load(database, [make_record(0, time=T0), make_record(1, time=T0 + 20 * DAY)], flushes=1)
    deleted = prune_rollups(database, T0 + 21 * DAY, minute_days=7, hour_days=90)
    assert deleted == 2  # the old minute row at both levels
    assert fetch(database, "SELECT COUNT(*) FROM rollup_route_minute")[0][0] == 1
    assert fetch(database, "SELECT COUNT(*) FROM rollup_route_hour")[0][0] == 2


def test_the_sink_merges_on_its_interval_and_keeps_aggregates_when_a_merge_fails(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    sink = RollupSink(database, flush_interval=10.0, clock=clock)
    sink.write([make_record(0), make_record(1)])
    sink.flush()
    assert query_analytics(database, T0, T0 + HOUR).count == 0  # not due yet
    clock.advance(10.0)
    real_merge = rollups.merge_minutes
    calls = 0

    def failing_once(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database went away")
        real_merge(*args)

    monkeypatch.setattr(rollups, "merge_minutes", failing_once)
    with pytest.raises(OSError):
        sink.flush()
    sink.write([make_record(2)])
    clock.advance(10.0)
    sink.flush()
    assert query_analytics(database, T0, T0 + HOUR).count == 3
    sink.write([make_record(3)])
    sink.close()  # merges what is left
    assert query_analytics(database, T0, T0 + HOUR).count == 4


def test_step_choice_and_cover() -> None:
    assert choose_step(6 * HOUR) == MINUTE
    assert choose_step(7 * DAY) == HOUR
    assert choose_step(30 * DAY) == DAY
    start = int(T0) + 5 * HOUR + 7 * MINUTE
    end = int(T0) + 2 * DAY + 3 * HOUR + 11 * MINUTE
    spans = cover(start, end, DAY)
    assert spans == [
        (MINUTE, start, int(T0) + 6 * HOUR),
        (HOUR, int(T0) + 6 * HOUR, int(T0) + DAY),
        (DAY, int(T0) + DAY, int(T0) + 2 * DAY),
        (HOUR, int(T0) + 2 * DAY, int(T0) + 2 * DAY + 3 * HOUR),
        (MINUTE, int(T0) + 2 * DAY + 3 * HOUR, end),
    ]
    assert cover(int(T0), int(T0) + 30 * DAY, DAY) == [(DAY, int(T0), int(T0) + 30 * DAY)]
    assert cover(start, end, MINUTE) == [(MINUTE, start, end)]
