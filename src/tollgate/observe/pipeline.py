"""The log pipeline of one worker: a bounded queue the event loop fills, a thread that empties it.

The event loop's only work per call is `put(record)`: a length check and a `deque.append`
(about 0.1 µs). It never blocks and never waits for a lock: when the queue is full the record
is dropped and counted (`dropped`), so a slow or dead sink costs records, never latency.

A writer thread does everything else: it wakes every `flush_interval` (200 ms), or as soon as
`batch_size` records are queued, takes the queue in batches of up to `batch_size`, and hands
each batch to every sink in turn. Sink I/O never runs on the event loop. SQLite and psycopg
release the GIL while the database works, so the thread competes with the loop only for its
own Python work (about 1 µs a record per sink: row building, sketch updates).

A thread, not an asyncio task handing batches to `to_thread`: the sinks are blocking
libraries either way, and a thread that owns its connections keeps them on one thread for
their whole life (SQLite connections want that), with no executor hop per batch.

Failures. A sink whose `write` raises keeps that batch in a backlog of its own and is retried
after an exponential backoff (0.5 s, doubling to 30 s, with jitter; a `retry_after` from the
sink wins); batches that arrive meanwhile join its backlog, so the other sinks go on at full
speed and records stay in order. A backlog longer than `max_backlog` records sheds its oldest
records, counted as `failed`; so does a `PermanentSinkError`. Nothing a sink raises stops the
thread. Every failure is counted (`errors`) and logged at its start and its recovery, not at
every retry.

Lifecycle, owned by the worker: `start()` once the worker process runs (a thread does not
survive `fork`); `put()` from the event loop thread only (the counters are plain integers that
one thread writes); `close()` at shutdown, which stops taking records, writes what is queued,
gives failing sinks one last try, flushes and closes the sinks, and returns within
`close_timeout` seconds whatever a sink does (`aclose()` runs it off the loop).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from tollgate.clock import SYSTEM_CLOCK, Clock
from tollgate.observe.records import RecordRow
from tollgate.observe.sinks import PermanentSinkError, Sink, SinkError

__all__ = ["Backoff", "LogPipeline", "PipelineStats", "SinkStats"]

log = logging.getLogger("tollgate.observe.pipeline")

# About 6 s of records at 10,000 calls/s, ~64 MB at ~1 KB a record: room for a sink's hiccup.
DEFAULT_CAPACITY: Final = 65_536
# A SQLite transaction of 1,000 rows takes a few ms: large enough to amortise, small enough
# to keep one write short.
DEFAULT_BATCH_SIZE: Final = 1_000
# Records reach the sinks at most this late (seconds) when traffic is light.
DEFAULT_FLUSH_INTERVAL: Final = 0.2
# How long close() may take (seconds): a worker's shutdown must not hang on a dead sink.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry number `attempt` (1, 2, ...): initial * factor^(attempt-1), capped."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.2  # +-20%, so that the workers of a node do not retry in step

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        if not self.jitter:
            return base
        return base * (1.0 + random.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True, slots=True)
class SinkStats:
    name: str
    written: int  # records the sink took
    failed: int  # records given up on: backlog overflow, permanent errors, unwritten at close
    errors: int  # failed write attempts
    backlog: int  # records waiting for a retry


@dataclass(frozen=True, slots=True)
class PipelineStats:
    enqueued: int  # records put() accepted
    dropped: int  # records put() refused: the queue was full, or the pipeline closed
    queue_depth: int
    capacity: int
    sinks: tuple[SinkStats, ...]

    @property
    def written(self) -> int:
        """Records written, summed over the sinks (a record two sinks took counts twice)."""
        return sum(sink.written for sink in self.sinks)

    @property
    def failed(self) -> int:
        """Records lost, summed over the sinks."""
        return sum(sink.failed for sink in self.sinks)


class _SinkSlot:
    """A sink and what the writer thread knows of it."""

    __slots__ = ("attempts", "backlog", "errors", "failed", "retry_at", "sink", "written")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.backlog: deque[RecordRow] = deque()
        self.retry_at = 0.0
        self.attempts = 0
        self.written = 0
        self.failed = 0
        self.errors = 0

    def stats(self) -> SinkStats:
        return SinkStats(self.sink.name, self.written, self.failed, self.errors, len(self.backlog))


class LogPipeline:
    """A bounded queue of call records and the thread that writes them to the sinks."""

    def __init__(
        self,
        sinks: Iterable[Sink],
        *,
        capacity: int = DEFAULT_CAPACITY,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_backlog: int | None = None,
        backoff: Backoff = Backoff(),
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if capacity < 1 or batch_size < 1:
            raise ValueError("capacity and batch_size must be at least 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        self._slots = tuple(_SinkSlot(sink) for sink in sinks)
        self._capacity = capacity
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_backlog = capacity if max_backlog is None else max_backlog
        self._backoff = backoff
        self._close_timeout = close_timeout
        self._clock = clock
        self._queue: deque[RecordRow] = deque()
        self._enqueued = 0
        self._dropped = 0
        self._open = True
        self._stopping = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the event loop's side -------------------------------------------------------------

    def put(self, record: RecordRow) -> bool:
        """Queue a record; False (and one more `dropped`) when the queue is full or closed."""
        queue = self._queue
        if len(queue) >= self._capacity or not self._open:
            self._dropped += 1
            return False
        queue.append(record)
        self._enqueued += 1
        if len(queue) == self._batch_size:
            self._wake.set()  # once per full batch, not per record: set() takes a lock
        return True

    def stats(self) -> PipelineStats:
        """Counters for metrics; cheap enough for every scrape."""
        return PipelineStats(
            enqueued=self._enqueued,
            dropped=self._dropped,
            queue_depth=len(self._queue),
            capacity=self._capacity,
            sinks=tuple(slot.stats() for slot in self._slots),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (once, in the process that will put records)."""
        if self._thread is not None:
            raise RuntimeError("the log pipeline is already started")
        # A daemon thread: a worker that exits without close() must not hang on it.
        self._thread = threading.Thread(target=self._run, name="tollgate-log-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking records, write the queued ones, close the sinks. Blocks up to `timeout`
        (default `close_timeout`) seconds; True if the writer finished in time."""
        self._open = False
        thread = self._thread
        if thread is None:  # never started: nothing ran, nothing to flush from a thread
            self._stopping = True
            self._run_final_pass()
            return True
        self._stopping = True
        self._wake.set()
        thread.join(self._close_timeout if timeout is None else timeout)
        finished = not thread.is_alive()
        if not finished:
            log.warning("the log writer did not finish in time; queued records may be lost")
        return finished

    async def aclose(self, wait: float | None = None) -> bool:
        """`close(wait)` from the event loop, without blocking it."""
        return await asyncio.to_thread(self.close, wait)

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if len(self._queue) < self._batch_size:
                self._wake.wait(self._wait_time())
            self._wake.clear()
            self._write_queued()
            self._retry_due()
            self._flush_sinks()  # every round, so that time-based sinks flush under load too
        self._run_final_pass()

    def _wait_time(self) -> float:
        wait = self._flush_interval
        now = self._clock.monotonic()
        for slot in self._slots:
            if slot.backlog:
                wait = min(wait, max(0.0, slot.retry_at - now))
        return wait

    def _run_final_pass(self) -> None:
        self._write_queued()
        for slot in self._slots:
            if slot.backlog:
                self._retry(slot)  # one last try, whatever the backoff says
            if slot.backlog:
                slot.failed += len(slot.backlog)
                slot.backlog.clear()
        self._flush_sinks()
        for slot in self._slots:
            try:
                slot.sink.close()
            except Exception:
                log.exception("log sink %s failed to close", slot.sink.name)

    def _write_queued(self) -> None:
        queue = self._queue
        size = self._batch_size
        while queue:
            count = min(size, len(queue))
            batch = [queue.popleft() for _ in range(count)]
            for slot in self._slots:
                self._deliver(slot, batch)

    def _deliver(self, slot: _SinkSlot, batch: list[RecordRow]) -> None:
        if slot.backlog:  # failing: keep the order, wait for the retry
            slot.backlog.extend(batch)
            self._trim(slot)
            return
        try:
            slot.sink.write(batch)
        except Exception as exc:
            self._failed(slot, batch, exc)
        else:
            slot.written += len(batch)

    def _failed(self, slot: _SinkSlot, batch: Sequence[RecordRow], exc: Exception) -> None:
        slot.errors += 1
        if isinstance(exc, PermanentSinkError):
            slot.failed += len(batch)
            log.error("log sink %s rejected %d records: %s", slot.sink.name, len(batch), exc)
            return
        if slot.attempts == 0:
            log.warning("log sink %s failed, retrying with backoff: %r", slot.sink.name, exc)
        slot.attempts += 1
        delay = self._backoff.delay(slot.attempts)
        if isinstance(exc, SinkError) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        slot.retry_at = self._clock.monotonic() + delay
        if not slot.backlog:
            slot.backlog.extend(batch)
        self._trim(slot)

    def _trim(self, slot: _SinkSlot) -> None:
        excess = len(slot.backlog) - self._max_backlog
        if excess > 0:
            for _ in range(excess):
                slot.backlog.popleft()
            slot.failed += excess

    def _retry_due(self) -> None:
        now = self._clock.monotonic()
        for slot in self._slots:
            if slot.backlog and now >= slot.retry_at:
                self._retry(slot)

    def _retry(self, slot: _SinkSlot) -> None:
        """Write the backlog in batches, oldest first; stop at the first failure."""
        backlog = slot.backlog
        while backlog:
            batch = [backlog[index] for index in range(min(self._batch_size, len(backlog)))]
            try:
                slot.sink.write(batch)
            except Exception as exc:
                self._failed(slot, batch, exc)
                if isinstance(exc, PermanentSinkError):
                    for _ in batch:
                        backlog.popleft()
                    continue
                return
            for _ in batch:
                backlog.popleft()
            slot.written += len(batch)
        if slot.attempts:
            log.info("log sink %s recovered after %d retries", slot.sink.name, slot.attempts)
        slot.attempts = 0

    def _flush_sinks(self) -> None:
        for slot in self._slots:
            if slot.backlog:
                continue
            try:
                slot.sink.flush()
            except Exception as exc:
                slot.errors += 1
                log.warning("log sink %s failed to flush: %r", slot.sink.name, exc)

    def __repr__(self) -> str:
        return (
            f"LogPipeline(sinks={[slot.sink.name for slot in self._slots]}, "
            f"depth={len(self._queue)}/{self._capacity}, enqueued={self._enqueued}, "
            f"dropped={self._dropped}, open={self._open})"
        )
