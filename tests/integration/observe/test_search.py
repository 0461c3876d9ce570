from __future__ import annotations

import pytest
from call_records import T0, make_record

from tollgate.observe.database import Database, PostgresDatabase
from tollgate.observe.query import search_records
from tollgate.observe.records import CallRecord
from tollgate.observe.sinks.postgres import PostgresSink
from tollgate.observe.sinks.sqlite import SqliteSink


def store(database: Database, records: list[CallRecord]) -> None:
    sink = (
        PostgresSink(database) if isinstance(database, PostgresDatabase) else SqliteSink(database)
    )  # type: ignore[arg-type]
    sink.write(records)
    sink.close()


def mixed() -> list[CallRecord]:
    records = []
    for number in range(250):
        records.append(
            make_record(
                number,
                time=T0 + number // 2,  # pairs share a time: the id breaks the tie
                status=(200, 401, 429, 502)[number % 4],
                consumer=("acme", "globex", None)[number % 3],
                route=("list-orders", "get-order")[number % 2],
            )
        )
    return records


def test_pages_cover_every_record_once_newest_first(database: Database) -> None:
    records = mixed()
    store(database, records)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = search_records(database, limit=100, cursor=cursor)
        pages += 1
        seen.extend(record.request_id for record in page.records)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3
    assert seen == [r.request_id for r in reversed(records)]


@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        ({"status": 401}, lambda r: r.status == 401),
        ({"status": "5xx"}, lambda r: r.status >= 500),
        ({"status": "4XX"}, lambda r: 400 <= r.status < 500),
        ({"consumer": "globex"}, lambda r: r.consumer == "globex"),
        (
            {"route": "get-order", "status": 200},
            lambda r: r.route == "get-order" and r.status == 200,
        ),
        ({"request_id": "req-000042"}, lambda r: r.request_id == "req-000042"),
        ({"start": T0 + 10, "end": T0 + 20}, lambda r: T0 + 10 <= r.time < T0 + 20),
    ],
)
def test_filters(database: Database, filters: dict[str, object], keep: object) -> None:
    records = mixed()
    store(database, records)
    page = search_records(database, limit=1_000, **filters)  # type: ignore[arg-type]
    expected = [r for r in reversed(records) if keep(r)]  # type: ignore[operator]
    assert [r.request_id for r in page.records] == [r.request_id for r in expected]
    assert page.next_cursor is None


def test_paging_with_a_filter_and_bad_input(database: Database) -> None:
    store(database, mixed())
    first = search_records(database, consumer="acme", limit=30)
    second = search_records(database, consumer="acme", limit=30, cursor=first.next_cursor)
    ids = [r.request_id for r in first.records + second.records]
    assert len(ids) == len(set(ids)) == 60
    assert all(r.consumer == "acme" for r in first.records + second.records)
    with pytest.raises(ValueError, match="cursor"):
        search_records(database, cursor="not-a-cursor")
    with pytest.raises(ValueError, match="status"):
        search_records(database, status="teapot")
