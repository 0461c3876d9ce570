from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from call_records import make_record

from tollgate.observe.pipeline import Backoff, LogPipeline
from tollgate.observe.sinks import PermanentSinkError, SinkError
from tollgate.observe.sinks.http import HttpSink


class Collector:
    """An aiohttp endpoint that answers the first `failures` POSTs with `status`."""

    def __init__(self, failures: int = 0, status: int = 503, retry_after: str | None = None):
        self.failures = failures
        self.status = status
        self.retry_after = retry_after
        self.attempts = 0
        self.batches: list[list[dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.accepted = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.headers.append(dict(request.headers))
        if self.attempts <= self.failures:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.status, text="not now", headers=headers)
        self.batches.append(await request.json())
        self.accepted.set()
        return web.Response(status=204)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(collector: Collector) -> str:
        app = web.Application()
        app.router.add_post("/ingest", collector.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/ingest"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_batch_is_posted_as_a_json_array(serve: Any) -> None:
    collector = Collector()
    url = await serve(collector)
    sink = HttpSink(url, headers={"Authorization": "Bearer t"})
    await asyncio.to_thread(sink.write, [make_record(1), make_record(2)])
    await asyncio.to_thread(sink.write, [make_record(3)])  # on the kept-alive connection
    sink.close()
    assert [[d["request_id"] for d in batch] for batch in collector.batches] == [
        ["req-000001", "req-000002"],
        ["req-000003"],
    ]
    assert collector.headers[0]["Content-Type"] == "application/json"
    assert collector.headers[0]["Authorization"] == "Bearer t"


async def test_a_failing_collector_is_retried_with_backoff_until_it_takes_the_batch(
    serve: Any,
) -> None:
    collector = Collector(failures=3, status=503)
    url = await serve(collector)
    pipeline = LogPipeline(
        [HttpSink(url)],
        flush_interval=0.01,
        backoff=Backoff(initial=0.02, factor=2.0, maximum=0.1, jitter=0.0),
    )
    pipeline.start()
    began = time.monotonic()
    for number in range(5):
        pipeline.put(make_record(number))
    await asyncio.wait_for(collector.accepted.wait(), 10)
    elapsed = time.monotonic() - began
    assert await pipeline.aclose()
    assert [d["request_id"] for d in collector.batches[0]] == [f"req-00000{n}" for n in range(5)]
    assert collector.attempts == 4
    assert elapsed >= 0.02 + 0.04 + 0.08  # three backoffs: 20, 40 and 80 ms
    stats = pipeline.stats().sinks[0]
    assert (stats.written, stats.errors, stats.failed) == (5, 3, 0)


async def test_retryable_and_permanent_answers(serve: Any) -> None:
    throttled = Collector(failures=1, status=429, retry_after="7")
    sink = HttpSink(await serve(throttled))
    with pytest.raises(SinkError) as raised:
        await asyncio.to_thread(sink.write, [make_record()])
    assert raised.value.retry_after == 7.0
    assert not isinstance(raised.value, PermanentSinkError)

    rejecting = Collector(failures=1, status=400)
    sink = HttpSink(await serve(rejecting))
    with pytest.raises(PermanentSinkError):
        await asyncio.to_thread(sink.write, [make_record()])


async def test_an_unreachable_collector_is_a_retryable_error() -> None:
    sink = HttpSink("http://127.0.0.1:9/ingest", timeout=1.0)
    with pytest.raises(SinkError) as raised:
        await asyncio.to_thread(sink.write, [make_record()])
    assert not isinstance(raised.value, PermanentSinkError)
    with pytest.raises(ValueError):
        HttpSink("ftp://example.com/x")
