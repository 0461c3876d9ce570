"""`/admin/logs`, `/admin/analytics` and `tollgate stats` on a node that served real calls.

Records reach the storage within the pipeline's flush interval; rollups within the rollup
sink's (10 s), or at shutdown. The analytics come from rollups only.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from conftest import Gateway, RunTollgate, StartGateway, Upstream

KEY = "sk-analytics"
ROLLUP_WAIT = 30.0


def configured(upstream: Upstream, tmp_path: Path) -> dict[str, Any]:
    config = upstream.config(workers=2)
    config["storage"] = f"sqlite:///{tmp_path / 'calls.db'}"
    config["consumers"] = [{"name": "acme", "keys": [KEY]}]
    config["services"][0]["policies"] = [{"key-auth": {}}]
    return config


async def calls(gateway: Gateway) -> list[tuple[int, str]]:
    async with aiohttp.ClientSession() as session:
        answers = []
        for index in range(30):
            headers = {"Authorization": f"Bearer {KEY}"} if index % 3 else {}
            async with session.get(gateway.url("/"), headers=headers) as reply:
                await reply.read()
                answers.append((reply.status, reply.headers["X-Request-Id"]))
        return answers


async def admin_json(gateway: Gateway, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.admin_url(path), headers=gateway.admin_headers()) as reply,
    ):
        return reply.status, await reply.json()


async def test_logs_analytics_and_stats_report_the_calls_made(
    upstream: Upstream,
    start_gateway: StartGateway,
    run_tollgate: RunTollgate,
    tmp_path: Path,
) -> None:
    config = configured(upstream, tmp_path)
    gateway = await start_gateway(config)
    answers = await calls(gateway)
    assert [status for status, _ in answers].count(401) == 10

    # Raw records, searchable by status and request id, paged. Wait for all of them: the
    # last calls may reach the storage a flush after the last 401 did.
    deadline = time.monotonic() + ROLLUP_WAIT
    while True:
        code, page = await admin_json(gateway, "/admin/logs?limit=1000")
        assert code == 200, page
        if len(page["records"]) == len(answers) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    code, page = await admin_json(gateway, "/admin/logs?status=4xx&limit=1000")
    assert len(page["records"]) == 10
    assert {r["status"] for r in page["records"]} == {401}
    wanted = answers[1][1]
    code, page = await admin_json(gateway, f"/admin/logs?request_id={wanted}")
    [record] = page["records"]
    assert (record["request_id"], record["status"], record["consumer"]) == (wanted, 200, "acme")
    code, first = await admin_json(gateway, "/admin/logs?limit=12")
    assert len(first["records"]) == 12 and first["next_cursor"]
    code, second = await admin_json(gateway, f"/admin/logs?limit=100&cursor={first['next_cursor']}")
    assert len(second["records"]) == 18 and second["next_cursor"] is None
    seen = {r["request_id"] for r in first["records"] + second["records"]}
    assert seen == {request_id for _, request_id in answers}

    code, body = await admin_json(gateway, "/admin/logs?stauts=500")
    assert code == 400 and body["error"]["type"] == "bad_query"
    assert "stauts" in body["error"]["message"]

    # Analytics, from rollups.
    while True:
        code, report = await admin_json(gateway, "/admin/analytics?start=10m")
        assert code == 200, report
        if report["count"] == 30 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert report["count"] == 30
    assert report["errors_4xx"] == 10
    assert abs(report["error_rate_4xx"] - 1 / 3) < 1e-9
    assert report["percentiles"]["p99"] is not None and report["percentiles"]["p99"] > 0
    assert {"consumer": "acme", "count": 20} in report["top_consumers"]
    assert report["top_routes"] == [{"service": "api", "route": "main", "count": 30}]
    code, report = await admin_json(gateway, "/admin/analytics?start=10m&consumer=acme")
    assert report["count"] == 20 and report["errors_4xx"] == 0

    gateway.send_signal(signal.SIGTERM)
    assert await gateway.wait_exit() == 0

    # The same from the terminal, with the gateway stopped.
    result = await run_tollgate("stats", "-c", "tollgate.yaml", "--since", "1h", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "calls        30" in result.stdout
    assert "4xx 33.33%" in result.stdout
    assert "api/main" in result.stdout
    result = await run_tollgate(
        "stats", "-c", "tollgate.yaml", "--consumer", "acme", "--json", cwd=tmp_path
    )
    assert json.loads(result.stdout)["count"] == 20
    result = await run_tollgate("stats", "-c", "tollgate.yaml", "--since", "soon", cwd=tmp_path)
    assert result.code == 1
    assert "start: 'soon' is not a time" in result.stderr
