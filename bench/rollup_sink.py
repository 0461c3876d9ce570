"""CPU per call record aggregated by the rollups, in the writer thread's place.

    python bench/rollup_sink.py [-n 150000] [--batch 1000]

Feeds `-n` records of one route and consumer, 15,000 a second of record time, with log-normal
latencies, through `RollupSink.write` in batches of `--batch`, flushing (sketches built and
merged into the six tables of a fresh SQLite file) every five batches and at the end, and
prints the process CPU time per record. This is the rollups' share of a call in tollgate-full;
the SQLite sink's is bench/sqlite_sink.py's.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from tollgate.observe.database import SqliteDatabase
from tollgate.observe.records import COLUMNS, CallRecord, RecordRow
from tollgate.observe.rollups import RollupSink

START = 1.7e9


def records(count: int) -> list[RecordRow]:
    rng = random.Random(1)
    base = dict.fromkeys(COLUMNS)
    base.update(service="plain", route="json", consumer="bench", status=200, bytes_in=0)
    made = []
    for index in range(count):
        values = dict(base)
        values.update(
            time=START + index / 15_000,
            bytes_out=rng.randrange(100, 2000),
            total_ms=rng.lognormvariate(0.5, 0.5),
            gateway_ms=rng.lognormvariate(-2, 0.5),
            upstream_ms=rng.lognormvariate(0.3, 0.5),
        )
        made.append(tuple(CallRecord(**values)))  # a plain tuple, as the listener makes it
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=150_000)
    parser.add_argument("--batch", type=int, default=1_000)
    args = parser.parse_args()
    made = records(args.n)
    with tempfile.TemporaryDirectory() as directory:
        sink = RollupSink(SqliteDatabase(Path(directory) / "rollups.db"))
        started = time.process_time()
        for number, start in enumerate(range(0, len(made), args.batch)):
            sink.write(made[start : start + args.batch])
            if number % 5 == 4:
                sink.flush_now()
        sink.flush_now()
        spent = time.process_time() - started
        sink.close()
    print(f"{spent / len(made) * 1e6:.2f} us CPU per record (batches of {args.batch})")


if __name__ == "__main__":
    main()
