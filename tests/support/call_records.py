"""Call records for the log store's tests: one with every field set, or many of a realistic mix."""

from __future__ import annotations

import os
import random
from typing import Any

from tollgate.observe.records import CallRecord

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a day boundary

SERVICES = {"orders-api": ("list-orders", "get-order"), "llm": ("chat",)}
CONSUMERS = ("acme", "globex", "initech", None)


def make_record(number: int = 0, **overrides: Any) -> CallRecord:
    """A record with every field set (JSON fields included), `overrides` applied."""
    values: dict[str, Any] = {
        "time": T0 + number,
        "request_id": f"req-{number:06d}",
        "trace_id": f"{number:032x}",
        "node": "node-a",
        "worker": 1,
        "service": "orders-api",
        "route": "list-orders",
        "consumer": "acme",
        "credential_id": "key-1",
        "client_ip": "10.0.0.7",
        "method": "GET",
        "host": "api.example.com",
        "path": "/orders",
        "query": "page=2",
        "status": 200,
        "source": "upstream",
        "error_type": None,
        "bytes_in": 12,
        "bytes_out": 345,
        "upstream_target": "http://127.0.0.1:9001",
        "tries": 1,
        "total_ms": 12.5,
        "gateway_ms": 0.75,
        "upstream_connect_ms": 0.25,
        "upstream_first_byte_ms": 10.5,
        "upstream_ms": 11.75,
        "policies": {"rate-limit": "allowed"},
        "request_headers": [["Accept", "application/json"]],
        "response_headers": [["Content-Type", "application/json"]],
        "request_body": None,
        "response_body": '{"orders": []}',
        "model": None,
        "provider": None,
        "tokens_in": None,
        "tokens_out": None,
        "cost": None,
        "ttft_ms": None,
    }
    values.update(overrides)
    return CallRecord(**values)


def latency_ms(rng: random.Random) -> float:
    """A gateway-like mix: mostly fast calls, some slow ones, a thin heavy tail."""
    draw = rng.random()
    if draw < 0.85:
        return rng.lognormvariate(3.4, 0.5)  # median ~30 ms
    if draw < 0.99:
        return rng.lognormvariate(5.7, 0.6)  # median ~300 ms
    return min(60_000.0, 1_000.0 * rng.paretovariate(1.5))


def generate_records(
    count: int, *, start: float = T0, seconds: float = 3600.0, seed: int = 7
) -> list[CallRecord]:
    """`count` records spread uniformly over [start, start + seconds), statuses and routes mixed."""
    rng = random.Random(seed)
    services = [(service, route) for service, routes in SERVICES.items() for route in routes]
    records: list[CallRecord] = []
    for number in range(count):
        service, route = rng.choice(services)
        draw = rng.random()
        status = 200 if draw < 0.9 else 401 if draw < 0.94 else 429 if draw < 0.97 else 502
        gateway_made = status in (401, 429)
        total = latency_ms(rng)
        gateway = total if gateway_made else total * 0.02
        records.append(
            CallRecord(
                time=start + rng.random() * seconds,
                request_id=f"gen-{seed}-{number}",
                service=service,
                route=route,
                consumer=rng.choice(CONSUMERS),
                method="GET",
                path="/x",
                status=status,
                source="gateway" if gateway_made else "upstream",
                bytes_in=rng.randrange(0, 1000),
                bytes_out=rng.randrange(0, 5000),
                total_ms=total,
                gateway_ms=gateway,
                upstream_ms=None if gateway_made else total - gateway,
            )
        )
    return records


def sqlite_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record in a SQLite storage file, in the order written, as a row of the SQL sinks:
    a dict of the columns, JSON fields as JSON text."""
    from tollgate.observe.database import SqliteDatabase
    from tollgate.observe.records import COLUMNS, encode_json_fields
    from tollgate.observe.sinks.sqlite import read_records

    return [
        dict(zip(COLUMNS, encode_json_fields(record), strict=True))
        for record in read_records(SqliteDatabase(os.fspath(path)))
    ]
