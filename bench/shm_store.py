"""Cost of one rate-limit `hit` in the shared-memory store, against a worker's own dict.

    python bench/shm_store.py [-n 100000] [--directory /dev/shm]

Prints the mean microseconds per `hit` (best of 5 runs of N hits) for one limit (a token
bucket) and two limits (a token bucket and a fixed window on another key):

- single process: the per-worker `ProcessStore` (a dict, exact for one worker only), then the
  shared-memory store with its stripe locks and with `locking=False`;
- two processes hitting at once, on the same keys (one stripe: they take turns) and on keys
  of their own (other stripes: the locks cost only their system calls).

Every request is admitted (the limits are far above the traffic), so every hit also writes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from tollgate.ratelimit import FixedWindow, RateAlgorithm, TokenBucket
from tollgate.ratelimit.shm import SharedMemoryStore
from tollgate.ratelimit.store import ProcessStore

NOW = 1_700_000_000.0
REPEATS = 5
CAPACITY = 100_000

Limits = list[tuple[str, RateAlgorithm[Any]]]


def limits(count: int, owner: str = "acme") -> Limits:
    chosen: Limits = [(f"{owner}|bucket", TokenBucket(rate=1e9, burst=1_000_000_000))]
    if count == 2:
        chosen.append((f"{owner}|minute", FixedWindow(1_000_000_000, 60)))
    return chosen


def per_hit(hit: Callable[[Limits, float, int], Any], chosen: Limits, calls: int) -> float:
    """Microseconds per call, best of REPEATS runs of `calls` hits."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for index in range(calls):
            hit(chosen, NOW + index * 1e-6, 1)
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def contend(path: Path, owner: str, count: int, calls: int, start: Barrier, out: Any) -> None:
    with SharedMemoryStore.open(path) as store:
        chosen = limits(count, owner)
        start.wait()
        out.put(per_hit(store.hit, chosen, calls))


def two_processes(path: Path, count: int, calls: int, same_keys: bool) -> float:
    """Mean microseconds per hit of two processes hitting at once."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    out = context.Queue()
    owners = ["acme", "acme"] if same_keys else ["acme", "globex"]
    workers = [
        context.Process(target=contend, args=(path, owner, count, calls, start, out))
        for owner in owners
    ]
    for worker in workers:
        worker.start()
    results = [float(out.get()) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(results) / len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--calls", type=int, default=100_000)
    parser.add_argument("--directory", default="/dev/shm", help="where the store file goes")
    arguments = parser.parse_args()
    calls = arguments.calls

    counts = (1, 2)
    rows: list[tuple[str, list[float]]] = []
    process_store = ProcessStore()
    rows.append(
        (
            "ProcessStore (a dict, one worker)",
            [per_hit(process_store.hit, limits(n), calls) for n in counts],
        )
    )
    with tempfile.TemporaryDirectory(dir=arguments.directory) as directory:
        path = Path(directory) / "ratelimit.shm"
        for locking in (True, False):
            with SharedMemoryStore.create(path, CAPACITY, locking=locking) as store:
                timings = [per_hit(store.hit, limits(n), calls) for n in counts]
            rows.append((f"shared memory, locking={locking}", timings))
        SharedMemoryStore.create(path, CAPACITY).close()
        for same_keys, keys in ((True, "same keys"), (False, "own keys")):
            timings = [two_processes(path, n, calls, same_keys) for n in counts]
            rows.append((f"shared memory, 2 processes, {keys}", timings))

    print(f"µs per hit, best of {REPEATS} runs of {calls:,} hits, capacity {CAPACITY:,}")
    print(f"{'':40} {'1 limit':>8} {'2 limits':>9}")
    for name, (one, two) in rows:
        print(f"{name:40} {one:8.2f} {two:9.2f}")


if __name__ == "__main__":
    main()
