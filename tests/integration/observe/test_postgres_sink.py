from __future__ import annotations

import psycopg
import pytest
from call_records import T0, generate_records, make_record

from tollgate.observe.database import PostgresDatabase
from tollgate.observe.query import search_records
from tollgate.observe.retention import apply_retention
from tollgate.observe.rollups import DAY
from tollgate.observe.sinks.postgres import PostgresSink, drop_partitions_before


@pytest.fixture
def database(postgres_dsn: str) -> PostgresDatabase:
    return PostgresDatabase(postgres_dsn)


def query(database: PostgresDatabase, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database.dsn) as connection:
        return connection.execute(sql).fetchall()


def partitions(database: PostgresDatabase) -> list[str]:
    return [
        row[0]  # type: ignore[misc]
        for row in query(
            database,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'call_records' "
            "ORDER BY 1",
        )
    ]


def test_copy_of_n_records_makes_exactly_n_rows(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    records = generate_records(3_000, start=T0, seconds=3_600, seed=4)
    for start in range(0, len(records), 1_000):
        sink.write(records[start : start + 1_000])
    sink.close()
    assert query(database, "SELECT COUNT(*) FROM call_records") == [(3_000,)]
    assert query(database, "SELECT COUNT(DISTINCT request_id) FROM call_records") == [(3_000,)]


def test_every_field_round_trips(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    record = make_record(5, time=T0 + 0.123456, request_body='{"a": 1}', tokens_in=3, cost=0.25)
    bare = make_record(6, policies=None, request_headers=None, response_headers=None)
    sink.write([record, bare])
    sink.close()
    page = search_records(database, limit=10)
    assert page.records == [bare, record]
    assert query(database, "SELECT policies->>'rate-limit' FROM call_records WHERE id = 1") == [
        ("allowed",)
    ]


def test_records_spanning_two_days_land_in_two_partitions(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    before, after = T0 - 10.0, T0 + 10.0  # either side of 2026-01-01T00:00Z
    sink.write(
        [make_record(1, time=before), make_record(2, time=after), make_record(3, time=after)]
    )
    sink.close()
    assert partitions(database) == ["call_records_20251231", "call_records_20260101"]
    assert query(database, "SELECT COUNT(*) FROM call_records_20251231") == [(1,)]
    assert query(database, "SELECT COUNT(*) FROM call_records_20260101") == [(2,)]


def test_two_sinks_racing_for_a_new_day_both_write(database: PostgresDatabase) -> None:
    first, second = PostgresSink(database), PostgresSink(database)
    first.write([make_record(1)])
    second.write([make_record(2)])  # its cache did not know of the partition: IF NOT EXISTS
    first.close()
    second.close()
    assert query(database, "SELECT COUNT(*) FROM call_records") == [(2,)]


def test_retention_drops_whole_old_partitions(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    sink.write([make_record(day, time=T0 + day * DAY + 60) for day in range(5)])
    assert len(partitions(database)) == 5
    # Cut through day 3: days 0-2 end before it and go, day 3 stays whole.
    dropped = drop_partitions_before(database, T0 + 3 * DAY + 3_600)
    assert dropped == ["call_records_20260101", "call_records_20260102", "call_records_20260103"]
    assert partitions(database) == ["call_records_20260104", "call_records_20260105"]
    assert query(database, "SELECT COUNT(*) FROM call_records") == [(2,)]
    # The sink learns of the dropped partition when it writes into that day again.
    with pytest.raises(Exception, match="partition"):
        sink.write([make_record(9, time=T0 + 60)])
    sink.write([make_record(9, time=T0 + 60)])
    sink.close()


def test_apply_retention_runs_on_postgres(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    sink.write([make_record(1, time=T0 - 30 * DAY), make_record(2, time=T0)])
    sink.close()
    result = apply_retention(database, now=T0, records_days=14)
    assert result.partitions_dropped == ("call_records_20251202",)
    assert query(database, "SELECT COUNT(*) FROM call_records") == [(1,)]


def test_a_sink_reconnects_after_its_connection_is_killed(database: PostgresDatabase) -> None:
    sink = PostgresSink(database)
    sink.write([make_record(1)])
    query(
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    with pytest.raises(psycopg.OperationalError):
        sink.write([make_record(2)])  # the pipeline retries this batch later
    sink.write([make_record(2)])
    sink.close()
    assert query(database, "SELECT COUNT(*) FROM call_records") == [(2,)]
