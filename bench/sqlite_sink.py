"""CPU per call record written by the SQLite sink, in the writer thread's place.

    python bench/sqlite_sink.py [-n 20000] [--batch 500]

Writes `-n` distinct records (every column filled as a proxied call fills it) in batches of
`--batch` through `SqliteSink.write`, into a fresh file in a temporary directory, and prints
the process CPU time per record. This is the writer thread's share of a call in
tollgate-full (on the benchmark's single core it is taken from the request path's), apart
from building the record (bench/hotpath.py --records) and the rollups.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tollgate.observe.database import SqliteDatabase
from tollgate.observe.records import COLUMN_KINDS, COLUMNS, RecordRow
from tollgate.observe.sinks.sqlite import SqliteSink

SAMPLE = {"time": 1.7e9, "text": "plain", "int": 200, "real": 1.25, "json": None}


def records(count: int) -> list[RecordRow]:
    base = [SAMPLE[COLUMN_KINDS[name]] for name in COLUMNS]
    out = []
    for index in range(count):
        values = list(base)
        values[COLUMNS.index("time")] = 1.7e9 + index * 1e-4
        values[COLUMNS.index("request_id")] = f"{index:020x}"
        out.append(tuple(values))  # a plain tuple, as the listener makes it
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    made = records(args.n)
    with tempfile.TemporaryDirectory() as directory:
        sink = SqliteSink(SqliteDatabase(Path(directory) / "records.db"))
        started = time.process_time()
        for start in range(0, len(made), args.batch):
            sink.write(made[start : start + args.batch])
        spent = time.process_time() - started
        sink.close()
    print(
        f"{spent / len(made) * 1e6:.1f} us CPU per record "
        f"({len(COLUMNS)} fields, batches of {args.batch})"
    )


if __name__ == "__main__":
    main()
