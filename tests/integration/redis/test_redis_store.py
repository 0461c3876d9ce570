"""The Redis store against a real redis-server: the pure algorithms' decisions, atomically.

With an injected FakeClock the store's decisions (and the states it leaves in Redis) must be
those of the pure algorithms and `decide_all`, exactly; with the server's clock, two stores
sharing one Redis must never admit more than the limit between them.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from tollgate.clock import FakeClock
from tollgate.ratelimit import (
    BucketState,
    CalendarQuota,
    Concurrency,
    FixedWindow,
    LeakyBucket,
    QueueState,
    RateAlgorithm,
    SlidingCounterState,
    SlidingLogState,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
    WindowCount,
    decide_all,
)
from tollgate.ratelimit.redis_store import RedisStore, hash_tag

# The `make_store` fixture (conftest.py): connected stores, closed after the test.
StoreMaker = Callable[..., Awaitable[RedisStore]]

BASE = 1_700_000_000.0
EXAMPLES = settings(max_examples=30, deadline=None)

Limits = list[tuple[str, RateAlgorithm[Any]]]

# -- the pure algorithms, step by step ----------------------------------------------------------


def arrivals(max_gap_ms: int = 3000) -> st.SearchStrategy[list[tuple[int, int]]]:
    """(milliseconds since the previous arrival, cost) pairs; bursts (gap 0) included."""
    gap = st.one_of(st.just(0), st.integers(0, max_gap_ms))
    return st.lists(st.tuples(gap, st.integers(1, 5)), min_size=1, max_size=60)


windows = st.sampled_from([0.5, 1.0, 2.5, 10.0, 60.0])
limits = st.integers(1, 20)
rates = st.sampled_from([0.5, 1.0, 3.0, 7.5, 100.0, 1 / 3])
max_delays = st.sampled_from([0.0, 0.3, 1.0, 4.0])

ALGORITHMS: dict[str, st.SearchStrategy[RateAlgorithm[Any]]] = {
    "fixed-window": st.builds(FixedWindow, limits, windows),
    "sliding-window": st.builds(SlidingWindowCounter, limits, windows),
    "sliding-window-log": st.builds(SlidingWindowLog, limits, windows),
    "token-bucket": st.builds(TokenBucket, rates, limits),
    "leaky-bucket": st.builds(LeakyBucket, rates, max_delays),
    "concurrency": st.builds(Concurrency, limits, st.sampled_from([0.5, 1.0, 2.5])),
}

# Quota periods end at local midnights: start near daylight-saving changes and month ends, and
# arrive hours apart, so that sequences cross days (and sometimes months).
QUOTA_STARTS = [
    BASE,
    datetime(2024, 3, 30, 20, tzinfo=UTC).timestamp(),  # Europe/Paris springs forward on the 31st
    datetime(2024, 10, 26, 20, tzinfo=UTC).timestamp(),  # and falls back on the 27th
    datetime(2024, 1, 31, 18, tzinfo=UTC).timestamp(),  # a month ends
]
quotas = st.builds(
    CalendarQuota,
    limits,
    st.sampled_from(["day", "month"]),
    st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
)


def stored_state(server: RedisServer, prefix: str, algorithm: RateAlgorithm[Any]) -> Any:
    """The state the store left in Redis for the one key under `prefix`, as the pure kind."""
    keys = server.command("KEYS", prefix + "*")
    if not keys:
        return None
    (key,) = keys
    if isinstance(algorithm, SlidingWindowLog):
        flat = server.command("ZRANGE", key, 0, -1, "WITHSCORES")
        members = [(flat[index], float(flat[index + 1])) for index in range(0, len(flat), 2)]
        entries = tuple((stamp, int(member[:16])) for member, stamp in members)
        first_cost = int(members[0][0][17:])
        return SlidingLogState(entries[0][1] - first_cost, entries)
    value = server.command("GET", key)
    if isinstance(algorithm, Concurrency):
        return int(value)
    fields = struct.unpack(f"<{len(value) // 8}d", value)  # packed doubles
    if isinstance(algorithm, FixedWindow | CalendarQuota):
        return WindowCount(float(fields[0]), int(fields[1]))
    if isinstance(algorithm, SlidingWindowCounter):
        return SlidingCounterState(float(fields[0]), int(fields[1]), int(fields[2]))
    if isinstance(algorithm, TokenBucket):
        return BucketState(float(fields[0]), float(fields[1]))
    if isinstance(algorithm, LeakyBucket):
        return QueueState(float(fields[0]), float(fields[1]))
    raise AssertionError(f"no state format for {algorithm!r}")


async def replay(
    server: RedisServer,
    algorithm: RateAlgorithm[Any],
    steps: list[tuple[int, int]],
    start: float = BASE,
    functions: bool = True,
) -> None:
    """Hit the store and the pure algorithm alike at each step; they must agree exactly."""
    clock = FakeClock(wall=start)
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisStore(server.url, clock=clock, key_prefix=prefix, functions=functions)
    try:
        key = f"rate-limit|svc/route|limit|{algorithm.kind}|consumer=acme"
        state = None
        for gap_ms, cost in steps:
            clock.advance(gap_ms / 1000)
            expected = decide_all([(algorithm, state)], clock.wall(), cost)
            combined = await store.hit([(key, algorithm)], cost)
            assert combined.decision == expected.decision, (clock.wall(), cost, state)
            assert combined.limit_index == 0
            state = expected.states[0]
        assert stored_state(server, prefix, algorithm) == state
        assert await store.peek(key, algorithm) == algorithm.decide(state, clock.wall(), 1)[0]
    finally:
        await store.close()


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
@pytest.mark.parametrize("kind", ALGORITHMS)
def test_each_algorithm_decides_in_redis_as_the_pure_one(
    shared_redis: RedisServer, kind: str, functions: bool
) -> None:
    # Each example has keys of its own (a prefix of its own): nothing to empty between them.
    @EXAMPLES
    @given(ALGORITHMS[kind], arrivals())
    def check(algorithm: RateAlgorithm[Any], steps: list[tuple[int, int]]) -> None:
        asyncio.run(replay(shared_redis, algorithm, steps, functions=functions))

    check()


@EXAMPLES
@given(quotas, arrivals(max_gap_ms=8 * 3_600_000), st.sampled_from(QUOTA_STARTS))
def test_a_calendar_quota_decides_in_redis_as_the_pure_one(
    shared_redis: RedisServer,
    quota: CalendarQuota,
    steps: list[tuple[int, int]],
    start: float,
) -> None:
    asyncio.run(replay(shared_redis, quota, steps, start))


@EXAMPLES
@given(
    st.lists(st.one_of(*ALGORITHMS.values(), quotas), min_size=2, max_size=4),
    arrivals(max_gap_ms=2000),
)
def test_several_limits_decide_in_redis_as_decide_all(
    shared_redis: RedisServer, algorithms: list[RateAlgorithm[Any]], steps: list[tuple[int, int]]
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        prefix = f"test:{uuid.uuid4().hex}:"
        store = RedisStore(shared_redis.url, clock=clock, key_prefix=prefix)
        keyed: Limits = [
            (f"rate-limit|svc/route|limit-{index}|fp|consumer=acme|ip=10.0.0.1", algorithm)
            for index, algorithm in enumerate(algorithms)
        ]
        states: list[Any] = [None] * len(algorithms)
        try:
            for gap_ms, cost in steps:
                clock.advance(gap_ms / 1000)
                pairs = list(zip(algorithms, states, strict=True))
                expected = decide_all(pairs, clock.wall(), cost)
                combined = await store.hit(keyed, cost)
                assert combined.decision == expected.decision
                assert combined.limit_index == expected.limit_index
                states = list(expected.states)
        finally:
            await store.close()

    asyncio.run(scenario())


# -- several limits -----------------------------------------------------------------------------


async def test_a_request_rejected_by_one_limit_spends_none_of_the_others(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url, clock=FakeClock())
    per_second = TokenBucket(rate=1, burst=5)
    per_hour = FixedWindow(2, 3600)
    log = SlidingWindowLog(10, 60)
    limits: Limits = [("s|second|fp|acme", per_second), ("s|hour|fp|acme", per_hour)]
    limits.append(("s|log|fp|acme", log))
    assert (await store.hit(limits, 1)).decision.allowed
    assert (await store.hit(limits, 1)).decision.allowed
    rejected = await store.hit(limits, 1)
    assert not rejected.decision.allowed
    assert rejected.limit_index == 1
    # The bucket and the log were spent twice, not three times.
    assert (await store.peek("s|second|fp|acme", per_second)).remaining == 2
    assert (await store.peek("s|log|fp|acme", log)).remaining == 7


async def test_a_key_twice_with_one_algorithm_kind_in_one_hit_is_refused(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    with pytest.raises(ValueError, match="twice"):
        await store.hit([("acme", FixedWindow(1, 60)), ("acme", FixedWindow(5, 1))], 1)
    # One key under two kinds is two states.
    window = FixedWindow(1, 60)
    bucket = TokenBucket(rate=1, burst=3)
    assert (await store.hit([("acme", window), ("acme", bucket)], 1)).decision.allowed
    assert not (await store.peek("acme", window)).allowed
    assert (await store.peek("acme", bucket)).remaining == 1


async def test_costs_and_limits_are_checked_before_anything_is_sent(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    with pytest.raises(ValueError, match="cost"):
        await store.hit([("acme", FixedWindow(1, 60))], 0)
    with pytest.raises(ValueError, match="at least one limit"):
        await store.hit([], 1)
    with pytest.raises(ValueError, match="braces"):
        RedisStore(redis.url, key_prefix="rl:{x}:")
    with pytest.raises(ValueError, match="no script"):
        await store.hit([("acme", Unknown())], 1)
    with pytest.raises(ValueError, match="cost"):
        await store.release("acme", 0)
    assert redis.command("DBSIZE") == 0


class Unknown:
    """An algorithm the store has no script for."""

    kind: ClassVar[str] = "unknown"

    def decide(self, state: None, now: float, cost: int = 1) -> Any:
        raise NotImplementedError

    def expires_at(self, state: None) -> float:
        raise NotImplementedError


# -- exactness with the server's clock ----------------------------------------------------------


async def test_two_stores_sharing_redis_admit_exactly_the_limit(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    first = await make_store(redis.url)
    second = await make_store(redis.url)
    limit: Limits = [
        ("rate-limit|svc/route|minute|fp|consumer=acme", SlidingWindowCounter(100, 3600))
    ]
    hits = [(first if index % 2 else second).hit(limit, 1) for index in range(1000)]
    outcomes = await asyncio.gather(*hits)
    admitted = [combined for combined in outcomes if combined.decision.allowed]
    assert len(admitted) == 100
    # Each admission saw the count the one before it left: remaining 99, 98... 0, once each.
    assert sorted(combined.decision.remaining for combined in admitted) == list(range(100))


async def test_server_time_drives_windows_when_no_clock_is_given(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    window = FixedWindow(2, 3600)
    first = await store.hit([("acme", window)], 1)
    seconds, micros = redis.command("TIME")
    now = int(seconds) + int(micros) / 1e6
    assert first.decision.allowed
    # The window ends on the server's next hour (a few ms of the call between the readings).
    assert first.decision.reset_after == pytest.approx(3600 - now % 3600, abs=0.5)
    assert (await store.hit([("acme", window)], 1)).decision.allowed
    rejected = await store.hit([("acme", window)], 1)
    assert not rejected.decision.allowed
    assert rejected.decision.retry_after == pytest.approx(3600 - now % 3600, abs=0.5)


async def test_a_quota_with_server_time_ends_at_the_local_midnight(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    quota = CalendarQuota(2, "day", "Asia/Kolkata")
    assert (await store.hit([("acme", quota)], 2)).decision.allowed
    rejected = await store.hit([("acme", quota)], 1)
    assert not rejected.decision.allowed
    local = datetime.now(quota.time_zone)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
    until = midnight.replace(tzinfo=quota.time_zone).timestamp() - time.time()
    assert rejected.decision.retry_after == pytest.approx(until, abs=1.0)
    assert rejected.decision.reset_after == pytest.approx(until, abs=1.0)


# -- peek, reset, release -----------------------------------------------------------------------


async def test_peek_spends_nothing(redis: RedisServer, make_store: StoreMaker) -> None:
    store = await make_store(redis.url, clock=FakeClock())
    window = FixedWindow(1, 60)
    for _ in range(3):
        assert (await store.peek("acme", window)).allowed
    assert (await store.hit([("acme", window)], 1)).decision.allowed
    peeked = await store.peek("acme", window)
    assert not peeked.allowed and peeked.remaining == 0
    assert redis.command("DBSIZE") == 1


async def test_reset_forgets_a_key_under_every_algorithm(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url, clock=FakeClock())
    window = FixedWindow(1, 60)
    log = SlidingWindowLog(1, 60)
    await store.hit([("acme", window), ("acme", log)], 1)
    await store.hit([("other", window)], 1)
    await store.reset("acme")
    assert (await store.hit([("acme", window), ("acme", log)], 1)).decision.allowed
    assert not (await store.hit([("other", window)], 1)).decision.allowed


async def test_release_gives_a_concurrency_slot_back(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    slots = Concurrency(2, retry_after=2.5)
    assert (await store.hit([("upload", slots)], 1)).decision.allowed
    assert (await store.hit([("upload", slots)], 1)).decision.allowed
    busy = await store.hit([("upload", slots)], 1)
    assert not busy.decision.allowed
    assert (busy.decision.retry_after, busy.decision.reset_after) == (2.5, 2.5)
    await store.release("upload", 1)
    assert (await store.hit([("upload", slots)], 1)).decision.allowed
    # Releasing more than is in flight frees the key and never counts below zero.
    await store.release("upload", 5)
    assert redis.command("DBSIZE") == 0
    assert (await store.peek("upload", slots)).remaining == 1
    await store.release("never-acquired", 1)
    assert redis.command("DBSIZE") == 0


# -- keys ---------------------------------------------------------------------------------------


def tag_of(key: bytes) -> bytes:
    return key[key.index(b"{") + 1 : key.index(b"}")]


async def test_the_keys_of_one_request_share_one_hash_tag(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    store = await make_store(redis.url)
    client = "consumer=acme|ip=10.0.0.1"
    keyed: Limits = [
        (f"rate-limit|orders/list|second|token-bucket:burst=5|{client}", TokenBucket(1, 5)),
        (f"rate-limit|orders/list|hour|fixed-window:limit=9|{client}", FixedWindow(9, 3600)),
        (f"rate-limit|orders/list|exact|log|{client}", SlidingWindowLog(9, 60)),
    ]
    await store.hit(keyed, 1)
    await store.hit([("rate-limit|orders/list|hour|fp|consumer=globex", FixedWindow(9, 3600))], 1)
    keys = redis.command("KEYS", "tollgate:rl:*")
    assert len(keys) == 4
    acme = {tag_of(key) for key in keys if b"acme" in key}
    globex = {tag_of(key) for key in keys if b"globex" in key}
    assert len(acme) == 1 and len(globex) == 1 and acme != globex
    assert all(key.startswith(b"tollgate:rl:{") for key in keys)


async def test_a_request_with_several_limits_runs_on_a_redis_cluster(
    make_store: StoreMaker,
) -> None:
    # A one-node cluster holding every slot: a script whose keys span two slots would be
    # refused with CROSSSLOT.
    with RedisServer(extra=("--cluster-enabled", "yes")) as server:
        server.command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in server.command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never became ready"
            await asyncio.sleep(0.05)
        store = await make_store(server.url)
        client = "consumer=acme|ip=10.0.0.1"
        keyed: Limits = [
            (f"rate-limit|a/b|second|fp1|{client}", TokenBucket(1, 5)),
            (f"rate-limit|a/b|day|fp2|{client}", CalendarQuota(100, "day", "UTC")),
        ]
        assert (await store.hit(keyed, 1)).decision.allowed
        slots = {server.command("CLUSTER", "KEYSLOT", key) for key in server.command("KEYS", "*")}
        assert len(slots) == 1
        with pytest.raises(hiredis.ReplyError, match="CROSSSLOT"):
            server.command("EVAL", "return 1", 2, "a", "b")
        await store.close()


async def test_keys_expire_once_their_state_counts_for_nothing(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    clock = FakeClock(wall=BASE - BASE % 60 + 15)  # 15 s into a 60 s window
    store = await make_store(redis.url, clock=clock)
    await store.hit([("acme", FixedWindow(5, 60))], 1)
    await store.hit([("acme", TokenBucket(rate=2, burst=10))], 4)  # full again in 2 s
    await store.hit([("acme", Concurrency(5))], 1)
    # The kind code follows the hash tag: {tag}f:acme, {tag}t:acme...
    by_kind = {
        key.split(b"}")[1][:1]: redis.command("PTTL", key) for key in redis.command("KEYS", "*")
    }
    assert 45_000 < by_kind[b"f"] <= 46_000  # the window's 45 s left, and a second of slack
    assert 2_000 < by_kind[b"t"] <= 3_000
    assert 3_590_000 < by_kind[b"c"] <= 3_600_000  # until released, or an hour idle


async def test_a_window_kept_keeps_its_expiry_and_a_new_length_sets_it_again(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    def expiry(kind: bytes) -> int:
        [key] = [key for key in redis.command("KEYS", "*") if key.split(b"}")[1][:1] == kind]
        return int(redis.command("PTTL", key))

    for algorithm, kind in ((FixedWindow(5, 60), b"f"), (SlidingWindowCounter(5, 60), b"s")):
        clock = FakeClock(wall=BASE - BASE % 120 + 15)  # 15 s into a 60 s and a 120 s window
        store = await make_store(redis.url, clock=clock)
        await store.hit([("acme", algorithm)], 1)
        first = expiry(kind)
        assert 45_000 < first <= 46_000 if kind == b"f" else 105_000 < first <= 106_000
        clock.advance(10)  # the same window: its end, and the key's expiry, stay
        assert (await store.hit([("acme", algorithm)], 1)).decision.remaining == 3
        assert first - 1_000 < expiry(kind) <= first
        # The same key, a window twice as long: the stored window is kept (it starts with the
        # long one), and the key lives until the long window's end.
        longer = type(algorithm)(5, 120)
        assert (await store.hit([("acme", longer)], 1)).decision.remaining == 2
        if kind == b"f":
            assert 95_000 < expiry(kind) <= 96_000
        else:
            assert 215_000 < expiry(kind) <= 216_000


async def test_windows_stored_without_their_length_are_read_and_given_it(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    # An earlier version stored ``start spent`` and ``start previous current``.
    now = BASE - BASE % 60 + 15
    store = await make_store(redis.url, clock=FakeClock(wall=now), key_prefix="old:")
    start, tag = now - 15, hash_tag("acme")
    redis.command("SET", f"old:{{{tag}}}f:acme", struct.pack("<dd", start, 3))
    redis.command("SET", f"old:{{{tag}}}s:acme", struct.pack("<ddd", start, 0, 2))
    fixed = await store.hit([("acme", FixedWindow(5, 60))], 1)
    sliding = await store.hit([("acme", SlidingWindowCounter(5, 60))], 1)
    assert (fixed.decision.remaining, sliding.decision.remaining) == (1, 2)
    for kind, count in ((b"f", 3), (b"s", 4)):
        [key] = [key for key in redis.command("KEYS", "*") if key.split(b"}")[1][:1] == kind]
        assert len(redis.command("GET", key)) == count * 8  # now with the window's length
        assert 0 < int(redis.command("PTTL", key)) <= (46_000 if kind == b"f" else 106_000)


async def test_retry_after_is_exact_at_the_boundary(
    redis: RedisServer, make_store: StoreMaker
) -> None:
    # A client that waits exactly retry_after is admitted, and not a moment earlier.
    clock = FakeClock()
    store = await make_store(redis.url, clock=clock)
    bucket = TokenBucket(rate=3, burst=1)
    assert (await store.hit([("acme", bucket)], 1)).decision.allowed
    rejected = await store.hit([("acme", bucket)], 1)
    wait = rejected.decision.retry_after
    assert 0 < wait < math.inf
    moment = clock.wall() + wait
    early = await make_store(redis.url, clock=FakeClock(wall=math.nextafter(moment, 0)))
    assert not (await early.peek("acme", bucket)).allowed
    on_time = await make_store(redis.url, clock=FakeClock(wall=moment))
    assert (await on_time.hit([("acme", bucket)], 1)).decision.allowed
