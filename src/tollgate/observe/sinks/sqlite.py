"""The default sink: call records in a SQLite file, one row per batch of records.

Why a row per batch, not per record: measured with `bench/sqlite_sink.py`, a row per record
with its 37 columns and the five indexes the logs explorer needs cost 20.5 µs of CPU per
record, most of it in keeping the indexes (a random request id lands anywhere in its
B-tree). The writer thread runs on the gateway's cores, so on a single core that was more
than half of what the whole gateway spent on a call. A batch as one row costs about 1.4 µs a
record: the records (plain tuples, see `tollgate.observe.records`) are encoded by orjson, in
C, and SQLite writes one row.

Table `call_record_blocks`, one row per batch the pipeline hands over (up to its
`batch_size` records, in arrival order):

- `id INTEGER PRIMARY KEY` (the rowid), `t_min`, `t_max` (Unix seconds, REAL: the oldest
  and newest record's `time`) and `count`;
- what the explorer filters on, as ``\\x1f``-delimited lists of the distinct values in the
  block (`statuses`, `services`, `routes`, `consumers`) and of every request id
  (`request_ids`): a search skips a block with one `instr` per filter, before decoding it;
- `records`: the block's records, a JSON array of arrays in `COLUMNS` order (JSON fields
  as JSON values), last so that the filters above are read without it.

One index, on `t_max`: a search reads blocks newest first and stops as soon as no record in
a further block can be newer than those it holds (`search_blocks`). A page costs a few blocks
decoded whatever the filters, and a request id is found by scanning its column, not by an
index that every record would pay for.

Retention deletes whole blocks, those whose newest record is older than the cutoff, in
transactions of `RETENTION_CHUNK` blocks, so that a purge never holds the write lock long.

A database written by an earlier version (a `call_records` table, a row per record) is
converted on first use, in transactions of one block, oldest first, and its table dropped:
nothing is lost on an upgrade.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from tollgate.observe.database import SqliteDatabase, migrate
from tollgate.observe.records import COLUMNS, TIME, CallRecord, RecordRow, decode_json_fields
from tollgate.observe.sinks import Sink

__all__ = [
    "BLOCKS_TABLE",
    "SqliteSink",
    "delete_records_before",
    "ensure_records_schema",
    "read_records",
    "search_blocks",
]

BLOCKS_TABLE: Final = "call_record_blocks"
# Blocks deleted per retention transaction (up to a batch of records each): a few ms of lock.
RETENTION_CHUNK: Final = 20
# Records per block when converting a table of an earlier version.
CONVERT_CHUNK: Final = 1_000
# Separates the values of a block's filter columns, and brackets them: `instr` on
# "\x1fvalue\x1f" finds a value, never a part of one.
SEP: Final = "\x1f"

_LEGACY_TABLE: Final = "call_records"

MIGRATIONS: Final = (
    (
        f"CREATE TABLE {BLOCKS_TABLE} (id INTEGER PRIMARY KEY, t_min REAL NOT NULL, "
        "t_max REAL NOT NULL, count INTEGER NOT NULL, statuses TEXT NOT NULL, "
        "services TEXT NOT NULL, routes TEXT NOT NULL, consumers TEXT NOT NULL, "
        "request_ids TEXT NOT NULL, records BLOB NOT NULL)",
        f"CREATE INDEX {BLOCKS_TABLE}_t_max ON {BLOCKS_TABLE} (t_max)",
    ),
)

_INSERT: Final = (
    f"INSERT INTO {BLOCKS_TABLE} (t_min, t_max, count, statuses, services, routes, consumers, "
    "request_ids, records) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_REQUEST_ID = COLUMNS.index("request_id")
_SERVICE = COLUMNS.index("service")
_ROUTE = COLUMNS.index("route")
_CONSUMER = COLUMNS.index("consumer")
_STATUS = COLUMNS.index("status")


def _listed(values: Iterable[object]) -> str:
    """`values` (None as "") as a delimited list: "\\x1fa\\x1fb\\x1f"."""
    return SEP + SEP.join("" if value is None else str(value) for value in values) + SEP


def encode_block(batch: Sequence[RecordRow]) -> tuple[Any, ...]:
    """The row of `batch` (at least one record) in `call_record_blocks`, without its id."""
    times = [record[TIME] for record in batch]
    return (
        min(times),
        max(times),
        len(batch),
        _listed({record[_STATUS] for record in batch}),
        _listed({record[_SERVICE] for record in batch}),
        _listed({record[_ROUTE] for record in batch}),
        _listed({record[_CONSUMER] for record in batch}),
        _listed([record[_REQUEST_ID] for record in batch]),
        # Rows from the listener are plain tuples, which orjson encodes natively; a
        # `CallRecord` (made by hand, or converted from an earlier table) goes through `tuple`.
        orjson.dumps(batch, default=tuple),
    )


def decode_block(data: bytes) -> list[CallRecord]:
    """The records of a block's `records` column."""
    return [CallRecord._make(values) for values in orjson.loads(data)]


def ensure_records_schema(database: SqliteDatabase, connection: sqlite3.Connection) -> None:
    """Make (or bring up to date) the records table; convert an earlier version's table."""
    migrate(database, connection, BLOCKS_TABLE, MIGRATIONS)
    if _has_legacy_table(connection):
        _convert_legacy(database, connection)


def _has_legacy_table(connection: sqlite3.Connection | sqlite3.Cursor) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_LEGACY_TABLE,)
    ).fetchone()
    return found is not None


def _convert_legacy(database: SqliteDatabase, connection: sqlite3.Connection) -> None:
    """Move the rows of a `call_records` table into blocks, oldest first, then drop it.

    Every worker's sink may start this at once: each chunk is read, written and deleted in
    one write transaction, and the table is looked for again in each, so the workers share
    the work, and the one that finds it gone stops."""
    columns = ", ".join(COLUMNS)
    while True:
        with database.transaction(connection) as cursor:
            if not _has_legacy_table(cursor):
                return
            rows = cursor.execute(
                f"SELECT id, {columns} FROM {_LEGACY_TABLE} ORDER BY id LIMIT ?",
                (CONVERT_CHUNK,),
            ).fetchall()
            if not rows:
                cursor.execute(f"DROP TABLE {_LEGACY_TABLE}")
                cursor.execute("DELETE FROM tollgate_schema WHERE component = ?", (_LEGACY_TABLE,))
                return
            records = [decode_json_fields(tuple(row[1:])) for row in rows]
            cursor.execute(_INSERT, encode_block(records))
            cursor.execute(f"DELETE FROM {_LEGACY_TABLE} WHERE id <= ?", (rows[-1][0],))


class SqliteSink(Sink):
    """Writes each batch of records as one row of `call_record_blocks` (file made if missing)."""

    name = "sqlite"

    def __init__(self, database: SqliteDatabase) -> None:
        self.database = database
        self._connection = database.connect()
        ensure_records_schema(database, self._connection)

    def write(self, batch: Sequence[RecordRow]) -> None:
        if not batch:
            return
        row = encode_block(batch)
        with self.database.transaction(self._connection) as cursor:
            cursor.execute(_INSERT, row)

    def close(self) -> None:
        self._connection.close()

    def __repr__(self) -> str:
        return f"SqliteSink({self.database.path!r})"


def read_records(
    database: SqliteDatabase, connection: sqlite3.Connection | None = None
) -> Iterator[CallRecord]:
    """Every record in the database, in the order the blocks were written."""
    own = connection is None
    conn = database.connect() if connection is None else connection
    try:
        ensure_records_schema(database, conn)
        for (data,) in conn.execute(f"SELECT records FROM {BLOCKS_TABLE} ORDER BY id"):
            yield from decode_block(data)
    finally:
        if own:
            conn.close()


def delete_records_before(database: SqliteDatabase, cutoff: float) -> int:
    """Delete the blocks whose newest record is before `cutoff` (Unix seconds); how many
    records they held. A block straddling the cutoff stays until all of it is older."""
    connection = database.connect()
    deleted = 0
    try:
        ensure_records_schema(database, connection)
        while True:
            with database.transaction(connection) as cursor:
                rows = cursor.execute(
                    f"SELECT id, count FROM {BLOCKS_TABLE} WHERE t_max < ? LIMIT ?",
                    (cutoff, RETENTION_CHUNK),
                ).fetchall()
                if rows:
                    cursor.executemany(
                        f"DELETE FROM {BLOCKS_TABLE} WHERE id = ?", [(row[0],) for row in rows]
                    )
            deleted += sum(int(row[1]) for row in rows)
            if len(rows) < RETENTION_CHUNK:
                return deleted
    finally:
        connection.close()


# -- search ------------------------------------------------------------------------------------

# A record's place in the newest-first order: (time, block id, position in the block).
RecordKey = tuple[float, int, int]


@dataclass(frozen=True, slots=True)
class StatusMatch:
    """A status filter: one code, or a class ("4xx": `low` 400, `high` 500)."""

    low: int
    high: int

    @property
    def needle(self) -> str:
        """What a block's `statuses` must contain to hold a match."""
        if self.high == self.low + 1:
            return f"{SEP}{self.low}{SEP}"
        return f"{SEP}{self.low // 100}"


def search_blocks(
    connection: sqlite3.Connection,
    *,
    start: float | None,
    end: float | None,
    status: StatusMatch | None,
    equal: dict[str, str],
    limit: int,
    before: RecordKey | None,
) -> tuple[list[CallRecord], RecordKey | None]:
    """Up to `limit` records newest first (time, then block, then position, descending),
    older than `before` when given, matching every filter (`equal`: service, route, consumer,
    request_id); and the key of the last one returned when more match."""
    clauses = ""
    params: list[Any] = []
    if start is not None:
        clauses += " AND t_max >= ?"
        params.append(start)
    if end is not None:
        clauses += " AND t_min < ?"
        params.append(end)
    if before is not None:
        clauses += " AND t_min <= ?"
        params.append(before[0])
    if status is not None:
        clauses += " AND instr(statuses, ?) > 0"
        params.append(status.needle)
    for name, value in equal.items():
        clauses += f" AND instr({_FILTER_COLUMNS[name]}, ?) > 0"
        params.append(f"{SEP}{value}{SEP}")
    checks = [(COLUMNS.index(name), value) for name, value in equal.items()]
    found: list[tuple[RecordKey, CallRecord]] = []
    wanted = limit + 1
    blocks = connection.execute(
        f"SELECT id, t_max, records FROM {BLOCKS_TABLE} WHERE 1 = 1{clauses} "
        "ORDER BY t_max DESC, id DESC",
        params,
    )
    try:
        for block_id, t_max, data in blocks:
            if len(found) >= wanted and t_max < found[-1][0][0]:
                break  # every record from here on is older than the page
            for position, record in enumerate(decode_block(data)):
                moment = record.time
                if (start is not None and moment < start) or (end is not None and moment >= end):
                    continue
                if status is not None and not status.low <= record.status < status.high:
                    continue
                if any(record[index] != value for index, value in checks):
                    continue
                key = (moment, block_id, position)
                if before is not None and key >= before:
                    continue
                found.append((key, record))
            found.sort(key=_first, reverse=True)
            del found[wanted:]
    finally:
        blocks.close()
    page = found[:limit]
    more = len(found) > limit
    return [record for _, record in page], (page[-1][0] if more and page else None)


_FILTER_COLUMNS: Final = {
    "service": "services",
    "route": "routes",
    "consumer": "consumers",
    "request_id": "request_ids",
}


def _first(item: tuple[RecordKey, CallRecord]) -> RecordKey:
    return item[0]
