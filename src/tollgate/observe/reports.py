"""Analytics and record search for people: the admin API's `/admin/analytics` and
`/admin/logs`, and `tollgate stats`, over the node's `storage`.

Thin on purpose: `tollgate.observe.query` does the work (from rollups only for analytics; by
keyset over the records for search). This module turns request parameters into its
arguments with precise errors, makes sure the tables exist (a node that has served nothing
yet answers with empty results, not an error), and renders the terminal report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tollgate.config.units import parse_duration
from tollgate.observe.database import Database, PostgresDatabase, SqliteDatabase, open_database
from tollgate.observe.query import AnalyticsReport, query_analytics, search_records
from tollgate.observe.records import record_to_dict
from tollgate.observe.rollups import ensure_rollup_schema

DEFAULT_RANGE = 3600.0  # seconds, when a query gives no start


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message says which and why."""


def parse_time(name: str, value: str, now: float) -> float:
    """Unix seconds from `value`: a number, an ISO 8601 time (UTC if no offset), `now`, or
    a duration back from now (`15m`, `2h`, `7d`)."""
    text = value.strip()
    if text == "now":
        return now
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
        raise BadQuery(f"{name}: {value!r} is not a time")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        pass
    else:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    try:
        return now - parse_duration(text)
    except ValueError:
        raise BadQuery(
            f"{name}: {value!r} is not a time (Unix seconds, ISO 8601 such as "
            "2026-11-22T10:00:00Z, `now`, or a duration back from now such as 15m or 7d)"
        ) from None


class Reports:
    """Queries on one storage URL; blocking (run them in a thread from an event loop)."""

    def __init__(self, storage: str) -> None:
        self.storage = storage
        self.database: Database = open_database(storage)
        self._ready = False

    def _prepare(self) -> None:
        if self._ready:
            return
        connection = self.database.connect()
        try:
            ensure_rollup_schema(self.database, connection)
            if isinstance(self.database, SqliteDatabase):
                from tollgate.observe.sinks.sqlite import ensure_records_schema

                ensure_records_schema(self.database, connection)
            elif isinstance(self.database, PostgresDatabase):
                from tollgate.observe.sinks.postgres import (
                    ensure_records_schema as ensure_postgres_records,
                )

                ensure_postgres_records(self.database, connection)
        finally:
            connection.close()
        self._ready = True

    def analytics(self, params: Mapping[str, str], now: float | None = None) -> AnalyticsReport:
        """`query_analytics` with `start`, `end`, `service`, `route`, `consumer`, `step`,
        `latency` and `top` from query parameters."""
        now = time.time() if now is None else now
        known = {"start", "end", "service", "route", "consumer", "step", "latency", "top"}
        _refuse_unknown(params, known)
        end = parse_time("end", params["end"], now) if "end" in params else now
        start = (
            parse_time("start", params["start"], now) if "start" in params else end - DEFAULT_RANGE
        )
        step = None
        if "step" in params:
            try:
                step = int(parse_duration(params["step"]))
            except ValueError:
                raise BadQuery(f"step: {params['step']!r} is not 1m, 1h or 1d") from None
        top = _integer(params, "top", 10, 0, 100)
        self._prepare()
        try:
            return query_analytics(
                self.database,
                start,
                end,
                service=params.get("service"),
                route=params.get("route"),
                consumer=params.get("consumer"),
                step=step,
                latency=params.get("latency", "total"),
                top=top,
            )
        except ValueError as exc:
            raise BadQuery(str(exc)) from None

    def logs(self, params: Mapping[str, str], now: float | None = None) -> dict[str, Any]:
        """`search_records` with `start`, `end`, `status` (404 or 4xx), `service`, `route`,
        `consumer`, `request_id`, `limit` and `cursor` from query parameters."""
        now = time.time() if now is None else now
        known = {
            "start",
            "end",
            "status",
            "service",
            "route",
            "consumer",
            "request_id",
            "limit",
            "cursor",
        }
        _refuse_unknown(params, known)
        status: int | str | None = params.get("status")
        if isinstance(status, str) and status.isdigit():
            status = int(status)
        self._prepare()
        try:
            page = search_records(
                self.database,
                start=parse_time("start", params["start"], now) if "start" in params else None,
                end=parse_time("end", params["end"], now) if "end" in params else None,
                status=status,
                service=params.get("service"),
                route=params.get("route"),
                consumer=params.get("consumer"),
                request_id=params.get("request_id"),
                limit=_integer(params, "limit", 100, 1, 1000),
                cursor=params.get("cursor"),
            )
        except ValueError as exc:
            raise BadQuery(str(exc)) from None
        return {
            "records": [record_to_dict(record) for record in page.records],
            "next_cursor": page.next_cursor,
        }


def _refuse_unknown(params: Mapping[str, str], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadQuery(
            f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(sorted(known))}"
        )


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError:
        raise BadQuery(f"{name}: {params[name]!r} is not an integer") from None
    if not low <= value <= high:
        raise BadQuery(f"{name}: {value} is not from {low} to {high}")
    return value


# -- the terminal report (`tollgate stats`) ----------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render_text(report: AnalyticsReport) -> str:
    """`report` as the terminal shows it."""

    def when(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")

    filters = ", ".join(f"{k}={v}" for k, v in sorted(report.filters.items())) or "all calls"
    p = report.percentiles
    lines = [
        f"{when(report.start)} to {when(report.end)} ({filters}; {report.latency} latency)",
        f"  calls        {report.count:,}   ({report.throughput:.2f}/s)",
        f"  errors       4xx {report.error_rate_4xx:.2%}   5xx {report.error_rate_5xx:.2%}",
        f"  latency      p50 {_ms(p.get('p50'))}   p90 {_ms(p.get('p90'))}   "
        f"p95 {_ms(p.get('p95'))}   p99 {_ms(p.get('p99'))}",
        f"  bytes        in {report.bytes_in:,}   out {report.bytes_out:,}",
    ]
    if report.top_routes:
        lines.append("  top routes")
        for service, route, count in report.top_routes:
            lines.append(f"    {count:>10,}  {service}/{route}")
    if report.top_consumers:
        lines.append("  top consumers")
        for consumer, count in report.top_consumers:
            lines.append(f"    {count:>10,}  {consumer if consumer is not None else '(anonymous)'}")
    return "\n".join(lines)
