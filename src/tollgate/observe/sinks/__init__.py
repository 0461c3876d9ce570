"""Where call records go: every sink takes batches in the pipeline's writer thread.

A sink is an object with `write(batch)`, `flush()` and `close()`, called from one thread only
(the pipeline's writer), so it keeps its connection or file without locks. `write` either
takes the whole batch or raises: `SinkError` (or any other exception) asks the pipeline to
retry the batch later with backoff; `PermanentSinkError` says a retry cannot help (a
rejected payload), and the batch is counted as failed at once. A sink never retries by itself
with a sleep: that would stall the other sinks sharing the writer.

    sqlite    SqliteSink: the default, WAL, batched inserts, retention by age
    postgres  PostgresSink: COPY into a day-partitioned table, retention drops partitions
    jsonl     JsonlSink: JSON lines, rotated by size and count
    http      HttpSink: a JSON array per batch, POSTed
    stdout    StdoutSink: JSON lines on standard output
    rollups   RollupSink (in tollgate.observe.rollups): per-minute aggregates and sketches
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from tollgate.observe.records import RecordRow

__all__ = ["PermanentSinkError", "Sink", "SinkError"]


class SinkError(Exception):
    """A write that failed but may succeed later; `retry_after` (seconds) if the sink knows."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """A write that will fail again whatever the wait (e.g. the receiver rejected the payload)."""


class Sink(ABC):
    """Base of every sink; `name` labels its counters in the pipeline's stats and metrics."""

    name = "sink"

    @abstractmethod
    def write(self, batch: Sequence[RecordRow]) -> None:
        """Store every record of `batch`, or raise."""

    def flush(self) -> None:  # noqa: B027 - a default that does nothing, not abstract
        """Called after every round of writes (at least every `flush_interval`): push out what
        the sink holds back, if it is time to; a sink that holds nothing back does nothing."""

    def close(self) -> None:  # noqa: B027 - a default that does nothing, not abstract
        """Release the sink's connection or file; called once, from the writer thread."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
