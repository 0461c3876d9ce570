"""The shared-memory store: exact across worker processes, robust to crashed and torn writers.

Processes are real (forked); time is passed in, never waited for.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import shutil
import signal
import threading
import uuid
import zlib
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tollgate.ratelimit import (
    CalendarQuota,
    Concurrency,
    Decision,
    FixedWindow,
    LeakyBucket,
    RateAlgorithm,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
    WindowCount,
    decide_all,
    shm,
)
from tollgate.ratelimit.algorithms import _Value
from tollgate.ratelimit.headers import (
    LONGEST_RESET,
    LimitHeaders,
    fields_pieces,
    fields_template,
    policy_field,
    whole_seconds,
)
from tollgate.ratelimit.shm import (
    HEADER_SIZE,
    MAX_CAPACITY,
    RECORD_SIZE,
    SharedMemoryError,
    SharedMemoryStore,
)

try:
    from tollgate.ratelimit import _shmtable as COMPILED  # type: ignore[attr-defined]
except ImportError:  # a pure-Python build
    COMPILED = None

NOW = 1_700_000_000.0
# Long enough for a loaded machine; a wedged store fails the test instead of hanging it.
PROCESS_TIMEOUT = 30.0

FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=["mutex", "fcntl"])
def locks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every store test runs with each kind of stripe lock: the compiled primitives' robust
    mutexes, and the pure-Python build's fcntl locks and struct codec."""
    if request.param == "fcntl":
        monkeypatch.setattr(shm, "_C", None)
    elif shm._C is None:  # the tests run on the compiled build: a missing extension fails
        pytest.fail("the compiled primitives (tollgate.ratelimit._shmtable) are not built")
    return str(request.param)


@pytest.fixture
def path(tmp_path: Path, locks: str) -> Path:
    return tmp_path / "ratelimit.shm"


@pytest.fixture
def store(path: Path) -> Iterator[SharedMemoryStore]:
    with SharedMemoryStore.create(path, 1024) as store:
        yield store


def exactly(value: Any) -> Any:
    """`value` (a decision, a state) as its fields' types and reprs: 0 and 0.0, or 0.0 and -0.0,
    compare equal as numbers, not here."""
    fields = value.values() if isinstance(value, Decision | _Value) else (value,)
    return tuple((type(field).__name__, repr(field)) for field in fields)


def stored_state(store: SharedMemoryStore, key: str, algorithm: RateAlgorithm[Any]) -> Any:
    """The state `store` holds for `key` under `algorithm`'s kind, read by the pure-Python
    codec (struct and zlib, whatever wrote it); None if it holds none."""
    codec = shm._codec_for(algorithm)
    place = store._place(key)
    digest, base, home = place[0], place[2], place[3]
    compiled, store._c = store._c, None
    try:
        _, fields = store._find(digest, codec, base, home)
    finally:
        store._c = compiled
    return None if fields is None else codec.state(fields)


def fixed_size_algorithms() -> list[RateAlgorithm[Any]]:
    return [
        FixedWindow(10, 60),
        SlidingWindowCounter(10, 60),
        TokenBucket(rate=0.7, burst=10),
        LeakyBucket(rate=0.7, max_delay=9),
        Concurrency(10),
        CalendarQuota(10, "day", "Europe/Paris"),
    ]


# -- one process -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", fixed_size_algorithms(), ids=repr)
def test_every_fixed_size_state_round_trips_exactly_through_the_store(
    store: SharedMemoryStore, algorithm: RateAlgorithm[Any]
) -> None:
    # Admissions, rejections and window changes at awkward float times and costs: the store's
    # decisions and states are those of the pure algorithm, bit for bit.
    steps = [(0.0, 1), (0.1, 3), (0.30000000000000004, 2), (1.7, 4), (2.9, 1), (59.99, 2)]
    steps += [(61.3, 5), (61.3, 6), (125.123456789, 1), (86_400.5, 3)]
    state = None
    for offset, cost in steps:
        expected = decide_all([(algorithm, state)], NOW + offset, cost)
        combined = store.hit([("client", algorithm)], NOW + offset, cost)
        assert exactly(combined.decision) == exactly(expected.decision)
        assert combined.limit_index == 0
        state = expected.states[0]
        assert stored_state(store, "client", algorithm) == state
        assert (
            store.peek("client", algorithm, NOW + offset)
            == algorithm.decide(state, NOW + offset)[0]
        )


def test_a_request_rejected_by_one_limit_spends_none_of_the_others(
    store: SharedMemoryStore,
) -> None:
    per_second = TokenBucket(rate=1, burst=5)
    per_hour = FixedWindow(2, 3600)
    limits: list[tuple[str, RateAlgorithm[Any]]] = [
        ("acme|second", per_second),
        ("acme|hour", per_hour),
    ]
    assert store.hit(limits, NOW, 1).decision.allowed
    assert store.hit(limits, NOW, 1).decision.allowed
    rejected = store.hit(limits, NOW, 1)
    assert not rejected.decision.allowed
    assert rejected.limit_index == 1
    # The bucket was spent twice, not three times.
    assert store.peek("acme|second", per_second, NOW).remaining == 2


def test_several_limits_decide_as_decide_all_does(store: SharedMemoryStore) -> None:
    limits: list[tuple[str, RateAlgorithm[Any]]] = [
        ("k|fixed", FixedWindow(4, 10)),
        ("k|bucket", TokenBucket(rate=2, burst=6)),
        ("k|shaper", LeakyBucket(rate=1, max_delay=3)),
    ]
    states: list[Any] = [None, None, None]
    for step in range(12):
        now = NOW + step * 0.4
        expected = decide_all(
            [(algorithm, state) for (_, algorithm), state in zip(limits, states, strict=True)],
            now,
            1 + step % 2,
        )
        assert store.hit(limits, now, 1 + step % 2) == expected
        states = list(expected.states)


def test_one_key_under_two_algorithm_kinds_keeps_two_states(store: SharedMemoryStore) -> None:
    window = FixedWindow(1, 60)
    bucket = TokenBucket(rate=1, burst=3)
    assert store.hit([("acme", window), ("acme", bucket)], NOW, 1).decision.allowed
    assert store.peek("acme", window, NOW).allowed is False
    assert store.peek("acme", bucket, NOW).remaining == 1  # 3 - 1, then 1 more for the peek


def test_a_key_twice_with_one_algorithm_kind_in_one_hit_is_refused(
    store: SharedMemoryStore,
) -> None:
    with pytest.raises(ValueError, match="twice"):
        store.hit([("acme", FixedWindow(1, 60)), ("acme", FixedWindow(5, 1))], NOW, 1)


def test_peek_counts_nothing(store: SharedMemoryStore) -> None:
    window = FixedWindow(1, 60)
    for _ in range(3):
        assert store.peek("acme", window, NOW).allowed
    assert store.hit([("acme", window)], NOW, 1).decision.allowed


def test_reset_forgets_a_key_under_every_algorithm(store: SharedMemoryStore) -> None:
    window = FixedWindow(1, 60)
    bucket = TokenBucket(rate=1, burst=1)
    store.hit([("acme", window), ("acme", bucket)], NOW, 1)
    store.hit([("other", window)], NOW, 1)
    store.reset("acme")
    assert store.hit([("acme", window), ("acme", bucket)], NOW, 1).decision.allowed
    assert not store.hit([("other", window)], NOW, 1).decision.allowed


def test_release_gives_a_concurrency_slot_back(store: SharedMemoryStore) -> None:
    slots = Concurrency(2)
    assert store.hit([("upload", slots)], NOW, 1).decision.allowed
    assert store.hit([("upload", slots)], NOW, 1).decision.allowed
    assert not store.hit([("upload", slots)], NOW, 1).decision.allowed
    store.release("upload", 1)
    assert store.hit([("upload", slots)], NOW, 1).decision.allowed
    # Releasing more than is in flight frees the record and never counts below zero.
    store.release("upload", 5)
    assert store.used() == 0
    assert store.peek("upload", slots, NOW).remaining == 1
    store.release("never-acquired", 1)


def test_a_store_without_locks_decides_as_one_with_them(path: Path, tmp_path: Path) -> None:
    bucket = TokenBucket(rate=3, burst=4)
    with (
        SharedMemoryStore.create(path, 64) as locked,
        SharedMemoryStore.create(tmp_path / "unlocked.shm", 64, locking=False) as unlocked,
    ):
        for step in range(10):
            now = NOW + step / 7
            assert locked.hit([("k", bucket)], now, 1) == unlocked.hit([("k", bucket)], now, 1)
        assert unlocked.locks == "none"
        assert "locks='none'" in repr(unlocked)


def test_a_store_opened_by_path_sees_what_another_wrote(path: Path) -> None:
    window = FixedWindow(2, 60)
    with SharedMemoryStore.create(path, 64) as first, SharedMemoryStore.open(path) as second:
        assert first.hit([("acme", window)], NOW, 1).decision.allowed
        assert second.hit([("acme", window)], NOW, 1).decision.allowed
        assert not first.hit([("acme", window)], NOW, 1).decision.allowed


def test_the_sliding_window_log_is_refused_with_the_reason(store: SharedMemoryStore) -> None:
    log = SlidingWindowLog(10, 60)
    with pytest.raises(ValueError, match=r"variable-size.*use 'sliding-window'"):
        SharedMemoryStore.check_algorithm(log)
    with pytest.raises(ValueError, match="variable-size"):
        store.hit([("acme", log)], NOW, 1)
    SharedMemoryStore.check_algorithm(TokenBucket(rate=1, burst=1))


# -- a full table ----------------------------------------------------------------------------


def test_a_full_stripe_evicts_the_record_that_expires_first(path: Path) -> None:
    bucket = TokenBucket(rate=1, burst=10)  # a key spent by `cost` expires `cost` s later
    with SharedMemoryStore.create(path, 4) as store:  # one stripe of four slots
        for key, cost in [("a", 4), ("b", 1), ("c", 3), ("d", 2)]:
            store.hit([(key, bucket)], NOW, cost)
        assert (store.used(), store.evictions()) == (4, 0)

        assert store.hit([("e", bucket)], NOW, 5).decision.allowed
        assert (store.used(), store.evictions()) == (4, 1)
        assert store.peek("b", bucket, NOW).remaining == 9  # evicted: afresh
        assert store.peek("a", bucket, NOW).remaining == 5  # kept
        assert "capacity=4, used=4, evictions=1" in repr(store)

        # Expired records are reused, not evicted.
        later = NOW + 4
        store.hit([("f", bucket)], later, 1)
        store.hit([("g", bucket)], later, 1)
        assert store.evictions() == 1
        assert store.peek("e", bucket, later).remaining == 8  # 5 spent, 4 back, 1 peeked


def test_a_request_never_evicts_its_own_other_limit(path: Path) -> None:
    window = FixedWindow(5, 60)
    with SharedMemoryStore.create(path, 2) as store:
        store.hit([("old", FixedWindow(5, 3600))], NOW, 1)  # expires in 2800 s
        store.hit([("mine", window)], NOW, 1)  # expires in 40 s
        # "mine" is found, "new" needs a slot: "old" must go, though "mine" expires first.
        store.hit([("mine", window), ("new", window)], NOW, 1)
        assert store.peek("mine", window, NOW).remaining == 2


# -- sizes and files -------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, MAX_CAPACITY + 1, True, 2.5, "64"])
def test_an_impossible_capacity_is_refused_clearly(path: Path, capacity: Any) -> None:
    with pytest.raises(ValueError, match="capacity"):
        SharedMemoryStore.create(path, capacity)
    assert not path.exists()


def test_capacity_is_rounded_up_to_whole_stripes(path: Path) -> None:
    with SharedMemoryStore.create(path, 100) as store:
        assert store.capacity == 128
    with SharedMemoryStore.create(path, 3) as store:
        assert store.capacity == 3


def test_a_file_that_is_not_a_store_is_refused(path: Path) -> None:
    path.write_bytes(b"version: 1\n" * 1000)
    with pytest.raises(SharedMemoryError, match="not a Tollgate shared-memory store"):
        SharedMemoryStore.open(path)
    path.write_bytes(b"")
    with pytest.raises(SharedMemoryError, match="not a Tollgate shared-memory store"):
        SharedMemoryStore.open(path)
    with pytest.raises(FileNotFoundError):
        SharedMemoryStore.open(path.with_name("missing.shm"))


def test_a_truncated_or_damaged_store_is_refused(path: Path) -> None:
    SharedMemoryStore.create(path, 256).close()
    size = path.stat().st_size
    os.truncate(path, size - 64)
    with pytest.raises(SharedMemoryError, match="header says"):
        SharedMemoryStore.open(path)
    os.truncate(path, size)
    with open(path, "r+b") as file:
        file.seek(20)
        file.write(b"\xff")
    with pytest.raises(SharedMemoryError, match="damaged"):
        SharedMemoryStore.open(path)


def test_a_closed_store_says_so(path: Path) -> None:
    store = SharedMemoryStore.create(path, 64)
    store.close()
    store.close()
    assert repr(store).endswith("closed)")
    with pytest.raises(SharedMemoryError, match="closed"):
        store.hit([("acme", FixedWindow(1, 60))], NOW, 1)


# -- torn records ----------------------------------------------------------------------------


def changed_record(before: bytes, after: bytes) -> slice:
    """The 64-byte record a write changed, from the file's bytes before and after it (the
    records start on the page after the header and counters; a mutex changes in between)."""
    pairs = enumerate(zip(before, after, strict=True))
    first = next(i for i, (x, y) in pairs if x != y and i >= 2 * HEADER_SIZE)
    start = first - first % 64
    return slice(start, start + 64)


def test_a_torn_record_counts_as_empty(path: Path) -> None:
    window = FixedWindow(3, 60)
    with SharedMemoryStore.create(path, 64) as store:
        empty = path.read_bytes()
        store.hit([("acme", window)], NOW, 1)
        one = path.read_bytes()
        store.hit([("acme", window)], NOW, 1)
        two = path.read_bytes()
        record = changed_record(empty, one)
        assert changed_record(one, two) == record

        # A writer that died partway through its write: the new state, the old checksum.
        torn = two[record.start : record.start + 48] + one[record.start + 48 : record.stop]
        assert torn not in (one[record], two[record])
        with open(path, "r+b") as file:
            file.seek(record.start)
            file.write(torn)
        assert store.peek("acme", window, NOW).remaining == 2  # afresh, less the peek
        assert store.hit([("acme", window)], NOW, 1).decision.remaining == 2


def test_garbage_everywhere_past_the_header_is_survived(path: Path, locks: str) -> None:
    bucket = TokenBucket(rate=1, burst=3)
    with SharedMemoryStore.create(path, 128) as store:
        original = path.read_bytes()
        garbage = bytearray(random.Random(7).randbytes(len(original) - HEADER_SIZE))
        if locks == "mutex":
            # Only the pthread library writes a stripe's mutex, and a holder's death cannot
            # tear it (the robust-mutex protocol); a stray write to one is not survived.
            for line in range(0, 2 * 64, 64):
                mutex = slice(line + shm._MUTEX_AT, line + 64)
                garbage[mutex] = original[HEADER_SIZE:][mutex]
        with open(path, "r+b") as file:
            file.seek(HEADER_SIZE)
            file.write(garbage)
        for key in [f"client-{n}" for n in range(200)]:
            assert store.hit([(key, bucket)], NOW, 2).decision.remaining == 1
        # Torn records and counters were reused and restarted; then each stripe of 64 evicted
        # one record per key past its 64th (both stripes get over 64 of 200 keys but for a
        # chance of about 1 in 5 million).
        assert (store.used(), store.evictions()) == (128, 200 - 128)


# -- several processes -----------------------------------------------------------------------


def hit_many_times(
    path: Path,
    limits: list[tuple[str, RateAlgorithm[Any]]],
    times: int,
    start: Any,
    admitted: Any,
) -> None:
    shuffled = random.Random(os.getpid()).sample(limits, len(limits))
    with SharedMemoryStore.open(path) as store:
        start.wait()
        count = sum(store.hit(shuffled, NOW, 1).decision.allowed for _ in range(times))
    admitted.put(count)


def admitted_across_processes(
    path: Path, limits: list[tuple[str, RateAlgorithm[Any]]], processes: int, times: int
) -> int:
    """Requests admitted when `processes` processes each make `times` requests at once."""
    SharedMemoryStore.create(path, 1024).close()
    start = FORK.Barrier(processes)
    admitted = FORK.Queue()
    workers = [
        FORK.Process(target=hit_many_times, args=(path, limits, times, start, admitted))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        total = sum(int(admitted.get(timeout=PROCESS_TIMEOUT)) for _ in workers)
    finally:
        for worker in workers:
            worker.join(PROCESS_TIMEOUT if worker.exitcode is None else 0)
            worker.kill()  # a wedged worker must not outlive the test
    assert [worker.exitcode for worker in workers] == [0] * processes
    return total


@pytest.mark.parametrize(
    "algorithm", [FixedWindow(100, 60), TokenBucket(rate=0.001, burst=100)], ids=repr
)
def test_four_processes_admit_exactly_the_limit_between_them(
    path: Path, algorithm: RateAlgorithm[Any]
) -> None:
    assert admitted_across_processes(path, [("acme", algorithm)], 4, 500) == 100


def test_requests_locking_several_stripes_in_any_order_never_deadlock(path: Path) -> None:
    # Each process lists the eight limits in its own order; locks are taken in stripe order.
    limits: list[tuple[str, RateAlgorithm[Any]]] = [
        (f"acme|{n}", FixedWindow(100, 60)) for n in range(8)
    ]
    assert admitted_across_processes(path, limits, 4, 300) == 100


class BlockingWindow(FixedWindow):
    """A fixed window whose decision never returns: its caller stays inside the stripe lock."""

    def __init__(self, inside: Event) -> None:
        super().__init__(10, 60)
        self.inside = inside

    def decide(
        self, state: WindowCount | None, now: float, cost: int = 1
    ) -> tuple[Decision, WindowCount | None]:
        self.inside.set()
        threading.Event().wait()
        raise AssertionError("unreachable")


def block_inside_the_lock(path: Path, inside: Event) -> None:
    with SharedMemoryStore.open(path) as store:
        store.hit([("acme", BlockingWindow(inside))], NOW, 1)


def test_a_worker_killed_inside_a_lock_does_not_wedge_the_others(path: Path) -> None:
    window = FixedWindow(10, 60)
    with SharedMemoryStore.create(path, 64) as store:
        inside = FORK.Event()
        holder = FORK.Process(target=block_inside_the_lock, args=(path, inside))
        holder.start()
        assert inside.wait(PROCESS_TIMEOUT)

        # The stripe really is held: a hit on the same key waits...
        results: list[bool] = []
        waiter = threading.Thread(
            target=lambda: results.append(store.hit([("acme", window)], NOW, 1).decision.allowed)
        )
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()

        # ...until the kernel drops the dead holder's lock.
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(PROCESS_TIMEOUT)
        waiter.join(PROCESS_TIMEOUT)
        assert results == [True]
        assert store.hit([("acme", window)], NOW, 1).decision.remaining == 8


def use_an_inherited_store(store: SharedMemoryStore, errors: Any) -> None:
    try:
        store.hit([("acme", FixedWindow(1, 60))], NOW, 1)
    except SharedMemoryError as error:
        errors.put(str(error))
    else:
        errors.put("")


def test_a_store_inherited_across_fork_refuses_to_work(store: SharedMemoryStore) -> None:
    errors = FORK.Queue()
    child = FORK.Process(target=use_an_inherited_store, args=(store, errors))
    child.start()
    assert "open it again in the child" in errors.get(timeout=PROCESS_TIMEOUT)
    child.join(PROCESS_TIMEOUT)
    # The parent's store is still its own.
    assert store.hit([("acme", FixedWindow(1, 60))], NOW, 1).decision.allowed


def test_an_error_inside_a_hit_leaves_the_stripe_unlocked(path: Path) -> None:
    window = FixedWindow(1, 60)
    with SharedMemoryStore.create(path, 64) as store, SharedMemoryStore.open(path) as other:
        with pytest.raises(ValueError, match="cost"):
            store.hit([("acme", window)], NOW, 0)
        # Another open file (as another worker would be) takes the same stripe's lock.
        results: list[bool] = []
        waiter = threading.Thread(
            target=lambda: results.append(other.hit([("acme", window)], NOW, 1).decision.allowed)
        )
        waiter.start()
        waiter.join(PROCESS_TIMEOUT)
        assert results == [True]
        assert math.isinf(store.hit([("acme", window)], NOW, 2).decision.retry_after)


def test_the_repr_shows_the_table(store: SharedMemoryStore) -> None:
    store.hit([("acme", TokenBucket(rate=1, burst=1))], NOW, 1)
    assert repr(store) == (
        f"SharedMemoryStore({str(store.path)!r}, capacity=1024, used=1, evictions=0, "
        f"locks={store.locks!r})"
    )
    assert store.locks == ("mutex" if shm._C is not None else "fcntl")


# -- the compiled primitives -----------------------------------------------------------------


def die_holding_a_stripe(path: Path, key: str) -> None:
    store = SharedMemoryStore.open(path)
    store._take(store._place(key))
    os._exit(0)  # no unlock, no close: as a worker killed mid-update


def test_a_worker_dead_holding_a_stripe_lock_does_not_wedge_the_others(path: Path) -> None:
    window = FixedWindow(5, 60)
    with SharedMemoryStore.create(path, 64) as store:
        store.hit([("acme", window)], NOW, 1)
        child = FORK.Process(target=die_holding_a_stripe, args=(path, "acme"))
        child.start()
        child.join(PROCESS_TIMEOUT)
        assert child.exitcode == 0
        results: list[Decision] = []
        hitter = threading.Thread(
            target=lambda: results.append(store.hit([("acme", window)], NOW, 1).decision),
            daemon=True,
        )
        hitter.start()
        hitter.join(PROCESS_TIMEOUT)
        assert [decision.remaining for decision in results] == [3]


def test_the_compiled_and_the_pure_codec_read_each_others_records(
    path: Path, locks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = [
        ("a", FixedWindow(10, 60)),
        ("a", SlidingWindowCounter(10, 60)),
        ("a", TokenBucket(rate=2, burst=10)),
        ("a", LeakyBucket(rate=2, max_delay=5)),
        ("a", Concurrency(10)),
    ]
    with SharedMemoryStore.create(path, 64) as store:
        for _ in range(3):
            store.hit(limits, NOW, 1)
        expected = [store.peek(key, algorithm, NOW) for key, algorithm in limits]
    # Read back by the other codec (the pure one when the store was written compiled).
    monkeypatch.setattr(shm, "_C", None if locks == "mutex" else COMPILED)
    with SharedMemoryStore.open(path, locking=False) as reader:
        assert [reader.peek(key, algorithm, NOW) for key, algorithm in limits] == expected
        assert expected[0].remaining == 6  # 3 counted, and the peek's own request


# -- single limits decided in C, against the pure algorithms (hypothesis) --------------------

# Each example makes a store file of its own: nothing is carried from one to the next.
EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Windows, rates and hints: mostly everyday values and anything between, and the ends of a
# double (where most branches are out of reach: the everyday ones are drawn twice as often).
everyday_durations = st.one_of(
    st.sampled_from([0.5, 1.0, 2.5, 60.0, 3600.0, 0.1, 0.7, 1 / 3]),
    st.floats(min_value=1e-3, max_value=1e4),
)
durations = st.one_of(
    everyday_durations,
    everyday_durations,
    st.floats(min_value=1e-6, max_value=1e6),
    st.sampled_from([5e-324, 1e-300, 1e-9, 1e15, 1e300, 1.7e308]),
)
max_delays = st.one_of(st.sampled_from([0.0, 0.3, 1.0, 4.0]), st.floats(0, 100))
# Limits and costs: small ones, and the 2**50 up to which the C decides (past it, Python).
counts = st.one_of(st.integers(1, 20), st.sampled_from([1, 2**31, 2**50, 2**50 + 1, 2**62]))
costs = st.one_of(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 30),
    st.sampled_from([2**50, 2**50 + 1, 2**53 + 1, 2**63]),
)
algorithms_in_c = st.one_of(
    st.builds(FixedWindow, counts, durations),
    st.builds(SlidingWindowCounter, counts, durations),
    st.builds(TokenBucket, durations, counts),
    st.tuples(durations, max_delays)
    .filter(lambda pair: pair[0] * pair[1] < 2**55)  # else no bucket: capacity overflows
    .map(lambda pair: LeakyBucket(*pair)),
    st.builds(Concurrency, counts, durations),
)
# Wall times: today's, the epoch, before it (Python's % takes the divisor's sign), far ahead.
starts = st.sampled_from([NOW, NOW + 0.1, 0.0, -1234.5678, 1e15 + 0.5, 2.0**53])
gaps = st.one_of(
    st.just(0.0),
    st.floats(min_value=0, max_value=2),
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=-5, max_value=0),  # the wall clock steps back
    st.sampled_from([5e-324, 1e-9, 2.4e-7]),  # less than a wall time's resolution, and about it
    st.floats(min_value=-1e5, max_value=1e7),
)
# (seconds since the last step, cost, release instead of hit: concurrency limits only).
arrivals = st.lists(st.tuples(gaps, costs, st.booleans()), min_size=1, max_size=40)


def require_compiled() -> None:
    if shm._C is None:  # the tests run on the compiled build: a missing extension fails
        pytest.fail("the compiled primitives (tollgate.ratelimit._shmtable) are not built")


@EXAMPLES
@given(algorithm=algorithms_in_c, start=starts, steps=arrivals)
# Refills that leave 2.2e-16 tokens too few: `remaining` is int(tokens + epsilon), not floor.
@example(
    algorithm=TokenBucket(rate=1 / 3, burst=3),
    start=NOW,
    steps=[(0.0, 1, False), (1.9, 2, False), (0.0, 1, False), (1.1, 1, False)],
)
# A window so long that the previous window's weight overflows to inf.
@example(
    algorithm=SlidingWindowCounter(2, 1.7e308),
    start=-1234.5678,
    steps=[(0.0, 1, False), (0.0, 1, False), (1235.0, 1, False)],
)
def test_single_limits_decide_in_the_store_exactly_as_the_pure_algorithms(
    tmp_path: Path,
    locks: str,
    algorithm: RateAlgorithm[Any],
    start: float,
    steps: list[tuple[float, int, bool]],
) -> None:
    # Decisions and stored states bit for bit, through admissions, rejections (retry_after
    # stepped to the first admitting instant, or inf for a cost past the limit), window and
    # refill changes, clock steps back, and extreme windows, rates and times.
    path = tmp_path / f"{uuid.uuid4().hex}.shm"
    with SharedMemoryStore.create(path, 64) as store:
        state = None
        now = start
        for gap, cost, release in steps:
            now += gap
            if release and isinstance(algorithm, Concurrency):
                store.release("client", cost)
                state = algorithm.release(state, cost)
            else:
                try:
                    expected = decide_all([(algorithm, state)], now, cost)
                except ArithmeticError as error:
                    # The algorithm itself fails (a window near the largest double: a weight
                    # of inf to round up), and so does the store, changing nothing.
                    with pytest.raises(type(error)):
                        store.hit([("client", algorithm)], now, cost)
                    assert exactly(stored_state(store, "client", algorithm)) == exactly(state)
                    continue
                combined = store.hit([("client", algorithm)], now, cost)
                assert exactly(combined.decision) == exactly(expected.decision), (now, cost)
                assert combined.limit_index == 0
                # Decided in C, or handed back to Python (a limit or a cost past 2**50).
                in_c = locks == "mutex" and shm._c_params(algorithm) and cost <= 2**50
                assert combined.states == (() if in_c else expected.states)
                state = expected.states[0]
            assert exactly(stored_state(store, "client", algorithm)) == exactly(state)
    path.unlink()


# Short windows and buckets, so that records expire between steps, and long ones, so that
# the stripe fills and evicts (records of one window all expire together: ties to break); a
# quota is decided in Python on both sides.
TABLE_ALGORITHMS: list[RateAlgorithm[Any]] = [
    FixedWindow(3, 2.5),
    FixedWindow(3, 30),
    SlidingWindowCounter(4, 1.5),
    SlidingWindowCounter(4, 20),
    TokenBucket(rate=0.8, burst=3),
    TokenBucket(rate=0.1, burst=3),
    LeakyBucket(rate=2, max_delay=1.5),
    Concurrency(2, 0.7),
    CalendarQuota(5, "day", "Europe/Paris"),
]
table_operations = st.lists(
    st.one_of(
        # hit: a key of sixteen, an algorithm, seconds since the last step, a cost (0: refused)
        st.tuples(
            st.just("hit"),
            st.integers(0, 15),
            st.integers(0, len(TABLE_ALGORITHMS) - 1),
            st.one_of(st.just(0.0), st.floats(0, 0.5), st.floats(0, 3), st.floats(-2, 0)),
            st.integers(0, 4),
        ),
        st.tuples(
            st.just("hit"),
            st.integers(0, 15),
            st.integers(0, len(TABLE_ALGORITHMS) - 1),
            st.just(0.0),
            st.just(1),
        ),
        st.tuples(
            st.just("release"), st.integers(0, 15), st.just(0), st.just(0.0), st.integers(1, 3)
        ),
        # tear: flip a byte of a slot (of four), as a writer dying mid-write would leave it
        st.tuples(st.just("tear"), st.integers(0, 3), st.integers(0, 63), st.just(0.0), st.just(0)),
    ),
    min_size=10,
    max_size=120,
)


def table_bytes(store: SharedMemoryStore) -> bytes:
    """The records and each stripe's eviction counter (not the mutexes beside them)."""
    mapped = store._map
    counters = b"".join(
        mapped[HEADER_SIZE + stripe * 64 : HEADER_SIZE + stripe * 64 + 12]
        for stripe in range(store._stripes)
    )
    return counters + mapped[store._records_at :]


def outcome(
    store: SharedMemoryStore, key: str, algorithm: RateAlgorithm[Any], now: float, cost: int
) -> Any:
    try:
        combined = store.hit([(key, algorithm)], now, cost)
    except ValueError as error:
        return type(error), str(error)
    return exactly(combined.decision), combined.limit_index


@EXAMPLES
@given(operations=table_operations)
def test_the_c_fills_and_evicts_the_table_byte_for_byte_as_python_does(
    tmp_path: Path, operations: list[tuple[str, int, int, float, int]]
) -> None:
    # Two copies of one store file (one salt, so one place per key): one decided in C, the other
    # by the pure-Python path (struct codec, mmap.find, Python's choice of a free slot). After
    # every step both tables hold the same bytes: new keys take the same slots, expired and
    # torn records are reused alike, the same records are evicted and counted.
    require_compiled()
    name = uuid.uuid4().hex
    with SharedMemoryStore.create(tmp_path / f"{name}.c.shm", 4) as in_c:  # one stripe of 4
        shutil.copyfile(tmp_path / f"{name}.c.shm", tmp_path / f"{name}.py.shm")
        with SharedMemoryStore.open(tmp_path / f"{name}.py.shm", locking=False) as in_python:
            in_python._c = None
            now = NOW
            for action, key_index, index, gap, cost in operations:
                now += gap
                key = f"client-{key_index}"
                if action == "tear":
                    at = in_c._records_at + key_index * RECORD_SIZE + index
                    for store in (in_c, in_python):
                        store._map[at] ^= 0x5A
                elif action == "release":
                    in_c.release(key, cost)
                    in_python.release(key, cost)
                else:
                    algorithm = TABLE_ALGORITHMS[index]
                    decided = outcome(in_c, key, algorithm, now, cost)
                    assert decided == outcome(in_python, key, algorithm, now, cost)
                assert table_bytes(in_c) == table_bytes(in_python)
            assert in_c.evictions() == in_python.evictions()
            event(f"evictions: {min(in_c.evictions(), 3)}")
    for suffix in ("c", "py"):
        (tmp_path / f"{name}.{suffix}.shm").unlink()


def test_what_the_c_does_not_take_is_decided_in_python(store: SharedMemoryStore) -> None:
    # A cost or a limit past 2**50, and a stored count past it (a limit lowered by a reload),
    # are handed back: decided in Python, the same as ever.
    window = FixedWindow(10, 60)
    huge = FixedWindow(2**62, 60)
    cases: list[tuple[RateAlgorithm[Any], int]] = [
        (window, 2**50 + 1),
        (huge, 2**51),  # stores a count past 2**50 for the next one to read
        (window, 1),
        (TokenBucket(rate=1, burst=2**51), 1),
    ]
    state: dict[str, Any] = {}
    for algorithm, cost in cases:
        expected = decide_all([(algorithm, state.get(algorithm.kind))], NOW, cost)
        combined = store.hit([("client", algorithm)], NOW, cost)
        assert exactly(combined.decision) == exactly(expected.decision)
        assert combined.states == expected.states  # the Python path's, states and all
        state[algorithm.kind] = expected.states[0]
    assert exactly(stored_state(store, "client", window)) == exactly(state["fixed-window"])


def test_a_time_that_is_an_int_decides_as_that_float(store: SharedMemoryStore) -> None:
    # Interpreted, the C hands an int back to Python; compiled, the store's signature makes it
    # a float first. Either way the decision is the algorithm's.
    window = SlidingWindowCounter(3, 60)
    state = None
    for now in (1_700_000_000, 1_700_000_001, 1_700_000_061):
        expected = decide_all([(window, state)], now, 2)
        assert store.hit([("client", window)], now, 2).decision == expected.decision
        state = expected.states[0]
    assert stored_state(store, "client", window) == state


def test_a_cost_below_one_is_refused_before_the_c_decides(store: SharedMemoryStore) -> None:
    for algorithm in fixed_size_algorithms():
        with pytest.raises(ValueError, match="cost"):
            store.hit([("client", algorithm)], NOW, 0)
    assert store.used() == 0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_the_compiled_crc32_is_zlibs(data: bytes) -> None:
    # Eight bytes a step in C (a record's 56 are seven steps), a byte a step for the rest.
    require_compiled()
    assert shm._C.crc32(data) == zlib.crc32(data)


@EXAMPLES
@given(algorithm=algorithms_in_c, start=starts, steps=arrivals)
def test_hit_fields_counts_as_hit_does_and_renders_the_limiters_fields(
    tmp_path: Path,
    algorithm: RateAlgorithm[Any],
    start: float,
    steps: list[tuple[float, int, bool]],
) -> None:
    # The request path's one call (admit and render the header lines in C) against `hit` and
    # the `%`-template: the same decisions, the same lines, the same table after every step.
    require_compiled()
    headers = LimitHeaders.render('per "x" 100%', 7, 60.0)
    policy = policy_field([headers])
    pieces = fields_pieces(policy, headers)
    template = fields_template(policy, headers)
    name = uuid.uuid4().hex
    with SharedMemoryStore.create(tmp_path / f"{name}.a.shm", 64) as fast:
        shutil.copyfile(tmp_path / f"{name}.a.shm", tmp_path / f"{name}.b.shm")
        with SharedMemoryStore.open(tmp_path / f"{name}.b.shm", locking=False) as plain:
            now = start
            for gap, cost, release in steps:
                now += gap
                if release and isinstance(algorithm, Concurrency):
                    fast.release("client", cost)
                    plain.release("client", cost)
                    continue
                try:
                    expected = plain.hit([("client", algorithm)], now, cost).decision
                except ArithmeticError as error:
                    with pytest.raises(type(error)):
                        fast.hit_fields("client", algorithm, now, cost, pieces)
                    continue
                before = table_bytes(fast)
                got = fast.hit_fields("client", algorithm, now, cost, pieces)
                event(f"hit_fields: {type(got).__name__}")
                if got is None:  # not the C's to decide: nothing counted, `hit` decides
                    assert table_bytes(fast) == before
                    got = fast.hit([("client", algorithm)], now, cost).decision
                    assert exactly(got) == exactly(expected)
                elif isinstance(got, bytes):
                    assert expected.allowed and expected.delay == 0
                    reset = whole_seconds(expected.reset_after)
                    assert got == template % (expected.remaining, reset, expected.remaining, reset)
                else:
                    # Refused, waiting, or a reset too long to tell (`LONGEST_RESET`).
                    assert (
                        not expected.allowed
                        or expected.delay > 0
                        or expected.reset_after >= LONGEST_RESET
                    )
                    assert exactly(Decision(*got)) == exactly(expected)
                assert table_bytes(fast) == table_bytes(plain)
    for suffix in ("a", "b"):
        (tmp_path / f"{name}.{suffix}.shm").unlink()


def test_hit_fields_leaves_what_the_c_cannot_take_to_hit(
    store: SharedMemoryStore, locks: str
) -> None:
    headers = LimitHeaders.render("m", 10, 60.0)
    pieces = fields_pieces(policy_field([headers]), headers)
    quota = CalendarQuota(5, "day", "Europe/Paris")
    window = FixedWindow(10, 60)
    assert store.hit_fields("client", quota, NOW, 1, pieces) is None
    assert store.hit_fields("client", window, NOW, 2**50 + 1, pieces) is None
    if locks == "fcntl":  # no compiled primitives: every request is `hit`'s
        assert store.hit_fields("client", window, NOW, 1, pieces) is None
    assert store.peek("client", window, NOW).remaining == 9  # nothing counted
    if locks == "fcntl":
        return
    with pytest.raises(TypeError, match="five bytes"):
        store.hit_fields("client", FixedWindow(10, 60), NOW, 1, pieces[:4])
