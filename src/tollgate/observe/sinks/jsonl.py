"""Call records as JSON lines in a file, rotated by size and count like `RotatingFileHandler`.

Each record is one line, `record_to_json`'s object (time as ISO 8601 UTC). When writing a
line would take the file past `max_bytes`, the file is rotated first: `calls.jsonl.1` becomes
`.2` and so on up to `backup_count` (the oldest is deleted), `calls.jsonl` becomes `.1`, and
a new file is started. Lines are never split across files; a line longer than `max_bytes`
gets a file of its own. With `max_bytes` or `backup_count` 0 the file never rotates.

One writer per file: rotation renames files under other processes' feet, so each worker
gets its own path (e.g. `calls-{worker}.jsonl`; the path is the owner's to choose).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final

from tollgate.observe.records import RecordRow, record_to_json
from tollgate.observe.sinks import Sink

__all__ = ["JsonlSink"]

DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUP_COUNT: Final = 5


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUP_COUNT,
    ) -> None:
        if max_bytes < 0 or backup_count < 0:
            raise ValueError("max_bytes and backup_count must not be negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
        self._size = self._file.tell()

    @property
    def _rotates(self) -> bool:
        return self.max_bytes > 0 and self.backup_count > 0

    def write(self, batch: Sequence[RecordRow]) -> None:
        pending: list[bytes] = []
        pending_size = 0
        for record in batch:
            line = record_to_json(record) + b"\n"
            used = self._size + pending_size
            if self._rotates and used > 0 and used + len(line) > self.max_bytes:
                self._file.write(b"".join(pending))
                pending, pending_size = [], 0
                self._rotate()
            pending.append(line)
            pending_size += len(line)
        self._file.write(b"".join(pending))
        self._file.flush()
        self._size += pending_size

    def _rotate(self) -> None:
        self._file.close()
        for number in range(self.backup_count - 1, 0, -1):
            source = self._backup(number)
            if source.exists():
                os.replace(source, self._backup(number + 1))
        os.replace(self.path, self._backup(1))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def _backup(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return (
            f"JsonlSink({str(self.path)!r}, size={self._size}, max_bytes={self.max_bytes}, "
            f"backup_count={self.backup_count})"
        )
