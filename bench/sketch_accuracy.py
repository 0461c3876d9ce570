"""Latency sketch: how far are its percentiles from the exact ones, how big is it, what does
`add` cost?

    python bench/sketch_accuracy.py [--count N] [--seed S] [--alpha A]

Draws N latencies (1,000,000 by default, seeded) from a mix like a gateway's: 85% fast
upstream calls (lognormal, median 30 ms), 14% slow ones (lognormal, median 300 ms), 1% a
Pareto tail from 1 s capped at a 60 s timeout. Prints, for each percentile, the exact value
(rank floor(q * (N - 1)) of the sorted data) beside the sketch's and their relative error;
then the serialised size, the time of one `add` (best of 3 passes over the N values, loop
included), and what reading a rollup costs: merging 60 minute-sketches into an hour and one
`quantile`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from tollgate.observe.sketch import LatencySketch

PERCENTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999)
TIMEOUT_MS = 60_000.0
REPEATS = 3
MINUTES = 60


def latencies(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    values = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.85:
            values.append(rng.lognormvariate(math.log(30.0), 0.6))
        elif draw < 0.99:
            values.append(rng.lognormvariate(math.log(300.0), 0.7))
        else:
            values.append(min(1000.0 * rng.paretovariate(1.5), TIMEOUT_MS))
    return values


def seconds_per_add(values: list[float], alpha: float) -> float:
    best = math.inf
    for _ in range(REPEATS):
        add = LatencySketch(alpha).add
        started = time.perf_counter()
        for value in values:
            add(value)
        best = min(best, time.perf_counter() - started)
    return best / len(values)


def seconds_per_empty_loop(values: list[float]) -> float:
    best = math.inf
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _value in values:
            pass
        best = min(best, time.perf_counter() - started)
    return best / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.01)
    options = parser.parse_args()

    values = latencies(options.count, options.seed)
    ordered = sorted(values)
    sketch = LatencySketch(options.alpha)
    for value in values:
        sketch.add(value)

    print(f"{options.count:,} latencies, seed {options.seed}, relative accuracy {options.alpha}")
    print()
    print(f"{'percentile':>10}  {'exact ms':>12}  {'sketch ms':>12}  {'relative error':>14}")
    worst = 0.0
    for q in PERCENTILES:
        exact = ordered[math.floor(q * (len(ordered) - 1))]
        estimate = sketch.quantile(q)
        assert estimate is not None
        error = abs(estimate - exact) / exact
        worst = max(worst, error)
        print(
            f"{'P' + format(q * 100, 'g'):>10}  {exact:>12.3f}  {estimate:>12.3f}  {error:>14.5%}"
        )
    mean = sketch.mean
    assert mean is not None
    print(f"{'mean':>10}  {sum(values) / len(values):>12.3f}  {mean:>12.3f}")
    print(f"worst percentile error {worst:.5%} (bound {options.alpha:.2%})")
    print()

    buckets = len(sketch.to_dict()["buckets"])
    json_size = len(json.dumps(sketch.to_dict(), separators=(",", ":")))
    print(f"serialised: {len(sketch.to_bytes()):,} bytes (to_bytes), {json_size:,} bytes (JSON)")
    print(f"            for {buckets} buckets")

    per_add = seconds_per_add(values, options.alpha)
    loop = seconds_per_empty_loop(values)
    print(f"add: {per_add * 1e6:.3f} µs per call (of which the bench's loop {loop * 1e6:.3f} µs)")

    minutes = [LatencySketch(options.alpha) for _ in range(MINUTES)]
    for position, value in enumerate(values):
        minutes[position % MINUTES].add(value)
    started = time.perf_counter()
    hour = LatencySketch(options.alpha)
    for minute in minutes:
        hour.merge(minute)
    merged = time.perf_counter() - started
    started = time.perf_counter()
    hour.quantile(0.99)
    queried = time.perf_counter() - started
    print(f"merge of {MINUTES} minute-sketches: {merged * 1e3:.2f} ms")
    print(f"one quantile of the hour: {queried * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
