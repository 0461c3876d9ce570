"""Reading what the sinks wrote: analytics from rollups, and a search over raw records.

Analytics (`query_analytics`) never reads raw records. For a range [start, end) (rounded out to
whole minutes) it picks a series step, minutes up to 6 hours, hours up to 7 days, days
beyond, and covers the range exactly with the coarsest rows that fit: whole days from the day
table, the ragged ends from the hour table, the last odd minutes from the minute table. A
30-day range aligned on UTC days reads only day rows; "the last 30 days" from now reads 29
days, up to 46 hours and up to 118 minutes. No row straddles a series point, so every point,
and the totals, count exactly the calls in the range. Without a consumer filter the route
level is read (a few rows per route and day); with one, the consumer level. Sketches are
merged with `SketchSum` and decoded once per point.

Search (`search_records`) pages through records newest first with a keyset cursor: in
PostgreSQL on (time, id) of `call_records`, each page one index range scan however deep the
paging goes, where an `OFFSET` would rescan every row before it; in SQLite on (time, block,
position) over blocks of records read newest first (`tollgate.observe.sinks.sqlite`). The
cursor is opaque (base64 of JSON).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson

from tollgate.observe.database import Database, SqliteDatabase
from tollgate.observe.records import COLUMNS, CallRecord, decode_json_fields
from tollgate.observe.rollups import (
    DAY,
    HOUR,
    LATENCIES,
    MINUTE,
    Level,
    SketchSum,
    ensure_rollup_schema,
    table_name,
)
from tollgate.observe.sinks.sqlite import RecordKey, StatusMatch, search_blocks

__all__ = [
    "PERCENTILES",
    "AnalyticsReport",
    "RecordPage",
    "SeriesPoint",
    "choose_step",
    "cover",
    "query_analytics",
    "search_records",
]

PERCENTILES: Final = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
# Series steps by range: at most ~360 minutes, ~168 hours, then days.
_MINUTES_UP_TO: Final = 6 * HOUR
_HOURS_UP_TO: Final = 7 * DAY
DEFAULT_TOP: Final = 10
MAX_PAGE: Final = 1_000
DEFAULT_PAGE: Final = 100


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    start: int  # Unix seconds, the start of the point's step (clipped to the range)
    count: int
    errors_4xx: int
    errors_5xx: int
    bytes_in: int
    bytes_out: int
    percentiles: dict[str, float | None]  # "p50", "p90", "p95", "p99" in ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "count": self.count,
            "errors_4xx": self.errors_4xx,
            "errors_5xx": self.errors_5xx,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            **self.percentiles,
        }


@dataclass(frozen=True, slots=True)
class AnalyticsReport:
    start: int
    end: int
    step: int
    latency: str
    series: list[SeriesPoint]
    count: int
    errors_4xx: int
    errors_5xx: int
    bytes_in: int
    bytes_out: int
    percentiles: dict[str, float | None]
    top_consumers: list[tuple[str | None, int]]  # None: calls with no identified consumer
    top_routes: list[tuple[str, str, int]]  # (service, route, count)
    filters: dict[str, str] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Calls per second over the range."""
        return self.count / (self.end - self.start) if self.end > self.start else 0.0

    @property
    def error_rate_4xx(self) -> float:
        return self.errors_4xx / self.count if self.count else 0.0

    @property
    def error_rate_5xx(self) -> float:
        return self.errors_5xx / self.count if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "step": self.step,
            "latency": self.latency,
            "filters": self.filters,
            "count": self.count,
            "throughput": self.throughput,
            "errors_4xx": self.errors_4xx,
            "errors_5xx": self.errors_5xx,
            "error_rate_4xx": self.error_rate_4xx,
            "error_rate_5xx": self.error_rate_5xx,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "percentiles": self.percentiles,
            "series": [point.to_dict() for point in self.series],
            "top_consumers": [{"consumer": c, "count": n} for c, n in self.top_consumers],
            "top_routes": [{"service": s, "route": r, "count": n} for s, r, n in self.top_routes],
        }


def choose_step(seconds: int) -> int:
    """The series step for a range of `seconds`: minutes, hours or days."""
    if seconds <= _MINUTES_UP_TO:
        return MINUTE
    if seconds <= _HOURS_UP_TO:
        return HOUR
    return DAY


def cover(start: int, end: int, step: int) -> list[tuple[int, int, int]]:
    """[start, end) (whole minutes) as (granularity, lo, hi) spans of whole rows, none coarser
    than `step`: the coarsest rows in the middle, finer ones at the ends."""
    grains = [grain for grain in (DAY, HOUR, MINUTE) if grain <= step]
    spans: list[tuple[int, int, int]] = []

    def fill(lo: int, hi: int, position: int) -> None:
        if lo >= hi:
            return
        grain = grains[position]
        first = -(-lo // grain) * grain
        last = hi // grain * grain
        if first < last or position == len(grains) - 1:
            fill(lo, first, position + 1)
            spans.append((grain, first, last))
            fill(last, hi, position + 1)
        else:
            fill(lo, hi, position + 1)

    fill(start, end, 0)
    return sorted(spans, key=lambda span: span[1])


@contextmanager
def _connection(database: Database, connection: Any | None) -> Iterator[Any]:
    if connection is not None:
        yield connection
        return
    opened = database.connect()
    try:
        yield opened
    finally:
        opened.close()


class _Point:
    __slots__ = ("bytes_in", "bytes_out", "count", "errors_4xx", "errors_5xx", "sketch")

    def __init__(self) -> None:
        self.count = self.errors_4xx = self.errors_5xx = self.bytes_in = self.bytes_out = 0
        self.sketch = SketchSum()


def _percentiles(total: SketchSum) -> dict[str, float | None]:
    if not total.count:
        return dict.fromkeys(PERCENTILES)
    sketch = total.to_sketch()
    return {name: sketch.quantile(q) for name, q in PERCENTILES.items()}


def query_analytics(
    database: Database,
    start: float,
    end: float,
    *,
    service: str | None = None,
    route: str | None = None,
    consumer: str | None = None,
    step: int | None = None,
    latency: str = "total",
    top: int = DEFAULT_TOP,
    connection: Any | None = None,
) -> AnalyticsReport:
    """Time series, percentiles, throughput, error rates and top lists for [start, end).

    `consumer=""` selects calls with no identified consumer. `latency` picks the sketch:
    "total", "gateway" or "upstream". `top=0` leaves the top lists out, and saves the one
    scan of the consumer level that an unfiltered query makes.
    """
    if latency not in LATENCIES:
        raise ValueError(f"latency {latency!r}: use one of {', '.join(LATENCIES)}")
    first = int(start // MINUTE) * MINUTE
    last = math.ceil(end / MINUTE) * MINUTE
    if last <= first:
        raise ValueError("the range must end after it starts")
    if step is None:
        step = choose_step(last - first)
    elif step not in (MINUTE, HOUR, DAY):
        raise ValueError(f"step {step!r}: use 60, 3600 or 86400 seconds")
    level: Level = "route" if consumer is None else "consumer"
    filters = {
        name: value
        for name, value in (("service", service), ("route", route), ("consumer", consumer))
        if value is not None
    }
    spans = cover(first, last, step)
    origin = first // step * step
    points: dict[int, _Point] = {}
    routes: dict[tuple[str, str], int] = {}
    consumers: dict[str, int] = {}
    where = "".join(f" AND {name} = ?" for name in filters)
    with _connection(database, connection) as conn:
        ensure_rollup_schema(database, conn)
        cursor = conn.cursor()
        try:
            for grain, lo, hi in spans:
                cursor.execute(
                    database.sql(
                        f"SELECT bucket, service, route, count, errors_4xx, errors_5xx, "
                        f"bytes_in, bytes_out, {latency}_sketch FROM {table_name(level, grain)} "
                        f"WHERE bucket >= ? AND bucket < ?{where}"
                    ),
                    (lo, hi, *filters.values()),
                )
                for bucket, svc, rte, count, e4, e5, b_in, b_out, blob in cursor.fetchall():
                    index = (bucket - origin) // step
                    point = points.get(index)
                    if point is None:
                        point = points[index] = _Point()
                    point.count += count
                    point.errors_4xx += e4
                    point.errors_5xx += e5
                    point.bytes_in += b_in
                    point.bytes_out += b_out
                    point.sketch.add_encoded(bytes(blob))
                    routes[svc, rte] = routes.get((svc, rte), 0) + count
                if top <= 0:
                    continue  # the top lists cost a scan of the consumer level's counts
                cursor.execute(
                    database.sql(
                        f"SELECT consumer, SUM(count) FROM {table_name('consumer', grain)} "
                        f"WHERE bucket >= ? AND bucket < ?{where} GROUP BY consumer"
                    ),
                    (lo, hi, *filters.values()),
                )
                for name, count in cursor.fetchall():
                    consumers[name] = consumers.get(name, 0) + int(count)
        finally:
            cursor.close()
    series: list[SeriesPoint] = []
    overall = SketchSum()
    totals = _Point()
    for index in range((last - 1 - origin) // step + 1):
        point = points.get(index) or _Point()
        series.append(
            SeriesPoint(
                start=max(first, origin + index * step),
                count=point.count,
                errors_4xx=point.errors_4xx,
                errors_5xx=point.errors_5xx,
                bytes_in=point.bytes_in,
                bytes_out=point.bytes_out,
                percentiles=_percentiles(point.sketch),
            )
        )
        if point.count:
            overall.add_encoded(point.sketch.encode())
        totals.count += point.count
        totals.errors_4xx += point.errors_4xx
        totals.errors_5xx += point.errors_5xx
        totals.bytes_in += point.bytes_in
        totals.bytes_out += point.bytes_out
    return AnalyticsReport(
        start=first,
        end=last,
        step=step,
        latency=latency,
        series=series,
        count=totals.count,
        errors_4xx=totals.errors_4xx,
        errors_5xx=totals.errors_5xx,
        bytes_in=totals.bytes_in,
        bytes_out=totals.bytes_out,
        percentiles=_percentiles(overall),
        top_consumers=[
            (name or None, count)
            for name, count in sorted(consumers.items(), key=lambda item: -item[1])[:top]
        ],
        top_routes=[
            (svc, rte, count)
            for (svc, rte), count in sorted(routes.items(), key=lambda item: -item[1])[:top]
        ],
        filters=filters,
    )


# -- raw records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordPage:
    records: list[CallRecord]
    next_cursor: str | None  # None on the last page


def _encode_cursor(*values: Any) -> str:
    """An opaque cursor for the keyset `values` (a time first)."""
    first, *rest = values
    if isinstance(first, datetime):
        first = first.isoformat()
    return base64.urlsafe_b64encode(orjson.dumps([first, *rest])).decode()


def _decode_cursor(cursor: str, size: int) -> list[Any]:
    """The `size` values of a cursor `_encode_cursor` made: a time, then integers."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError) as exc:
        raise ValueError("not a valid cursor") from exc
    if (
        not isinstance(values, list)
        or len(values) != size
        or not isinstance(values[0], float | int | str)
        or not all(isinstance(value, int) for value in values[1:])
    ):
        raise ValueError("not a valid cursor")
    return values


def _status_bounds(status: int | str) -> tuple[int, int]:
    """[low, high) of the statuses a filter keeps: (404, 405) for 404, (400, 500) for "4xx"."""
    if isinstance(status, int):
        return status, status + 1
    text = status.strip().lower()
    if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
        low = int(text[0]) * 100
        return low, low + 100
    if text.isdigit():
        return int(text), int(text) + 1
    raise ValueError(f"status {status!r}: use a code (404) or a class (4xx)")


def search_records(
    database: Database,
    *,
    start: float | None = None,
    end: float | None = None,
    status: int | str | None = None,
    service: str | None = None,
    route: str | None = None,
    consumer: str | None = None,
    request_id: str | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
    connection: Any | None = None,
) -> RecordPage:
    """Records matching every given filter, newest first, `limit` (≤ 1,000) per page."""
    limit = max(1, min(limit, MAX_PAGE))
    if isinstance(database, SqliteDatabase):
        return _search_sqlite(
            database,
            start=start,
            end=end,
            status=status,
            equal={
                name: value
                for name, value in (
                    ("service", service),
                    ("route", route),
                    ("consumer", consumer),
                    ("request_id", request_id),
                )
                if value is not None
            },
            limit=limit,
            cursor=cursor,
            connection=connection,
        )
    postgres = database.kind == "postgres"
    time_param = "to_timestamp(?)" if postgres else "?"
    clauses = ""
    params: list[Any] = []
    if start is not None:
        clauses += f" AND time >= {time_param}"
        params.append(start)
    if end is not None:
        clauses += f" AND time < {time_param}"
        params.append(end)
    if status is not None:
        clauses += " AND status >= ? AND status < ?"
        params.extend(_status_bounds(status))
    for name, value in (
        ("service", service),
        ("route", route),
        ("consumer", consumer),
        ("request_id", request_id),
    ):
        if value is not None:
            clauses += f" AND {name} = ?"
            params.append(value)
    if cursor is not None:
        time_value, row_id = _decode_cursor(cursor, 2)
        cast = "CAST(? AS timestamptz)" if postgres else "?"
        clauses += f" AND (time < {cast} OR (time = {cast} AND id < ?))"
        params.extend((time_value, time_value, row_id))
    statement = (
        f"SELECT id, {', '.join(COLUMNS)} FROM call_records WHERE 1 = 1{clauses} "
        f"ORDER BY time DESC, id DESC LIMIT {limit + 1}"
    )
    with _connection(database, connection) as conn:
        db_cursor = conn.cursor()
        try:
            db_cursor.execute(database.sql(statement), params)
            rows = db_cursor.fetchall()
        finally:
            db_cursor.close()
    more = len(rows) > limit
    rows = rows[:limit]
    records = []
    for row in rows:
        fields = list(row[1:])
        if isinstance(fields[0], datetime):
            fields[0] = fields[0].timestamp()
        records.append(decode_json_fields(tuple(fields)))
    next_cursor = _encode_cursor(rows[-1][1], rows[-1][0]) if more and rows else None
    return RecordPage(records, next_cursor)


def _search_sqlite(
    database: SqliteDatabase,
    *,
    start: float | None,
    end: float | None,
    status: int | str | None,
    equal: dict[str, str],
    limit: int,
    cursor: str | None,
    connection: Any | None,
) -> RecordPage:
    """`search_records` in SQLite's blocks of records (`tollgate.observe.sinks.sqlite`)."""
    match = StatusMatch(*_status_bounds(status)) if status is not None else None
    before: RecordKey | None = None
    if cursor is not None:
        moment, block, position = _decode_cursor(cursor, 3)
        if isinstance(moment, str):
            raise ValueError("not a valid cursor")
        before = (float(moment), block, position)
    with _connection(database, connection) as conn:
        records, last = search_blocks(
            conn,
            start=start,
            end=end,
            status=match,
            equal=equal,
            limit=limit,
            before=before,
        )
    return RecordPage(records, _encode_cursor(*last) if last is not None else None)
