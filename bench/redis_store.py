"""Client CPU of one rate-limit `hit` in the Redis store, with many requests in flight.

    python bench/redis_store.py [-n 100000] [--callers 64] [--url redis://...] [--loop uvloop]

Starts a throwaway `redis-server` on a free port (unless `--url` names one), then runs
`--callers` tasks that each `hit` in a loop, all at once, like a gateway worker with that many
requests in flight. Prints, for one limit (a sliding window) and for two (a token bucket and a
fixed window on the same client):

- µs of client CPU per hit (`time.process_time` of this process only: the server's CPU is not
  counted), the figure that caps one core's requests per second;
- hits per second of wall time (the server shares the machine, so this is a floor);
- socket writes per hit: how many calls each coalesced write carried.

Every request is admitted (limits far above the traffic), so every hit also writes its state.
The time is the server's (no clock given), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tollgate.ratelimit import FixedWindow, RateAlgorithm, SlidingWindowCounter, TokenBucket
from tollgate.ratelimit.redis_store import RedisStore

Limits = list[tuple[str, RateAlgorithm[Any]]]

HUGE = 1_000_000_000


def limits(count: int) -> Limits:
    client = "consumer=acme"
    if count == 1:
        return [(f"rate-limit|bench/route|minute|fp|{client}", SlidingWindowCounter(HUGE, 60))]
    return [
        (f"rate-limit|bench/route|second|fp|{client}", TokenBucket(rate=1e9, burst=HUGE)),
        (f"rate-limit|bench/route|hour|fp|{client}", FixedWindow(HUGE, 3600)),
    ]


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt install redis-server), or pass --url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        arguments = [binary, "--port", str(port), "--bind", "127.0.0.1"]
        arguments += ["--save", "", "--appendonly", "no", "--dir", directory]
        process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                        connection.sendall(b"PING\r\n")
                        if connection.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait()


async def run(url: str, count: int, hits: int, callers: int) -> tuple[float, float, float]:
    """(µs of client CPU per hit, hits per second, writes per hit)."""
    store = RedisStore(url, timeout=1.0)
    await store.connect()
    chosen = limits(count)
    each = hits // callers

    async def caller() -> None:
        for _ in range(each):
            await store.hit(chosen, 1)

    try:
        await asyncio.gather(*(caller() for _ in range(callers)))  # warm up
        await store.reset(chosen[0][0])
        writes = store.client.writes
        cpu = time.process_time()
        wall = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        done = each * callers
        return cpu / done * 1e6, done / wall, (store.client.writes - writes) / done
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--hits", type=int, default=100_000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--url", help="a Redis to use instead of starting one")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    options = parser.parse_args()
    loops = ["asyncio", "uvloop"] if options.loop == "both" else [options.loop]

    def report(url: str) -> None:
        print(f"{options.hits:,} hits, {options.callers} callers in flight, server time")
        for loop in loops:
            for count in (1, 2):
                coroutine = run(url, count, options.hits, options.callers)
                if loop == "uvloop":
                    import uvloop

                    cpu, rate, writes = uvloop.run(coroutine)
                else:
                    cpu, rate, writes = asyncio.run(coroutine)
                print(
                    f"  {loop:8} {count} limit{'s' if count > 1 else ' '}: "
                    f"{cpu:5.1f} µs client CPU/hit  {rate:8,.0f} hits/s  "
                    f"{writes:.3f} writes/hit ({1 / writes:.0f} calls per write)"
                )

    if options.url:
        report(options.url)
    else:
        with redis_server() as url:
            report(url)


if __name__ == "__main__":
    main()
