"""The default sink: call records in a SQLite table, one transaction per batch.

Rows go in with `executemany` inside one `BEGIN IMMEDIATE ... COMMIT`: a transaction per
batch, not per row, is what makes SQLite fast (one WAL append and no fsync per row with
`synchronous=NORMAL`). A record is its own row (`CallRecord` is a tuple) unless it carries
JSON fields, which are serialised here, in the writer thread.

Table `call_records`: an `id INTEGER PRIMARY KEY` (the rowid: a stable tiebreak for keyset
paging), then one column per `CallRecord` field, `time` as Unix seconds (REAL). Indexes serve
the logs explorer's filters together with its newest-first order: (time), (request_id),
(consumer, time), (route, time), (status, time).

Retention deletes by age in transactions of `RETENTION_CHUNK` rows, so that a large purge
never holds the write lock long enough to stall the workers' writers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Final

from tollgate.observe.database import SqliteDatabase, migrate
from tollgate.observe.records import COLUMN_KINDS, COLUMNS, CallRecord, encode_json_fields
from tollgate.observe.sinks import Sink

__all__ = ["RECORDS_TABLE", "SqliteSink", "delete_records_before", "ensure_records_schema"]

RECORDS_TABLE: Final = "call_records"
# Rows deleted per retention transaction: a few ms of lock each.
RETENTION_CHUNK: Final = 5_000

_TYPES: Final = {"time": "REAL", "text": "TEXT", "int": "INTEGER", "real": "REAL", "json": "TEXT"}
_REQUIRED: Final = frozenset({"time", "request_id"})


def _column(name: str) -> str:
    null = " NOT NULL" if name in _REQUIRED else ""
    return f"{name} {_TYPES[COLUMN_KINDS[name]]}{null}"


MIGRATIONS: Final = (
    (
        f"CREATE TABLE {RECORDS_TABLE} (id INTEGER PRIMARY KEY, "
        + ", ".join(_column(name) for name in COLUMNS)
        + ")",
        f"CREATE INDEX {RECORDS_TABLE}_time ON {RECORDS_TABLE} (time)",
        f"CREATE INDEX {RECORDS_TABLE}_request_id ON {RECORDS_TABLE} (request_id)",
        f"CREATE INDEX {RECORDS_TABLE}_consumer ON {RECORDS_TABLE} (consumer, time)",
        f"CREATE INDEX {RECORDS_TABLE}_route ON {RECORDS_TABLE} (route, time)",
        f"CREATE INDEX {RECORDS_TABLE}_status ON {RECORDS_TABLE} (status, time)",
    ),
)

_INSERT: Final = (
    f"INSERT INTO {RECORDS_TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)


def ensure_records_schema(database: SqliteDatabase, connection: sqlite3.Connection) -> None:
    migrate(database, connection, RECORDS_TABLE, MIGRATIONS)


class SqliteSink(Sink):
    """Writes batches of records to `call_records` in a SQLite file (made if missing)."""

    name = "sqlite"

    def __init__(self, database: SqliteDatabase) -> None:
        self.database = database
        self._connection = database.connect()
        ensure_records_schema(database, self._connection)

    def write(self, batch: Sequence[CallRecord]) -> None:
        with self.database.transaction(self._connection) as cursor:
            cursor.executemany(_INSERT, map(encode_json_fields, batch))

    def close(self) -> None:
        self._connection.close()

    def __repr__(self) -> str:
        return f"SqliteSink({self.database.path!r})"


def delete_records_before(database: SqliteDatabase, cutoff: float) -> int:
    """Delete records whose `time` is before `cutoff` (Unix seconds); how many were deleted."""
    connection = database.connect()
    deleted = 0
    try:
        ensure_records_schema(database, connection)
        while True:
            with database.transaction(connection) as cursor:
                cursor.execute(
                    f"DELETE FROM {RECORDS_TABLE} WHERE id IN "
                    f"(SELECT id FROM {RECORDS_TABLE} WHERE time < ? LIMIT ?)",
                    (cutoff, RETENTION_CHUNK),
                )
                count = cursor.rowcount
            deleted += count
            if count < RETENTION_CHUNK:
                return deleted
    finally:
        connection.close()
