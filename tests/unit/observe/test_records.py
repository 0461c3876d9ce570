from __future__ import annotations

import math
import timeit

import orjson
from call_records import T0, make_record

from tollgate.config.loader import parse_config_data
from tollgate.http.exchange import Exchange
from tollgate.observe.records import (
    COLUMN_KINDS,
    COLUMNS,
    JSON_COLUMNS,
    CallRecord,
    decode_json_fields,
    encode_json_fields,
    from_exchange,
    iso_time,
    record_from_dict,
    record_to_dict,
    record_to_json,
    status_class,
)
from tollgate.runtime.context import ConsumerEntry
from tollgate.runtime.entries import CompiledRoute
from tollgate.runtime.runtime import PoolRegistry, compile_config


def _route() -> CompiledRoute:
    config = parse_config_data(
        {
            "upstreams": [{"name": "backend", "targets": [{"url": "http://10.0.0.1:9001"}]}],
            "services": [
                {"name": "orders-api", "upstream": "backend", "routes": [{"name": "create-order"}]}
            ],
        }
    )
    [route] = compile_config(config, PoolRegistry()).routes
    return route


ROUTE = _route()
ACME = ConsumerEntry(name="acme", id="acme", plan=None, tags=(), upstream_headers=())


def finished_exchange(*, upstream: bool = True) -> Exchange:
    ex = Exchange()
    ex.method = "POST"
    ex.path = "/orders"
    ex.host = "api.example.com"
    ex.client_ip = "10.1.2.3"
    ex.request_id = "abc123"
    ex.route = ROUTE
    ex.consumer = ACME
    ex.credential_id = "key-7"
    ex.status = 201 if upstream else 429
    ex.source = "upstream" if upstream else "gateway"
    ex.error_type = "" if upstream else "rate_limited"
    ex.body_bytes = 120
    ex.bytes_out = 2048
    ex.t_start = 100.0
    ex.t_end = 100.050
    if upstream:
        ex.upstream_target = "http://10.0.0.1:9001"
        ex.tries = 2
        ex.t_upstream_start = 100.002
        ex.t_connected = 100.003
        ex.t_first_byte = 100.040
    return ex


def test_columns_are_the_record_fields_in_order_with_a_kind_each() -> None:
    assert CallRecord._fields == COLUMNS
    assert tuple(COLUMN_KINDS) == COLUMNS
    assert [COLUMNS[index] for index in JSON_COLUMNS] == [
        "policies",
        "request_headers",
        "response_headers",
    ]


def test_from_exchange_fills_every_field_from_a_proxied_exchange() -> None:
    row = from_exchange(
        finished_exchange(),
        wall_offset=T0 - 100.0,
        node="node-a",
        worker=3,
        trace_id="t" * 32,
        query="page=2",
        policies={"rate-limit": "allowed"},
    )
    # A plain tuple, which orjson encodes natively (the SQLite sink's block), in COLUMNS order.
    assert type(row) is tuple and len(row) == len(COLUMNS)
    record = CallRecord._make(row)
    assert record.time == T0
    assert (record.request_id, record.trace_id, record.node, record.worker) == (
        "abc123",
        "t" * 32,
        "node-a",
        3,
    )
    assert (record.service, record.route, record.consumer, record.credential_id) == (
        "orders-api",
        "create-order",
        "acme",
        "key-7",
    )
    assert (record.method, record.host, record.path, record.query) == (
        "POST",
        "api.example.com",
        "/orders",
        "page=2",
    )
    assert (record.status, record.source, record.error_type) == (201, "upstream", None)
    assert (record.bytes_in, record.bytes_out) == (120, 2048)
    assert (record.upstream_target, record.tries) == ("http://10.0.0.1:9001", 2)
    assert math.isclose(record.total_ms, 50.0)
    assert record.upstream_ms is not None and math.isclose(record.upstream_ms, 48.0)
    assert math.isclose(record.gateway_ms, 2.0, abs_tol=1e-9)
    assert record.upstream_connect_ms is not None and math.isclose(record.upstream_connect_ms, 1.0)
    assert record.upstream_first_byte_ms is not None
    assert math.isclose(record.upstream_first_byte_ms, 38.0)
    assert record.policies == {"rate-limit": "allowed"}
    assert record.model is None and record.ttft_ms is None


def test_from_exchange_of_a_gateway_answer_has_no_upstream_latencies() -> None:
    record = CallRecord._make(
        from_exchange(finished_exchange(upstream=False), wall_offset=0.0, node="n", worker=0)
    )
    assert record.status == 429 and record.source == "gateway"
    assert record.error_type == "rate_limited"
    assert record.upstream_ms is None and record.upstream_connect_ms is None
    assert record.upstream_first_byte_ms is None and record.upstream_target is None
    assert math.isclose(record.gateway_ms, record.total_ms)


def test_from_exchange_with_no_route_or_consumer_leaves_them_empty() -> None:
    ex = Exchange()
    ex.request_id = "x"
    record = CallRecord._make(from_exchange(ex, wall_offset=T0, node="n", worker=0))
    assert (record.service, record.route, record.consumer, record.credential_id) == (
        None,
        None,
        None,
        None,
    )
    assert record.status == 0 and record.time == T0


def test_building_a_record_from_an_exchange_takes_a_few_microseconds() -> None:
    ex = finished_exchange()
    runs = 20_000
    seconds = min(
        timeit.repeat(
            lambda: from_exchange(ex, wall_offset=0.0, node="n", worker=1), number=runs, repeat=3
        )
    )
    # About 1 µs on an idle machine; the bound leaves room for a busy one.
    assert seconds / runs < 20e-6


def test_status_class() -> None:
    assert [status_class(code) for code in (0, 99, 101, 200, 204, 302, 404, 429, 502, 600)] == [
        0,
        0,
        1,
        2,
        2,
        3,
        4,
        4,
        5,
        0,
    ]


def test_json_form_has_every_column_and_an_iso_time() -> None:
    record = make_record(3, time=T0 + 1.25)
    data = orjson.loads(record_to_json(record))
    assert list(data) == list(COLUMNS)
    assert data["time"] == "2026-01-01T00:00:01.250000Z"
    assert data["policies"] == {"rate-limit": "allowed"}
    assert record_from_dict(data) == record
    assert record_to_dict(record)["request_headers"] == [["Accept", "application/json"]]


def test_iso_time_is_utc_with_microseconds() -> None:
    assert iso_time(0.0) == "1970-01-01T00:00:00.000000Z"


def test_sql_row_is_the_record_itself_without_json_fields() -> None:
    plain = make_record(policies=None, request_headers=None, response_headers=None)
    assert encode_json_fields(plain) is plain


def test_sql_row_round_trips_json_fields() -> None:
    record = make_record()
    row = encode_json_fields(record)
    assert row[COLUMNS.index("policies")] == '{"rate-limit":"allowed"}'
    assert decode_json_fields(row) == record
