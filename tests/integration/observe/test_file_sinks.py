from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from call_records import make_record

from tollgate.observe.records import record_from_dict, record_to_json
from tollgate.observe.sinks.jsonl import JsonlSink
from tollgate.observe.sinks.stdout import StdoutSink


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_jsonl_writes_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "calls.jsonl"
    sink = JsonlSink(path)
    records = [make_record(n) for n in range(3)]
    sink.write(records[:2])
    sink.write(records[2:])
    sink.close()
    assert [record_from_dict(data) for data in lines(path)] == records


def test_jsonl_rotates_by_size_and_keeps_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    line_size = len(record_to_json(make_record(0))) + 1
    sink = JsonlSink(path, max_bytes=3 * line_size, backup_count=2)
    records = [make_record(n) for n in range(10)]  # same-size lines: 3 a file
    sink.write(records[:4])
    sink.write(records[4:])
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["calls.jsonl", "calls.jsonl.1", "calls.jsonl.2"]
    ids = [[data["request_id"] for data in lines(tmp_path / name)] for name in files]
    assert ids == [
        ["req-000009"],
        ["req-000006", "req-000007", "req-000008"],
        ["req-000003", "req-000004", "req-000005"],
    ]  # records 0-2 went with the oldest backup
    assert all(p.stat().st_size <= 3 * line_size for p in tmp_path.iterdir())


def test_jsonl_appends_to_an_existing_file_and_counts_its_size(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    line_size = len(record_to_json(make_record(0))) + 1
    JsonlSink(path).write([make_record(0)])
    sink = JsonlSink(path, max_bytes=2 * line_size, backup_count=1)
    sink.write([make_record(1), make_record(2)])
    sink.close()
    assert [d["request_id"] for d in lines(path)] == ["req-000002"]
    assert [d["request_id"] for d in lines(tmp_path / "calls.jsonl.1")] == [
        "req-000000",
        "req-000001",
    ]


def test_jsonl_without_backups_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    sink = JsonlSink(path, max_bytes=10, backup_count=0)
    sink.write([make_record(n) for n in range(5)])
    sink.close()
    assert len(lines(path)) == 5 and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ValueError):
        JsonlSink(path, max_bytes=-1)


def test_stdout_sink_writes_json_lines() -> None:
    stream = io.BytesIO()
    sink = StdoutSink(stream)
    sink.write([make_record(1), make_record(2)])
    sink.close()
    assert [orjson.loads(line)["request_id"] for line in stream.getvalue().splitlines()] == [
        "req-000001",
        "req-000002",
    ]
