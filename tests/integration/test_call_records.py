"""Call records from an in-process gateway: one per exchange on every path, the fields of each,
opt-in captures with redaction, the pipeline's drop counter, and records turned off.

The load of 20,000 calls over two worker processes is in tests/e2e/test_call_record_load.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from call_load import CONSUMER, KEY, check_records, drive, mixed_config
from call_records import sqlite_rows
from http_wire import RawClient, read_response, request
from recording_upstream import RecordingUpstream
from upstreams import SlowUpstream, StreamingUpstream, free_port

from tollgate.config.loader import parse_config_data
from tollgate.observe.recorder import jsonl_path
from tollgate.runtime.worker import Gateway

GatewayStarter = Callable[[dict[str, Any]], Awaitable[Gateway]]
DRAIN_GRACE = 10.0  # seconds; far more than any call of the mixed load takes


def _rows(path: Path) -> list[dict[str, Any]]:
    return sqlite_rows(path)


def _plain(upstream_url: str, **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "gateway": {"listen": "127.0.0.1:0", "limits": {"max_body_size": 100}},
        "upstreams": [{"name": "backend", "targets": [{"url": upstream_url}]}],
        "services": [
            {
                "name": "api",
                "upstream": "backend",
                "routes": [{"name": "items", "paths": ["/items"], "methods": ["GET", "POST"]}],
            }
        ],
    }
    config.update(top)
    return config


async def _exchange(port: int, data: bytes) -> Any:
    async with await RawClient.open(port) as client:
        await client.send(data)
        return await read_response(client.reader)


async def test_a_mixed_load_in_process_makes_one_record_per_call(
    upstream: RecordingUpstream, streaming: StreamingUpstream, tmp_path: Path
) -> None:
    plan = {
        "ok": 600,
        "private": 200,
        "unauthorized": 300,
        "limited": 300,
        "broken": 200,
        "mid_request": 40,
        "mid_response": 40,
    }
    config = mixed_config(upstream.url, streaming.url, f"http://127.0.0.1:{free_port()}", limit=100)
    config["gateway"] = {"listen": "127.0.0.1:0"}
    gateway = Gateway(parse_config_data(config))
    await gateway.start()
    try:
        calls = await drive(gateway.port, plan, connections=4)
    finally:
        # A mid_response client is done once it closed, but the gateway learns of that only
        # when a write to it fails (the stream's second line after it left, ~0.2 s later):
        # close() at once would cut those exchanges short as gateway_shutdown. A drain waits
        # until every connection has ended (the stream itself ends within 0.5 s).
        drained = await gateway.drain(DRAIN_GRACE)
    assert drained, "the drain timed out: calls still in flight were cut short"
    assert gateway.logs is not None
    stats = gateway.logs.pipeline.stats()
    assert (stats.enqueued, stats.dropped, stats.failed) == (len(calls), 0, 0)
    statuses = check_records(_rows(tmp_path / "tollgate.db"), calls)
    assert statuses["limited 200"] == 100 and statuses["limited 429"] == 200
    assert statuses["mid_request 499"] == statuses["mid_response 499"] == 40


async def test_gateway_answers_have_their_status_error_and_no_upstream(
    start_gateway: GatewayStarter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    gateway = await start_gateway(_plain(upstream.url))
    sent = {
        "not-found": request("GET", "/nothing", [("X-Request-Id", "not-found")]),
        "not-allowed": request("DELETE", "/items", [("X-Request-Id", "not-allowed")]),
        "too-large": request("POST", "/items", [("X-Request-Id", "too-large")], b"x" * 500),
        "bad": b"GET /items HTTP/1.1\r\nHost: a\r\nX-Request-Id: bad\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\n",
        "fine": request("GET", "/items?page=2&api_key=s3cr3t", [("X-Request-Id", "fine")]),
    }
    answers = {name: (await _exchange(gateway.port, data)).status for name, data in sent.items()}
    assert answers == {
        "not-found": 404,
        "not-allowed": 405,
        "too-large": 413,
        "bad": 400,
        "fine": 200,
    }
    await gateway.close()
    rows = {row["request_id"]: row for row in _rows(tmp_path / "tollgate.db")}
    assert len(rows) == 5
    # A malformed head never yields the client's id: the gateway made one.
    bad = next(row for key, row in rows.items() if key not in sent)
    assert (bad["status"], bad["error_type"], bad["source"]) == (400, "bad_request", "gateway")
    for name, status, error_type in (
        ("not-found", 404, "not_found"),
        ("not-allowed", 405, "method_not_allowed"),
        ("too-large", 413, "request_body_too_large"),
    ):
        row = rows[name]
        assert (row["status"], row["error_type"], row["source"]) == (status, error_type, "gateway")
        assert row["tries"] == 0 and row["upstream_ms"] is None
        assert row["total_ms"] == pytest.approx(row["gateway_ms"])
    assert rows["not-found"]["route"] is None and rows["too-large"]["route"] == "items"
    fine = rows["fine"]
    assert (fine["status"], fine["source"], fine["service"], fine["route"]) == (
        200,
        "upstream",
        "api",
        "items",
    )
    assert fine["query"] == "page=2&api_key=%5Bredacted%5D"  # a credential never reaches a sink
    assert fine["upstream_connect_ms"] >= 0 and fine["upstream_first_byte_ms"] >= 0
    assert fine["upstream_ms"] >= fine["upstream_first_byte_ms"]
    assert fine["bytes_out"] == len("GET /items?page=2&api_key=s3cr3t 0")


async def test_timeouts_and_shutdown_are_recorded_with_their_reason(
    start_gateway: GatewayStarter, tmp_path: Path
) -> None:
    hold = asyncio.Event()
    async with SlowUpstream(hold=hold) as slow:
        config = _plain(slow.url)
        config["gateway"]["limits"]["header_timeout"] = "200ms"
        config["upstreams"][0]["timeouts"] = {"read": "300ms"}
        gateway = await start_gateway(config)
        timed_out = await _exchange(gateway.port, request("GET", "/items"))
        assert timed_out.status == 504
        async with await RawClient.open(gateway.port) as slow_client:
            await slow_client.send(b"GET /items HTTP/1.1\r\nHost: a\r\n")  # never finished
            assert (await slow_client.response()).status == 408
        config["upstreams"][0]["timeouts"] = {"read": "30s"}
        gateway.reload(parse_config_data(config))
        slow.request_seen.clear()
        async with await RawClient.open(gateway.port) as waiting:
            await waiting.send(request("GET", "/items", [("X-Request-Id", "in-flight")]))
            await slow.request_seen.wait()
            await gateway.close()  # the call in flight is cut short by the shutdown
        hold.set()
    rows = _rows(tmp_path / "tollgate.db")
    by_status = {row["status"]: row for row in rows}
    assert len(rows) == 3
    assert by_status[504]["error_type"] == "upstream_timeout"
    assert by_status[504]["upstream_ms"] >= 250
    assert by_status[408]["error_type"] == "request_timeout"
    cut = by_status[0]
    assert (cut["request_id"], cut["error_type"], cut["tries"]) == (
        "in-flight",
        "gateway_shutdown",
        1,
    )


async def test_captures_are_opt_in_capped_and_redacted(
    start_gateway: GatewayStarter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = _plain(upstream.url)
    config["gateway"]["limits"]["max_body_size"] = "1mb"
    config["services"][0]["logs"] = {
        "request_headers": True,
        "response_headers": True,
        "request_body": True,
        "response_body": True,
        "max_body": 128,
        "redact_headers": ["X-Session"],
        "redact_json": ["$.password", "cards[*].number"],
        "redact_query": ["user"],
    }
    config["services"].append(
        {
            "name": "quiet",
            "upstream": "backend",
            "routes": [{"name": "quiet", "paths": ["/quiet"]}],
            "logs": {"query": False},
        }
    )
    gateway = await start_gateway(config)
    document = {"user": "ann", "password": "hunter2", "cards": [{"number": "4111"}]}
    body = json.dumps(document).encode()
    headers = [
        ("X-Request-Id", "captured"),
        ("Authorization", "Bearer topsecret"),
        ("X-Session", "abc"),
        ("Content-Type", "application/json"),
    ]
    answer = await _exchange(gateway.port, request("POST", "/items?user=ann", headers, body))
    assert answer.status == 200
    large = request("POST", "/items", [("X-Request-Id", "large")], b"y" * 1000)
    assert (await _exchange(gateway.port, large)).status == 200
    quiet = request("GET", "/quiet?user=ann", [("X-Request-Id", "quiet")])
    assert (await _exchange(gateway.port, quiet)).status == 200
    await gateway.close()
    rows = {row["request_id"]: row for row in _rows(tmp_path / "tollgate.db")}
    captured = rows["captured"]
    assert captured["query"] == "user=%5Bredacted%5D"
    sent_headers = dict(json.loads(captured["request_headers"]))
    assert sent_headers["Authorization"] == "[redacted]"
    assert sent_headers["X-Session"] == "[redacted]"
    assert sent_headers["Content-Type"] == "application/json"
    assert json.loads(captured["request_body"]) == {
        "user": "ann",
        "password": "[redacted]",
        "cards": [{"number": "[redacted]"}],
    }
    assert "hunter2" not in json.dumps(captured) and "topsecret" not in json.dumps(captured)
    response_headers = dict(json.loads(captured["response_headers"]))
    assert response_headers["Content-Type"].startswith("text/plain")
    assert captured["response_body"] == f"POST /items?user=ann {len(body)}"
    large_row = rows["large"]
    assert large_row["request_body"] == "y" * 128 + "...[872 more bytes]"
    assert large_row["bytes_in"] == 1000
    quiet_row = rows["quiet"]
    assert quiet_row["query"] is None and quiet_row["request_headers"] is None


async def test_a_tiny_queue_drops_and_counts_what_does_not_fit(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = parse_config_data(_plain(upstream.url, logs={"queue": 5, "flush_interval": "10s"}))
    gateway = Gateway(config)
    await gateway.start()
    try:
        async with await RawClient.open(gateway.port) as client:
            for _ in range(40):
                await client.send(request("GET", "/items"))
                assert (await client.response()).status == 200
        assert gateway.logs is not None
        stats = gateway.logs.pipeline.stats()
        # The writer wakes on a full batch or every 10 s: nothing left the queue yet.
        assert (stats.enqueued, stats.dropped, stats.queue_depth) == (5, 35, 5)
    finally:
        await gateway.close()
    assert len(_rows(tmp_path / "tollgate.db")) == 5


async def test_records_off_make_nothing_and_no_database(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    gateway = Gateway(parse_config_data(_plain(upstream.url, logs={"enabled": False})))
    await gateway.start()
    try:
        assert gateway.logs is None and gateway.state.recorder is None
        for _ in range(3):
            assert (await _exchange(gateway.port, request("GET", "/items"))).status == 200
    finally:
        await gateway.close()
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - after the gateway is gone


async def test_other_sinks_get_the_same_records(
    upstream: RecordingUpstream, tmp_path: Path
) -> None:
    logs = {
        "sinks": [{"jsonl": {"path": "calls-{worker}.jsonl"}}],
        "rollups": False,
        "flush_interval": "50ms",
    }
    gateway = Gateway(parse_config_data(_plain(upstream.url, logs=logs)), worker=3, workers=4)
    await gateway.start()
    try:
        ids = []
        for _ in range(3):
            answer = await _exchange(gateway.port, request("GET", "/items"))
            ids.append(answer.header("x-request-id"))
    finally:
        await gateway.close()
    lines = (tmp_path / "calls-3.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["request_id"] for record in records] == ids
    assert {record["worker"] for record in records} == {3}
    assert records[0]["time"].endswith("Z")
    assert not (tmp_path / "tollgate.db").exists()  # neither storage nor rollups: no database


def test_jsonl_paths_are_per_worker() -> None:
    assert jsonl_path("logs/calls-{worker}.jsonl", 2, 4) == Path("logs/calls-2.jsonl")
    assert jsonl_path("logs/calls.jsonl", 2, 4) == Path("logs/calls-2.jsonl")
    assert jsonl_path("logs/calls.jsonl", 0, 1) == Path("logs/calls.jsonl")


async def test_retention_deletes_old_records(upstream: RecordingUpstream, tmp_path: Path) -> None:
    logs = {"retention": {"records": "1h"}}
    gateway = Gateway(parse_config_data(_plain(upstream.url, logs=logs)))
    await gateway.start()
    try:
        assert (await _exchange(gateway.port, request("GET", "/items"))).status == 200
    finally:
        await gateway.close()
    assert gateway.logs is not None and gateway.logs.runs_retention
    assert len(_rows(tmp_path / "tollgate.db")) == 1
    kept = gateway.logs.apply_retention(now=time.time() + 1800)
    assert kept.records_deleted == 0
    purged = gateway.logs.apply_retention(now=time.time() + 7200)
    assert purged.records_deleted == 1
    assert _rows(tmp_path / "tollgate.db") == []


def test_the_consumer_and_key_of_the_mix_are_what_records_name() -> None:
    # The mixed load's helpers and the config agree (a guard for whoever edits one of them).
    config = parse_config_data(mixed_config("http://a:1", "http://b:1", "http://c:1", limit=1))
    assert config.consumers[0].name == CONSUMER
    assert config.consumers[0].keys[0].get_secret_value() == KEY


async def test_a_refused_calls_record_names_the_limit_that_refused_it(
    start_gateway: GatewayStarter, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    config = _plain(upstream.url)
    per_minute = {"name": "per-minute", "algorithm": "token-bucket", "rate": 0.001, "burst": 1}
    config["services"][0]["policies"] = [{"rate-limit": {"limits": [per_minute], "by": "ip"}}]
    gateway = await start_gateway(config)
    for name in ("first", "second"):
        await _exchange(gateway.port, request("GET", "/items", [("X-Request-Id", name)]))
    await gateway.close()
    rows = {row["request_id"]: row for row in _rows(tmp_path / "tollgate.db")}
    assert rows["first"]["status"] == 200 and rows["first"]["policies"] is None
    assert rows["second"]["status"] == 429
    assert json.loads(rows["second"]["policies"]) == {"rate-limit": "per-minute"}
