"""CPU cost of one proxied request in the gateway's own code, without sockets.

Feeds a request into a `ClientConnection` and the upstream's answer into the pooled
`UpstreamConnection`, through fake transports that only collect bytes, and reports the mean
microseconds per request. What it leaves out is the event loop and the four system calls
every proxied request costs (read, write upstream, read upstream, write): that part is the
same for any design, so this number is the one to drive down.

With `--records`, every request also makes its call record and queues it on a running log
pipeline, as with `logs.enabled` (the default). The time is the process's CPU time, so it
counts the writer thread's share (taking batches, freeing records) too; its sink writes
nothing, so what a real sink costs (SQL, files) is left out, as the sockets are.

With `--tracing [RATIO]`, tracing is on (`tracing.sampling_ratio` RATIO, default 1): every
request gets its trace context and `traceparent`, and every sampled one its spans, built and
handed to a batch processor whose exporter encodes each batch as OTLP protobuf and drops it
(the network is left out). Spans are built as each request ends (no event loop turns here),
and the processor thread's encoding is counted in the CPU time too.

    python bench/hotpath.py [--keyauth] [--ratelimit [local|process]] [--post] [--records]
                            [--tracing [RATIO]] [-n 100000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from typing import Any

from tollgate.config.loader import parse_config_data
from tollgate.config.schema import TracingSettings
from tollgate.http.server import ClientConnection
from tollgate.http.upstream import UpstreamConnection
from tollgate.observe.pipeline import LogPipeline
from tollgate.observe.recorder import CallRecorder
from tollgate.observe.sinks import Sink
from tollgate.observe.tracing import Tracing
from tollgate.ratelimit.shm import SharedMemoryStore
from tollgate.runtime.runtime import PoolRegistry, compile_config
from tollgate.runtime.worker import WorkerState

GET = (
    b"GET /json HTTP/1.1\r\nHost: 127.0.0.1:18201\r\nAuthorization: Bearer sk-bench-master\r\n\r\n"
)
POST = (
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:18201\r\n"
    b"Authorization: Bearer sk-bench-master\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1024\r\n\r\n" + b"x" * 1024
)
BODY = b'{"id":"a1b2c3d4","status":"ok"}' + b" " * 268
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 19:44:54 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
    % len(BODY)
) + BODY


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


RATE_LIMIT = {
    "rate-limit": {
        "limits": [
            {"name": "per-minute", "algorithm": "sliding-window", "limit": 10**9, "window": "60s"}
        ],
        "by": "consumer",
    }
}


class NullSink(Sink):
    name = "null"

    def write(self, batch: Any) -> None:
        pass


def encoding_exporter() -> Any:
    """A span exporter that encodes each batch as OTLP/HTTP would, and sends nothing."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class EncodingExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    return EncodingExporter()


def build(
    keyauth: bool,
    ratelimit: str | None = None,
    pipeline: LogPipeline | None = None,
    tracing: Tracing | None = None,
) -> tuple[ClientConnection, FakeTransport, FakeTransport]:
    policies: list[dict[str, Any]] = [{"key-auth": {}}] if keyauth else []
    if ratelimit:
        policies.append({"rate-limit": {**RATE_LIMIT["rate-limit"], "store": ratelimit}})
    config = parse_config_data(
        {
            "upstreams": [{"name": "mock", "targets": [{"url": "http://127.0.0.1:18181"}]}],
            "services": [
                {
                    "name": "plain",
                    "upstream": "mock",
                    "routes": [
                        {"name": "json", "paths": ["/json"], "methods": ["GET"]},
                        {"name": "echo", "paths": ["/echo"], "methods": ["POST"]},
                    ],
                    "policies": policies,
                }
            ],
            "consumers": [{"name": "bench", "keys": ["sk-bench-master"]}],
        }
    )
    pools = PoolRegistry()
    runtime = compile_config(config, pools, shared_store=node_store)
    recorder = None
    if pipeline is not None:
        recorder = CallRecorder(pipeline.put, node="bench", worker=0)
    state = WorkerState(runtime, pools, recorder)
    state.tracing = tracing
    client = ClientConnection(state)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    pool = runtime.upstreams["mock"].targets[0].pool
    upstream = UpstreamConnection(pool)
    upstream_transport = FakeTransport()
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    pool.open.add(upstream)
    pool.release(upstream)
    return client, client_transport, upstream_transport


def node_store() -> SharedMemoryStore:
    """The node-wide store of `store: local`, in a file of its own (as the supervisor makes)."""
    global _NODE_STORE
    if _NODE_STORE is None:
        path = os.path.join(tempfile.mkdtemp(prefix="tollgate-hotpath-"), "ratelimit.shm")
        _NODE_STORE = SharedMemoryStore.create(path, 65536)
    return _NODE_STORE


_NODE_STORE: SharedMemoryStore | None = None


def run(
    n: int,
    keyauth: bool,
    post: bool,
    ratelimit: str | None = None,
    records: bool = False,
    tracing_ratio: float | None = None,
) -> float:
    # A queue with room for the whole run: a full one would measure the cheaper drop.
    pipeline = LogPipeline([NullSink()], capacity=n) if records else None
    if pipeline is not None:
        pipeline.start()
    tracing = None
    if tracing_ratio is not None:
        settings = TracingSettings(enabled=True, sampling_ratio=tracing_ratio, queue=4 * n)
        tracing = Tracing(settings, exporter=encoding_exporter())
    client, client_transport, _ = build(keyauth, ratelimit, pipeline, tracing)
    request = POST if post else GET
    pool = client.state.runtime.upstreams["mock"].targets[0].pool
    upstream = pool.acquire_idle()
    assert upstream is not None
    pool.release(upstream)
    feed_client = client.data_received
    feed_upstream = upstream.data_received
    start = time.process_time()
    for _ in range(n):
        feed_client(request)
        feed_upstream(RESPONSE)
    if pipeline is not None:
        pipeline.close()  # the writer's last batches count too
    if tracing is not None:
        tracing.provider.shutdown()  # the processor's last batches count too
    elapsed = time.process_time() - start
    assert b" 200 OK" in client_transport.written[-1], client_transport.written[-1][:200]
    assert len(client_transport.written) == n, len(client_transport.written)
    return elapsed / n * 1e6


async def main(args: argparse.Namespace) -> None:
    options = (args.keyauth, args.post, args.ratelimit, args.records, args.tracing)
    run(2000, *options)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(args.n, *options)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    best = min(run(args.n, *options) for _ in range(3))
    kind = ("POST 1 KiB" if args.post else "GET") + (" + key-auth" if args.keyauth else "")
    kind += f" + rate-limit ({args.ratelimit} store)" if args.ratelimit else ""
    kind += " + call record" if args.records else ""
    kind += f" + tracing (ratio {args.tracing})" if args.tracing is not None else ""
    print(f"{kind}: {best:.2f} us per proxied request (gateway code only, best of 3)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--keyauth", action="store_true")
    parser.add_argument("--post", action="store_true")
    parser.add_argument(
        "--ratelimit",
        nargs="?",
        const="local",
        choices=["local", "process"],
        help="add one sliding-window limit, counted in the node's store (local) or per worker",
    )
    parser.add_argument(
        "--records", action="store_true", help="make and queue a call record per request"
    )
    parser.add_argument(
        "--tracing",
        nargs="?",
        type=float,
        const=1.0,
        help="trace every request, sampling this ratio of them (default 1)",
    )
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))
