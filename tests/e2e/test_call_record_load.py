"""Calls in = records out: `tollgate serve` with two workers under a mixed load writes exactly
one call record per call, to SQLite and to PostgreSQL, with the fields the client's view
implies (status, source, consumer, route, error type, bytes, latencies, request id)."""

from __future__ import annotations

import re
import signal
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from call_load import Call, check_records, drive, mixed_config
from call_records import sqlite_rows
from psycopg.rows import dict_row
from upstreams import StreamingUpstream, free_port

if TYPE_CHECKING:
    from conftest import Gateway, StartGateway, Upstream

# 20,000 calls; 1,500 of them 429 (the limit admits 500 of 2,000), 500 clients disconnecting.
LOAD = {
    "ok": 9_000,
    "private": 2_500,
    "unauthorized": 3_000,
    "limited": 2_000,
    "broken": 3_000,
    "mid_request": 250,
    "mid_response": 250,
}
LIMIT = 500
# Against PostgreSQL, fewer: the same paths, a shorter test.
SMALL_LOAD = {kind: max(20, count // 10) for kind, count in LOAD.items()}
SMALL_LIMIT = 100


def _config(upstream: Upstream, streaming: StreamingUpstream, limit: int, **top: Any) -> Any:
    config = upstream.config(workers=2)
    mixed = mixed_config(
        upstream.url, streaming.url, f"http://127.0.0.1:{free_port()}", limit=limit, **top
    )
    for section in ("upstreams", "services", "consumers", "logs", *top):
        config[section] = mixed[section]
    return config


async def _load_and_stop(
    start_gateway: StartGateway, config: Any, plan: dict[str, int]
) -> tuple[Gateway, list[Call]]:
    gateway = await start_gateway(config)
    port = int(gateway.listen.rpartition(":")[2])
    calls = await drive(port, plan)
    assert len(calls) == sum(plan.values())
    gateway.send_signal(signal.SIGTERM)  # the workers drain, then write what they queued
    assert await gateway.wait_exit() == 0, gateway.stderr()
    return gateway, calls


def _expected_statuses(plan: dict[str, int], limit: int) -> dict[str, int]:
    expected = {
        "ok 200": plan["ok"],
        "private 200": plan["private"],
        "unauthorized 401": plan["unauthorized"],
        "limited 200": limit,
        "limited 429": plan["limited"] - limit,
        "broken 502": plan["broken"],
        "mid_request 499": plan["mid_request"],
        "mid_response 499": plan["mid_response"],
    }
    return expected


@pytest.mark.timeout(180)
async def test_every_call_of_a_20000_call_mix_has_one_sqlite_record(
    start_gateway: StartGateway, upstream: Upstream, streaming: StreamingUpstream, tmp_path: Path
) -> None:
    config = _config(upstream, streaming, LIMIT, storage="sqlite:///./calls.db")
    gateway, calls = await _load_and_stop(start_gateway, config, LOAD)
    closing = re.findall(
        r"call records of worker \d: (\d+) queued, (\d+) dropped", gateway.stderr()
    )
    assert sorted(dropped for _, dropped in closing) == ["0", "0"]  # both workers, none dropped
    assert sum(int(queued) for queued, _ in closing) == 20_000
    rows = sqlite_rows(tmp_path / "calls.db")
    with sqlite3.connect(tmp_path / "calls.db") as connection:
        minutes = connection.execute("SELECT SUM(count) FROM rollup_route_minute").fetchone()[0]
    assert len(rows) == 20_000
    assert dict(check_records(rows, calls)) == _expected_statuses(LOAD, LIMIT)
    assert {row["worker"] for row in rows} == {0, 1}  # both workers served and recorded
    assert minutes == 20_000  # the rollups count every call too


@pytest.mark.timeout(120)
async def test_every_call_of_a_mix_has_one_postgres_record(
    start_gateway: StartGateway,
    upstream: Upstream,
    streaming: StreamingUpstream,
    postgres_dsn: str,
) -> None:
    config = _config(upstream, streaming, SMALL_LIMIT, storage=postgres_dsn)
    _, calls = await _load_and_stop(start_gateway, config, SMALL_LOAD)
    with psycopg.connect(postgres_dsn, row_factory=dict_row) as connection:
        rows = connection.execute("SELECT * FROM call_records").fetchall()
    assert len(rows) == sum(SMALL_LOAD.values())
    assert dict(check_records(rows, calls)) == _expected_statuses(SMALL_LOAD, SMALL_LIMIT)
