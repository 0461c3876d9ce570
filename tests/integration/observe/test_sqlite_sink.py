from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from call_records import T0, generate_records, make_record

from tollgate.observe.database import SqliteDatabase, open_database
from tollgate.observe.pipeline import LogPipeline
from tollgate.observe.records import COLUMNS
from tollgate.observe.rollups import DAY
from tollgate.observe.sinks.sqlite import SqliteSink, delete_records_before


@pytest.fixture
def database(tmp_path: Path) -> SqliteDatabase:
    return SqliteDatabase(tmp_path / "tollgate.db")


def rows(database: SqliteDatabase, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(database.path) as connection:
        return connection.execute(sql).fetchall()


def test_n_records_in_make_exactly_n_rows(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    records = generate_records(2_345, seed=11)
    for start in range(0, len(records), 1_000):
        sink.write(records[start : start + 1_000])
    sink.close()
    assert rows(database, "SELECT COUNT(*) FROM call_records") == [(2_345,)]
    stored = rows(database, "SELECT request_id FROM call_records ORDER BY id")
    assert [row[0] for row in stored] == [record.request_id for record in records]


def test_every_field_round_trips(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    record = make_record(5, request_body='{"a": 1}', tokens_in=3, cost=0.25, model="m")
    bare = make_record(6, policies=None, request_headers=None, response_headers=None)
    sink.write([record, bare])
    sink.close()
    from tollgate.observe.query import search_records

    page = search_records(database, limit=10)
    assert page.records == [bare, record]  # newest first


def test_the_database_is_in_wal_mode_with_the_indexes(database: SqliteDatabase) -> None:
    SqliteSink(database).close()
    assert rows(database, "PRAGMA journal_mode") == [("wal",)]
    indexes = {row[1] for row in rows(database, "PRAGMA index_list(call_records)")}
    assert {
        "call_records_time",
        "call_records_request_id",
        "call_records_consumer",
        "call_records_route",
        "call_records_status",
    } <= indexes
    columns = [row[1] for row in rows(database, "PRAGMA table_info(call_records)")]
    assert columns == ["id", *COLUMNS]
    assert rows(database, "SELECT component, version FROM tollgate_schema") == [("call_records", 1)]


def test_reopening_does_not_migrate_again(database: SqliteDatabase) -> None:
    SqliteSink(database).close()
    sink = SqliteSink(database)
    sink.write([make_record()])
    sink.close()
    assert rows(database, "SELECT COUNT(*) FROM call_records") == [(1,)]


def test_retention_deletes_only_older_rows(database: SqliteDatabase) -> None:
    sink = SqliteSink(database)
    old = [make_record(n, time=T0 - 20 * DAY + n) for n in range(12_000)]
    recent = [make_record(n, time=T0 - DAY + n) for n in range(50)]
    sink.write(old)
    sink.write(recent)
    sink.close()
    assert delete_records_before(database, T0 - 14 * DAY) == 12_000
    assert rows(database, "SELECT COUNT(*), MIN(time) FROM call_records") == [(50, T0 - DAY)]
    assert delete_records_before(database, T0 - 14 * DAY) == 0


def test_a_pipeline_into_sqlite_writes_one_row_per_record(database: SqliteDatabase) -> None:
    pipeline = LogPipeline([SqliteSink(database)], flush_interval=0.01)
    pipeline.start()
    for record in generate_records(5_000, seed=2):
        assert pipeline.put(record)
    assert pipeline.close()
    assert rows(database, "SELECT COUNT(*) FROM call_records") == [(5_000,)]
    assert pipeline.stats().written == 5_000


def test_storage_urls() -> None:
    relative = open_database("sqlite:///./data/tollgate.db")
    assert isinstance(relative, SqliteDatabase) and relative.path == "./data/tollgate.db"
    absolute = open_database("sqlite:////var/lib/tollgate.db")
    assert isinstance(absolute, SqliteDatabase) and absolute.path == "/var/lib/tollgate.db"
    assert open_database("postgresql://u:secret@db/x").kind == "postgres"
    assert "secret" not in repr(open_database("postgresql://u:secret@db/x"))
    with pytest.raises(ValueError):
        open_database("mysql://x")
