"""Call records in a worker: what the listener calls when an exchange ends, and the pipeline,
sinks and retention behind it, built from the `logs` section of the config.

The listener's side is `CallRecorder.record(exchange)`, called once per exchange at the one
place it ends (see `tollgate.http.server`). For a service that captures nothing beyond the
defaults, that is one `exchange_record` (`from_exchange` with positional arguments only: a
single tuple allocation) and one `LogPipeline.put` (a length check and a `deque.append`); a
query string is decoded and searched for credential-like names, and redacted only when one
could be there. Captures (headers, bodies) run only for services that opted in. Nothing here
serialises, locks or does I/O: the writer thread does all of that, in batches.

`WorkerLogs` owns the rest for one worker process. It is built when the worker starts serving
(in the worker process: the writer is a thread, and threads do not survive `fork`), and
closed after the last connection is gone, so that the records of exchanges cut short by the
shutdown are written too. Sinks that connect or open files are made by the writer thread on
their first batch (`DeferredSink`): connecting and migrating a database never runs on the
event loop, and a database that is down when the worker starts costs records (retried with
the pipeline's backoff), not the gateway's start. Worker 0 alone applies retention, hourly,
in a thread: every worker would delete the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tollgate.observe.database import Database, PostgresDatabase, SqliteDatabase, open_database
from tollgate.observe.pipeline import LogPipeline
from tollgate.observe.records import RecordRow, exchange_record, from_exchange
from tollgate.observe.redaction import (
    CapturePolicy,
    capture_body,
    query_for_record,
    redact_headers,
)
from tollgate.observe.retention import RetentionResult, apply_retention
from tollgate.observe.rollups import DAY, RollupSink
from tollgate.observe.sinks import Sink
from tollgate.observe.sinks.http import HttpSink
from tollgate.observe.sinks.jsonl import JsonlSink
from tollgate.observe.sinks.postgres import PostgresSink
from tollgate.observe.sinks.sqlite import SqliteSink
from tollgate.observe.sinks.stdout import StdoutSink

if TYPE_CHECKING:
    from tollgate.config.schema import LogsSettings
    from tollgate.http.exchange import Exchange

__all__ = ["CallRecorder", "DeferredSink", "WorkerLogs", "build_sinks", "jsonl_path"]

log = logging.getLogger("tollgate.observe")

# Retention: first pass a minute after start (not during it), then hourly.
RETENTION_FIRST_DELAY: Final = 60.0
RETENTION_INTERVAL: Final = 3600.0


class CallRecorder:
    """Turns finished exchanges into call records on a pipeline; one per worker."""

    __slots__ = ("node", "put", "wall_offset", "worker")

    def __init__(self, put: Callable[[RecordRow], bool], *, node: str, worker: int) -> None:
        self.put = put
        self.node = node
        self.worker = worker
        self.wall_offset = 0.0
        self.sync_clock()

    def sync_clock(self) -> None:
        """Exchanges keep monotonic times, records wall-clock ones: re-read the difference
        (the worker does, every few seconds, so that a clock step shows up quickly)."""
        self.wall_offset = time.time() - time.monotonic()

    def record(self, ex: Exchange) -> None:
        """Queue the record of `ex`, which has ended (its `t_end` is set)."""
        route = ex.route
        capture = route.capture if route is not None else None
        if capture is None:
            raw = ex.query
            trace = ex.trace
            self.put(
                exchange_record(
                    ex,
                    self.wall_offset,
                    self.node,
                    self.worker,
                    query_for_record(raw) if raw else None,
                    trace.trace_id if trace is not None else None,
                    None,
                    None,
                    None,
                    None,
                    None,
                )
            )
        else:
            self.put(self.captured(ex, capture))

    def captured(self, ex: Exchange, capture: CapturePolicy) -> RecordRow:
        """The record of `ex` with what its service's `logs` settings ask to keep."""
        query = None
        if capture.query and ex.query:
            query = query_for_record(ex.query, extra=capture.redact_query)
        request_headers = response_headers = None
        request_body = response_body = None
        if capture.request_headers:
            request_headers = redact_headers(
                [(name, value) for _, name, value in ex.headers],
                extra=capture.redact_headers,
                max_bytes=capture.max_header_bytes,
            )
        sent = ex.captured_response_headers
        if capture.response_headers and sent is not None:
            response_headers = redact_headers(
                sent, extra=capture.redact_headers, max_bytes=capture.max_header_bytes
            )
        kept = ex.capture_in
        if kept is not None and ex.body_bytes:
            request_body = capture_body(
                bytes(kept),
                content_type=_content_type(ex.header_map.get(b"content-type")),
                max_bytes=capture.max_body_bytes,
                json_paths=capture.json_paths,
                total=ex.body_bytes,
            )
        kept = ex.capture_out
        if kept is not None and ex.bytes_out:
            response_body = capture_body(
                bytes(kept),
                content_type=_content_type(_find_header(sent, b"content-type")),
                max_bytes=capture.max_body_bytes,
                json_paths=capture.json_paths,
                total=ex.bytes_out,
            )
        return from_exchange(
            ex,
            self.wall_offset,
            self.node,
            self.worker,
            query,
            trace_id=ex.trace.trace_id if ex.trace is not None else None,
            request_headers=request_headers,
            response_headers=response_headers,
            request_body=request_body,
            response_body=response_body,
        )

    def __repr__(self) -> str:
        return f"CallRecorder(node={self.node!r}, worker={self.worker})"


def _content_type(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _find_header(headers: Sequence[tuple[bytes, bytes]] | None, lower_name: bytes) -> bytes | None:
    if headers is None:
        return None
    for name, value in headers:
        if name.lower() == lower_name:
            return value
    return None


# -- sinks -----------------------------------------------------------------------------------


class DeferredSink(Sink):
    """A sink made by `factory` on its first batch, in the writer thread.

    Until then it holds nothing: `flush` and `close` do nothing. When making it fails, the
    write fails, and the pipeline retries the batch (making the sink again) with backoff.
    """

    def __init__(self, name: str, factory: Callable[[], Sink]) -> None:
        self.name = name
        self._factory = factory
        self._sink: Sink | None = None

    @property
    def sink(self) -> Sink | None:
        return self._sink

    def write(self, batch: Sequence[RecordRow]) -> None:
        sink = self._sink
        if sink is None:
            sink = self._sink = self._factory()
        sink.write(batch)

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()

    def __repr__(self) -> str:
        return f"DeferredSink({self.name!r}, {self._sink!r})"


def jsonl_path(path: str, worker: int, workers: int) -> Path:
    """`{worker}` in `path` becomes the worker's number; with several workers and no
    `{worker}`, `-N` goes before the extension (a rotating file needs a single writer)."""
    if "{worker}" in path:
        return Path(path.replace("{worker}", str(worker)))
    if workers <= 1:
        return Path(path)
    plain = Path(path)
    return plain.with_name(f"{plain.stem}-{worker}{plain.suffix}")


def _storage_sink(database: Database) -> Sink:
    if isinstance(database, PostgresDatabase):
        return DeferredSink("postgres", lambda: PostgresSink(database))
    assert isinstance(database, SqliteDatabase)
    return DeferredSink("sqlite", lambda: SqliteSink(database))


def uses_storage(settings: LogsSettings) -> bool:
    """Whether the `logs` settings write to the `storage` database at all."""
    return settings.rollups or any(sink.kind == "storage" for sink in settings.sinks)


def build_sinks(
    settings: LogsSettings, database: Database | None, *, worker: int = 0, workers: int = 1
) -> list[Sink]:
    """The sinks `settings` lists, in order, then the rollups when they are on."""
    sinks: list[Sink] = []
    for item in settings.sinks:
        if item.storage is not None:
            assert database is not None, "the storage sink needs the storage database"
            sinks.append(_storage_sink(database))
        elif item.stdout is not None:
            sinks.append(StdoutSink())
        elif item.jsonl is not None:
            options = item.jsonl
            path = jsonl_path(options.path, worker, workers)
            factory = partial(
                JsonlSink, path, max_bytes=options.max_bytes, backup_count=options.backup_count
            )
            sinks.append(DeferredSink("jsonl", factory))
        elif item.http is not None:
            http = item.http
            sinks.append(HttpSink(http.url, headers=http.headers, timeout=http.timeout))
    if settings.rollups:
        assert database is not None, "rollups need the storage database"
        rollup_database = database
        sinks.append(DeferredSink("rollups", lambda: RollupSink(rollup_database)))
    return sinks


# -- one worker's log machinery ----------------------------------------------------------------


class WorkerLogs:
    """The pipeline, sinks, recorder and retention task of one worker."""

    def __init__(
        self,
        settings: LogsSettings,
        storage: str,
        *,
        worker: int = 0,
        workers: int = 1,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.database: Database | None = open_database(storage) if uses_storage(settings) else None
        if sinks is None:
            sinks = build_sinks(settings, self.database, worker=worker, workers=workers)
        self.pipeline = LogPipeline(
            sinks,
            capacity=settings.queue,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval,
        )
        node = settings.node or socket.gethostname()
        self.recorder = CallRecorder(self.pipeline.put, node=node, worker=worker)
        self._retention: asyncio.Task[None] | None = None
        self.last_retention: RetentionResult | None = None

    @property
    def runs_retention(self) -> bool:
        return self.worker == 0 and self.database is not None

    def start(self) -> None:
        """Start the writer thread and, in worker 0, the hourly retention (in a running loop)."""
        self.pipeline.start()
        if self.runs_retention:
            self._retention = asyncio.get_running_loop().create_task(self._retain())

    def apply_retention(self, now: float | None = None) -> RetentionResult:
        """One retention pass over the storage database (blocking: run it in a thread)."""
        assert self.database is not None
        keep = self.settings.retention
        result = apply_retention(
            self.database,
            now=time.time() if now is None else now,
            records_days=keep.records / DAY,
            minute_days=keep.minute_rollups / DAY,
            hour_days=keep.hour_rollups / DAY,
            day_days=None if keep.day_rollups is None else keep.day_rollups / DAY,
        )
        self.last_retention = result
        return result

    async def _retain(self) -> None:
        await asyncio.sleep(RETENTION_FIRST_DELAY)
        while True:
            try:
                result = await asyncio.to_thread(self.apply_retention)
            except Exception:
                log.exception("retention of call records and rollups failed; retrying in an hour")
            else:
                deleted = result.records_deleted + result.rollup_rows_deleted
                if deleted or result.partitions_dropped:
                    log.info(
                        "retention: %d records and %d rollup rows deleted, %d partitions dropped",
                        result.records_deleted,
                        result.rollup_rows_deleted,
                        len(result.partitions_dropped),
                    )
            await asyncio.sleep(RETENTION_INTERVAL)

    async def aclose(self) -> bool:
        """Stop retention, write what is queued, close the sinks; True if the writer finished
        within the pipeline's close timeout."""
        task = self._retention
        if task is not None:
            self._retention = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finished = await self.pipeline.aclose()
        stats = self.pipeline.stats()
        log.info(
            "call records of worker %d: %d queued, %d dropped (queue full), %d failed in sinks",
            self.worker,
            stats.enqueued,
            stats.dropped,
            stats.failed,
        )
        return finished

    def __repr__(self) -> str:
        return f"WorkerLogs(worker={self.worker}, {self.pipeline!r})"
