"""The call record: one per call, made on every path, written by every sink in the same columns.

A record is a tuple in `COLUMNS` order. The listener makes a plain `tuple` (a `RecordRow`:
`from_exchange`, one allocation, about 1 µs with its attribute reads), and that is what the
pipeline carries and every sink takes; `CallRecord`, a `NamedTuple` of the same fields, is the
same tuple with names, for records read back (searches, tests) and made by hand. Plain, not
named, on the way in, because the SQLite sink hands each batch to orjson, which encodes a
plain tuple natively and a `NamedTuple` only through a Python `default` hook that copies it:
0.35 against 0.73 µs a record (measured on 1,000-record batches). A `__slots__` class with a
keyword `__init__` costs three to four times as much to build, for 37 fields, as Python binds
each argument by name.

`COLUMNS` is the one list of column names and `COLUMN_KINDS` their storage kinds; every sink
derives its schema, its `INSERT`, its `COPY` column list and its JSON keys from them, so adding
a field is one line in `CallRecord` and one in `COLUMN_KINDS` (an import-time check keeps the
two in step).

Units: `time` is wall-clock Unix seconds at the start of the call; latencies are milliseconds
(floats); sizes are bytes. A field that does not apply is None: no upstream was tried, no
consumer was identified, a non-AI call has no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

import orjson

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

__all__ = [
    "COLUMNS",
    "COLUMN_KINDS",
    "JSON_COLUMNS",
    "TIME",
    "CallRecord",
    "ColumnKind",
    "RecordRow",
    "decode_json_fields",
    "encode_json_fields",
    "exchange_record",
    "from_exchange",
    "iso_time",
    "record_from_dict",
    "record_to_dict",
    "record_to_json",
    "status_class",
]

ColumnKind = Literal["time", "text", "int", "real", "json"]

# A record as the pipeline carries it: a tuple in `COLUMNS` order (a `CallRecord` is one too).
RecordRow: TypeAlias = tuple[Any, ...]


class CallRecord(NamedTuple):
    """One call, as the gateway saw it. Field order is the column order of every sink."""

    time: float  # wall-clock Unix seconds when the request head arrived
    request_id: str
    trace_id: str | None = None
    node: str = ""
    worker: int = 0
    service: str | None = None
    route: str | None = None
    consumer: str | None = None
    credential_id: str | None = None
    client_ip: str = ""
    method: str = ""
    host: str = ""
    path: str = ""
    query: str | None = None  # the raw query string, or None when redacted or absent
    status: int = 0  # 0: no response was sent (the client went away first)
    source: str = "gateway"  # "upstream": the upstream's answer; "gateway": one it made
    error_type: str | None = None
    bytes_in: int = 0  # request body bytes
    bytes_out: int = 0  # response bytes written to the client
    upstream_target: str | None = None
    tries: int = 0  # upstream attempts
    total_ms: float = 0.0
    gateway_ms: float = 0.0  # total minus the time spent waiting on the upstream
    upstream_connect_ms: float | None = None
    upstream_first_byte_ms: float | None = None
    upstream_ms: float | None = None  # from the first attempt to the upstream's last byte
    policies: Mapping[str, Any] | None = None  # outcomes worth keeping, e.g. which limit rejected
    request_headers: list[list[str]] | None = None  # opt-in captures, already redacted
    response_headers: list[list[str]] | None = None
    request_body: str | None = None
    response_body: str | None = None
    model: str | None = None
    provider: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost: float | None = None
    ttft_ms: float | None = None  # time to first token


COLUMNS: tuple[str, ...] = CallRecord._fields

COLUMN_KINDS: dict[str, ColumnKind] = {
    "time": "time",
    "request_id": "text",
    "trace_id": "text",
    "node": "text",
    "worker": "int",
    "service": "text",
    "route": "text",
    "consumer": "text",
    "credential_id": "text",
    "client_ip": "text",
    "method": "text",
    "host": "text",
    "path": "text",
    "query": "text",
    "status": "int",
    "source": "text",
    "error_type": "text",
    "bytes_in": "int",
    "bytes_out": "int",
    "upstream_target": "text",
    "tries": "int",
    "total_ms": "real",
    "gateway_ms": "real",
    "upstream_connect_ms": "real",
    "upstream_first_byte_ms": "real",
    "upstream_ms": "real",
    "policies": "json",
    "request_headers": "json",
    "response_headers": "json",
    "request_body": "text",
    "response_body": "text",
    "model": "text",
    "provider": "text",
    "tokens_in": "int",
    "tokens_out": "int",
    "cost": "real",
    "ttft_ms": "real",
}

if tuple(COLUMN_KINDS) != COLUMNS:  # pragma: no cover - a guard for whoever adds a field
    raise RuntimeError("COLUMN_KINDS must name every CallRecord field, in order")

JSON_COLUMNS: tuple[int, ...] = tuple(
    index for index, name in enumerate(COLUMNS) if COLUMN_KINDS[name] == "json"
)
# Where `time` is in a row.
TIME: int = COLUMNS.index("time")


def from_exchange(
    ex: Exchange,
    wall_offset: float,
    node: str,
    worker: int,
    query: str | None = None,
    *,
    trace_id: str | None = None,
    policies: Mapping[str, Any] | None = None,
    request_headers: list[list[str]] | None = None,
    response_headers: list[list[str]] | None = None,
    request_body: str | None = None,
    response_body: str | None = None,
) -> RecordRow:
    """The record of a finished exchange, built in one tuple allocation.

    `wall_offset` is wall time minus monotonic time (read once per worker, or once a second):
    the exchange keeps monotonic timestamps, the record wall-clock time. `query` is passed in
    decoded and possibly redacted; the captures come from `tollgate.observe.redaction`.
    Latencies: total from the request head to the last byte sent; upstream from the first
    attempt to the end; gateway is total minus upstream.
    """
    return exchange_record(
        ex,
        wall_offset,
        node,
        worker,
        query,
        trace_id,
        policies,
        request_headers,
        response_headers,
        request_body,
        response_body,
    )


def exchange_record(
    ex: Exchange,
    wall_offset: float,
    node: str,
    worker: int,
    query: str | None,
    trace_id: str | None,
    policies: Mapping[str, Any] | None,
    request_headers: list[list[str]] | None,
    response_headers: list[list[str]] | None,
    request_body: str | None,
    response_body: str | None,
) -> RecordRow:
    """`from_exchange` with every argument given by position: what the listener calls once
    per exchange. Keyword-only parameters with defaults cost a dictionary look-up each per
    call in CPython, a quarter of this function's own time."""
    t_start = ex.t_start
    total_ms = (ex.t_end - t_start) * 1000.0
    t_upstream = ex.t_upstream_start
    upstream_ms: float | None = None
    connect_ms: float | None = None
    first_byte_ms: float | None = None
    gateway_ms = total_ms
    if t_upstream:
        waited_ms = (ex.t_end - t_upstream) * 1000.0
        upstream_ms = waited_ms
        gateway_ms = total_ms - waited_ms
        if ex.t_connected:
            connect_ms = (ex.t_connected - t_upstream) * 1000.0
        if ex.t_first_byte:
            first_byte_ms = (ex.t_first_byte - t_upstream) * 1000.0
    route = ex.route
    consumer = ex.consumer
    return (
        t_start + wall_offset,
        ex.request_id,
        trace_id,
        node,
        worker,
        route.service if route is not None else None,
        route.name if route is not None else None,
        consumer.name if consumer is not None else None,
        ex.credential_id or None,
        ex.client_ip,
        ex.method,
        ex.host,
        ex.path,
        query,
        ex.status,
        ex.source,
        ex.error_type or None,
        ex.body_bytes,
        ex.bytes_out,
        ex.upstream_target or None,
        ex.tries,
        total_ms,
        gateway_ms,
        connect_ms,
        first_byte_ms,
        upstream_ms,
        policies if policies is not None else ex.outcomes,
        request_headers,
        response_headers,
        request_body,
        response_body,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def status_class(status: int) -> int:
    """2 for 2xx ... 5 for 5xx; 0 when no response was sent (or the status is not HTTP's)."""
    return status // 100 if 100 <= status <= 599 else 0


# -- serialisation ---------------------------------------------------------------------------


def iso_time(seconds: float) -> str:
    """`2026-11-22T10:00:00.123456Z`: UTC with microseconds."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def record_to_dict(record: RecordRow) -> dict[str, Any]:
    """The record as JSON-ready values: `time` as an ISO 8601 UTC string, the rest as is."""
    data = dict(zip(COLUMNS, record, strict=True))
    data["time"] = iso_time(record[TIME])
    return data


def record_to_json(record: RecordRow) -> bytes:
    """One JSON object (no newline), as the file, stdout and HTTP sinks write it."""
    return orjson.dumps(record_to_dict(record))


def record_from_dict(data: Mapping[str, Any]) -> CallRecord:
    """The inverse of `record_to_dict` (an ISO or a numeric `time`); missing fields default."""
    values = {name: data[name] for name in COLUMNS if name in data}
    moment = values.get("time")
    if isinstance(moment, str):
        values["time"] = datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
    elif isinstance(moment, datetime):
        values["time"] = moment.timestamp()
    return CallRecord(**values)


def encode_json_fields(record: RecordRow) -> RecordRow:
    """The record as an SQL row: JSON fields as JSON text. The record itself when none is set."""
    if all(record[index] is None for index in JSON_COLUMNS):
        return record
    row = list(record)
    for index in JSON_COLUMNS:
        value = row[index]
        if value is not None:
            row[index] = orjson.dumps(value).decode()
    return tuple(row)


def decode_json_fields(row: tuple[Any, ...]) -> CallRecord:
    """The inverse of `encode_json_fields`: a row read back from SQL, as a record."""
    values = list(row)
    for index in JSON_COLUMNS:
        value = values[index]
        if isinstance(value, str | bytes):
            values[index] = orjson.loads(value)
    return CallRecord._make(values)
