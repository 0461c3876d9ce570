from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from call_records import make_record

from tollgate.observe.pipeline import Backoff, LogPipeline
from tollgate.observe.records import CallRecord
from tollgate.observe.sinks import PermanentSinkError, Sink, SinkError

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.0)


class MemorySink(Sink):
    """Keeps what it is given; fails its first `failures` writes (permanently if asked)."""

    def __init__(self, name: str = "memory", *, failures: int = 0, permanent: bool = False):
        self.name = name
        self.batches: list[list[CallRecord]] = []
        self.attempts = 0
        self.failures = failures
        self.permanent = permanent
        self.threads: set[int] = set()
        self.flushes = 0
        self.closed = False

    def write(self, batch: Sequence[CallRecord]) -> None:
        self.threads.add(threading.get_ident())
        self.attempts += 1
        if self.attempts <= self.failures:
            raise (PermanentSinkError if self.permanent else SinkError)("down")
        self.batches.append(list(batch))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True

    @property
    def records(self) -> list[CallRecord]:
        return [record for batch in self.batches for record in batch]


def records(count: int) -> list[CallRecord]:
    return [make_record(number) for number in range(count)]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.fixture
def started() -> Iterator[list[LogPipeline]]:
    pipelines: list[LogPipeline] = []
    yield pipelines
    for pipeline in pipelines:
        pipeline.close(1.0)


def start(pipelines: list[LogPipeline], *sinks: Sink, **options: object) -> LogPipeline:
    options.setdefault("flush_interval", 0.01)
    options.setdefault("backoff", FAST)
    pipeline = LogPipeline(sinks, **options)  # type: ignore[arg-type]
    pipeline.start()
    pipelines.append(pipeline)
    return pipeline


def test_a_full_queue_refuses_records_and_counts_them() -> None:
    pipeline = LogPipeline([MemorySink()], capacity=3)  # not started: nothing drains it
    results = [pipeline.put(record) for record in records(5)]
    assert results == [True, True, True, False, False]
    stats = pipeline.stats()
    assert (stats.enqueued, stats.dropped, stats.queue_depth, stats.capacity) == (3, 2, 3, 3)


def test_records_reach_every_sink_in_order_in_bounded_batches(started: list[LogPipeline]) -> None:
    first, second = MemorySink("first"), MemorySink("second")
    pipeline = start(started, first, second, batch_size=100)
    sent = records(1_050)
    for record in sent:
        assert pipeline.put(record)
    wait_for(lambda: len(first.records) == len(second.records) == len(sent))
    assert first.records == sent and second.records == sent
    assert max(len(batch) for batch in first.batches) <= 100
    stats = pipeline.stats()
    assert (stats.enqueued, stats.dropped, stats.written, stats.failed) == (1_050, 0, 2_100, 0)
    assert [(sink.name, sink.written) for sink in stats.sinks] == [
        ("first", 1_050),
        ("second", 1_050),
    ]


def test_a_failing_sink_is_retried_with_backoff_and_the_others_go_on(
    started: list[LogPipeline],
) -> None:
    healthy, flaky = MemorySink("healthy"), MemorySink("flaky", failures=3)
    pipeline = start(started, healthy, flaky)
    sent = records(10)
    for record in sent[:5]:
        pipeline.put(record)
    wait_for(lambda: len(healthy.records) == 5)
    for record in sent[5:]:
        pipeline.put(record)
    wait_for(lambda: len(flaky.records) == 10)
    assert healthy.records == sent
    assert flaky.records == sent  # the backlog kept the order
    by_name = {sink.name: sink for sink in pipeline.stats().sinks}
    assert by_name["flaky"].errors == 3 and by_name["flaky"].failed == 0
    assert by_name["flaky"].backlog == 0 and by_name["healthy"].errors == 0


def test_a_permanent_error_drops_the_batch_and_counts_it(started: list[LogPipeline]) -> None:
    sink = MemorySink(failures=1, permanent=True)
    pipeline = start(started, sink)
    pipeline.put(make_record(1))
    wait_for(lambda: pipeline.stats().sinks[0].failed == 1)
    pipeline.put(make_record(2))
    wait_for(lambda: len(sink.records) == 1)
    assert sink.records == [make_record(2)]
    assert pipeline.stats().sinks[0].errors == 1


def test_a_backlog_over_its_bound_sheds_its_oldest_records(started: list[LogPipeline]) -> None:
    sink = MemorySink(failures=10**9)
    pipeline = start(started, sink, max_backlog=5, batch_size=4)
    for record in records(12):
        pipeline.put(record)
    wait_for(lambda: pipeline.stats().queue_depth == 0 and pipeline.stats().sinks[0].failed == 7)
    assert pipeline.stats().sinks[0].backlog == 5


def test_sink_errors_never_stop_the_writer(started: list[LogPipeline]) -> None:
    class Broken(MemorySink):
        def write(self, batch: Sequence[CallRecord]) -> None:
            raise ZeroDivisionError("a bug in a sink")

        def flush(self) -> None:
            raise RuntimeError("flush fails too")

    broken, healthy = Broken("broken"), MemorySink("healthy")
    pipeline = start(started, broken, healthy)
    for record in records(20):
        pipeline.put(record)
        time.sleep(0.001)
    wait_for(lambda: len(healthy.records) == 20)
    assert pipeline.stats().sinks[0].errors >= 1


def test_close_writes_what_is_queued_and_closes_the_sinks() -> None:
    sink = MemorySink()
    pipeline = LogPipeline([sink], flush_interval=10.0)  # the timer alone would wait 10 s
    pipeline.start()
    sent = records(2_500)
    for record in sent:
        pipeline.put(record)
    assert pipeline.close() is True
    assert sink.records == sent and sink.closed
    assert pipeline.put(make_record(9)) is False
    assert pipeline.stats().dropped == 1


def test_close_gives_a_failing_sink_one_last_try_then_counts_its_backlog() -> None:
    sink = MemorySink(failures=10**9)
    pipeline = LogPipeline([sink], flush_interval=0.01, backoff=Backoff(initial=60.0))
    pipeline.start()
    for record in records(3):
        pipeline.put(record)
    wait_for(lambda: pipeline.stats().sinks[0].backlog == 3)
    assert pipeline.close() is True
    assert pipeline.stats().sinks[0].failed == 3 and sink.closed


def test_close_returns_in_bounded_time_when_a_sink_hangs() -> None:
    release = threading.Event()

    class Hanging(MemorySink):
        def write(self, batch: Sequence[CallRecord]) -> None:
            release.wait(10)

    pipeline = LogPipeline([Hanging()], flush_interval=0.01)
    pipeline.start()
    pipeline.put(make_record())
    time.sleep(0.05)
    began = time.monotonic()
    assert pipeline.close(0.2) is False
    assert time.monotonic() - began < 1.0
    release.set()


def test_close_without_start_writes_in_the_calling_thread() -> None:
    sink = MemorySink()
    pipeline = LogPipeline([sink])
    pipeline.put(make_record())
    assert pipeline.close() is True
    assert len(sink.records) == 1 and sink.closed


async def test_the_event_loop_thread_never_runs_sink_io(started: list[LogPipeline]) -> None:
    sink = MemorySink()
    pipeline = start(started, sink)
    loop_thread = threading.get_ident()
    for record in records(50):
        assert pipeline.put(record)
        await asyncio.sleep(0)
    await asyncio.to_thread(wait_for, lambda: len(sink.records) == 50)
    assert sink.threads and loop_thread not in sink.threads
    assert await pipeline.aclose() is True
    assert sink.closed


def test_sinks_are_flushed_when_the_queue_is_idle(started: list[LogPipeline]) -> None:
    sink = MemorySink()
    start(started, sink)
    wait_for(lambda: sink.flushes >= 3)


def test_backoff_grows_to_its_cap_and_jitters_within_bounds() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, maximum=4.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    jittered = Backoff(initial=1.0, jitter=0.2)
    assert all(0.8 <= jittered.delay(1) <= 1.2 for _ in range(100))


def test_put_costs_well_under_a_microsecond() -> None:
    pipeline = LogPipeline([MemorySink()], capacity=1_000_000, batch_size=2_000_000)
    record = make_record()
    runs = 200_000
    began = time.perf_counter()
    put = pipeline.put
    for _ in range(runs):
        put(record)
    assert (time.perf_counter() - began) / runs < 5e-6  # ~0.1 µs idle; room for a busy machine
