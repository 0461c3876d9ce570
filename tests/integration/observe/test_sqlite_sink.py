from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from call_records import T0, generate_records, make_record

from tollgate.observe.database import SqliteDatabase, open_database
from tollgate.observe.pipeline import LogPipeline
from tollgate.observe.query import search_records
from tollgate.observe.records import COLUMNS, CallRecord, encode_json_fields
from tollgate.observe.rollups import DAY
from tollgate.observe.sinks.sqlite import (
    BLOCKS_TABLE,
    SqliteSink,
    delete_records_before,
    read_records,
)


@pytest.fixture
def database(tmp_path: Path) -> SqliteDatabase:
    return SqliteDatabase(tmp_path / "tollgate.db")


def rows(database: SqliteDatabase, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(database.path) as connection:
        return connection.execute(sql).fetchall()


def test_n_records_in_make_exactly_n_records_in_a_block_per_batch(
    database: SqliteDatabase,
) -> None:
    sink = SqliteSink(database)
    records = generate_records(2_345, seed=11)
    for start in range(0, len(records), 1_000):
        sink.write(records[start : start + 1_000])
    sink.close()
    assert list(read_records(database)) == records
    assert rows(database, f"SELECT count FROM {BLOCKS_TABLE} ORDER BY id") == [
        (1_000,),
        (1_000,),
        (345,),
    ]


def test_every_field_round_trips(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    record = make_record(5, request_body='{"a": 1}', tokens_in=3, cost=0.25, model="m")
    bare = make_record(6, policies=None, request_headers=None, response_headers=None)
    sink.write([record, bare])
    sink.close()
    page = search_records(database, limit=10)
    assert page.records == [bare, record]  # newest first
    assert list(read_records(database)) == [record, bare]


def test_plain_rows_as_the_listener_makes_them_are_written_like_records(
    database: SqliteDatabase,
) -> None:
    sink = SqliteSink(database)
    named = make_record(7, policies={"rate-limit": "allowed"}, cost=0.5)
    plain = tuple(make_record(8, request_headers=[["accept", "*/*"]]))
    assert type(plain) is tuple
    sink.write([plain, named])  # one block with both kinds
    sink.close()
    back = list(read_records(database))
    assert back == [CallRecord._make(plain), named]
    assert all(type(record) is CallRecord for record in back)


def test_a_block_row_holds_what_searches_skip_blocks_by(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    sink.write(
        [
            make_record(1, time=T0 + 5, status=200, consumer="acme", route="a", service="s"),
            make_record(2, time=T0 + 1, status=429, consumer=None, route="a", service="s"),
        ]
    )
    sink.close()
    ((t_min, t_max, count, statuses, consumers, routes, request_ids),) = rows(
        database,
        f"SELECT t_min, t_max, count, statuses, consumers, routes, request_ids FROM {BLOCKS_TABLE}",
    )
    assert (t_min, t_max, count) == (T0 + 1, T0 + 5, 2)
    assert sorted(str(statuses)[1:-1].split("\x1f")) == ["200", "429"]
    assert sorted(str(consumers)[1:-1].split("\x1f")) == ["", "acme"]
    assert routes == "\x1fa\x1f"
    assert request_ids == "\x1f" + "\x1f".join(make_record(n).request_id for n in (1, 2)) + "\x1f"


def test_the_database_is_in_wal_mode_with_its_index(database: SqliteDatabase) -> None:
    SqliteSink(database).close()
    assert rows(database, "PRAGMA journal_mode") == [("wal",)]
    indexes = {row[1] for row in rows(database, f"PRAGMA index_list({BLOCKS_TABLE})")}
    assert indexes == {f"{BLOCKS_TABLE}_t_max"}
    columns = [row[1] for row in rows(database, f"PRAGMA table_info({BLOCKS_TABLE})")]
    assert columns[-1] == "records"  # last: the filter columns are read without it
    assert rows(database, "SELECT component, version FROM tollgate_schema") == [(BLOCKS_TABLE, 1)]


def test_reopening_does_not_migrate_again(database: SqliteDatabase) -> None:
    SqliteSink(database).close()
    sink = SqliteSink(database)
    sink.write([make_record()])
    sink.close()
    assert len(list(read_records(database))) == 1


def test_retention_deletes_blocks_whose_records_are_all_older(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    for start in range(0, 12_000, 500):
        sink.write([make_record(n, time=T0 - 20 * DAY + n) for n in range(start, start + 500)])
    straddling = [make_record(1, time=T0 - 15 * DAY), make_record(2, time=T0 - 13 * DAY)]
    recent = [make_record(n, time=T0 - DAY + n) for n in range(50)]
    sink.write(straddling)
    sink.write(recent)
    sink.close()
    assert delete_records_before(database, T0 - 14 * DAY) == 12_000
    assert list(read_records(database)) == straddling + recent  # kept until all of it is old
    assert delete_records_before(database, T0 - 14 * DAY) == 0
    assert delete_records_before(database, T0 - 2 * DAY) == 2


def test_a_pipeline_into_sqlite_keeps_every_record(database: SqliteDatabase) -> None:
    pipeline = LogPipeline([SqliteSink(database)], flush_interval=0.01)
    pipeline.start()
    records = generate_records(5_000, seed=2)
    for record in records:
        assert pipeline.put(record)
    assert pipeline.close()
    assert list(read_records(database)) == records
    assert pipeline.stats().written == 5_000


def _legacy(database: SqliteDatabase, records: list[CallRecord]) -> None:
    """A storage file as an earlier version wrote it: a `call_records` row per record."""
    with sqlite3.connect(database.path) as connection:
        connection.execute(
            f"CREATE TABLE call_records (id INTEGER PRIMARY KEY, {', '.join(COLUMNS)})"
        )
        connection.execute("CREATE INDEX call_records_time ON call_records (time)")
        connection.executemany(
            f"INSERT INTO call_records ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})",
            map(encode_json_fields, records),
        )
        connection.execute(
            "CREATE TABLE tollgate_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        connection.execute("INSERT INTO tollgate_schema VALUES ('call_records', 1)")


def test_a_table_of_an_earlier_version_is_converted_and_nothing_is_lost(
    database: SqliteDatabase,
) -> None:
    records = generate_records(2_500, seed=5)
    records[7] = make_record(7, policies={"rate-limit": "per-minute"}, request_body="{}")
    _legacy(database, records)
    SqliteSink(database).close()
    assert list(read_records(database)) == records
    assert rows(database, "SELECT name FROM sqlite_master WHERE name LIKE 'call_records%'") == []
    assert rows(database, f"SELECT count FROM {BLOCKS_TABLE} ORDER BY id") == [
        (1_000,),
        (1_000,),
        (500,),
    ]
    assert rows(database, "SELECT component FROM tollgate_schema") == [(BLOCKS_TABLE,)]


def test_workers_converting_at_once_share_the_work(database: SqliteDatabase) -> None:
    records = generate_records(12_000, seed=6)
    _legacy(database, records)
    failures: list[BaseException] = []

    def start_a_sink() -> None:
        try:
            SqliteSink(database).close()
        except BaseException as exc:  # pragma: no cover - what the test looks for
            failures.append(exc)

    workers = [threading.Thread(target=start_a_sink) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
    assert sorted(read_records(database)) == sorted(records)  # each once, none lost


def test_search_merges_blocks_that_overlap_in_time(database: SqliteDatabase) -> None:
    # Two workers write blocks of the same seconds: a page is still exactly the newest
    # records of all of them, and paging visits every record once.
    first, second = SqliteSink(database), SqliteSink(database)
    records = [make_record(n, time=T0 + n * 0.5) for n in range(1_200)]
    for start in range(0, 1_200, 100):
        chunk = records[start : start + 100]
        first.write(chunk[0::2])
        second.write(chunk[1::2])
    first.close()
    second.close()
    newest_first = sorted(records, key=lambda record: record.time, reverse=True)
    seen = []
    cursor = None
    while True:
        page = search_records(database, limit=70, cursor=cursor)
        seen.extend(page.records)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == newest_first
    only = search_records(database, request_id=records[3].request_id)
    assert only.records == [records[3]] and only.next_cursor is None
    window = search_records(database, start=T0 + 100, end=T0 + 110, limit=1_000)
    assert window.records == [r for r in newest_first if T0 + 100 <= r.time < T0 + 110]


def test_storage_urls() -> None:
    relative = open_database("sqlite:///./data/tollgate.db")
    assert isinstance(relative, SqliteDatabase) and relative.path == "./data/tollgate.db"
    absolute = open_database("sqlite:////var/lib/tollgate.db")
    assert isinstance(absolute, SqliteDatabase) and absolute.path == "/var/lib/tollgate.db"
    assert open_database("postgresql://u:secret@db/x").kind == "postgres"
    assert "secret" not in repr(open_database("postgresql://u:secret@db/x"))
    with pytest.raises(ValueError):
        open_database("mysql://x")
