"""The rate-limit algorithms, one behaviour at a time, on a fake clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tollgate.clock import FakeClock
from tollgate.ratelimit import (
    ALGORITHM_KINDS,
    BucketState,
    CalendarQuota,
    Concurrency,
    ConcurrencyLimiter,
    Decision,
    FixedWindow,
    LeakyBucket,
    LocalLimiter,
    QueueState,
    RateAlgorithm,
    SlidingCounterState,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
    WindowCount,
    decide_all,
)

# 2023-11-14T22:13:20Z: a multiple of 20 seconds, not of a minute (it is 22:13:20).
NOW = 1_700_000_000.0
MINUTE_START = NOW - 20.0


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def local(text: str, zone: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def spend(algorithm: RateAlgorithm[Any], times: int, now: float, cost: int = 1) -> Any:
    """The state after `times` admitted requests of `cost` at `now`."""
    state = None
    for _ in range(times):
        decision, state = algorithm.decide(state, now, cost)
        assert decision.allowed
    return state


def assert_retry_after_is_exact(
    algorithm: RateAlgorithm[Any], state: Any, now: float, cost: int = 1
) -> float:
    """A request rejected at `now` passes at `now + retry_after`, and not a millisecond before."""
    decision, same = algorithm.decide(state, now, cost)
    assert not decision.allowed
    assert same is state
    retry = decision.retry_after
    assert 0.001 < retry < math.inf
    assert algorithm.decide(state, now + retry, cost)[0].allowed
    assert not algorithm.decide(state, now + retry - 0.001, cost)[0].allowed
    return retry


# -- every algorithm -------------------------------------------------------------------------


def every_algorithm() -> list[RateAlgorithm[Any]]:
    return [
        FixedWindow(10, 60),
        SlidingWindowLog(10, 60),
        SlidingWindowCounter(10, 60),
        TokenBucket(rate=1, burst=10),
        LeakyBucket(rate=1, max_delay=9),
        Concurrency(10),
        CalendarQuota(10, "day", "Europe/Paris"),
    ]


def test_every_kind_named_in_config_has_one_algorithm() -> None:
    kinds = [algorithm.kind for algorithm in every_algorithm()]
    assert sorted(kinds) == sorted(ALGORITHM_KINDS)


@pytest.mark.parametrize("algorithm", every_algorithm(), ids=repr)
def test_every_algorithm_admits_ten_of_cost_one_then_rejects(algorithm: RateAlgorithm[Any]) -> None:
    state = spend(algorithm, 10, NOW)
    decision, after = algorithm.decide(state, NOW)
    assert not decision.allowed
    assert decision.remaining == 0
    assert decision.retry_after > 0
    assert after is state


@pytest.mark.parametrize("algorithm", every_algorithm(), ids=repr)
def test_every_algorithm_counts_remaining_down_to_zero(algorithm: RateAlgorithm[Any]) -> None:
    state = None
    remaining = []
    for _ in range(10):
        decision, state = algorithm.decide(state, NOW)
        remaining.append(decision.remaining)
        assert decision.limit == 10
        assert decision.retry_after == 0.0
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("algorithm", every_algorithm(), ids=repr)
def test_every_algorithm_weighs_a_request_by_its_cost(algorithm: RateAlgorithm[Any]) -> None:
    decision, state = algorithm.decide(None, NOW, cost=4)
    assert decision.remaining == 6
    decision, state = algorithm.decide(state, NOW, cost=6)
    assert decision.allowed
    assert decision.remaining == 0


@pytest.mark.parametrize("algorithm", every_algorithm(), ids=repr)
def test_every_algorithm_lets_a_rejected_request_consume_nothing(
    algorithm: RateAlgorithm[Any],
) -> None:
    state = spend(algorithm, 7, NOW)
    rejected, after = algorithm.decide(state, NOW, cost=5)
    assert not rejected.allowed
    assert after is state
    assert rejected.remaining == 3
    # The three that were left are still there.
    assert algorithm.decide(state, NOW, cost=3)[0].allowed


@pytest.mark.parametrize(
    "algorithm", [a for a in every_algorithm() if not isinstance(a, LeakyBucket)], ids=repr
)
def test_every_limit_says_a_cost_above_it_never_passes(algorithm: RateAlgorithm[Any]) -> None:
    decision, state = algorithm.decide(None, NOW, cost=11)
    assert not decision.allowed
    assert decision.retry_after == math.inf
    assert decision.remaining == 10
    assert state is None


@pytest.mark.parametrize("algorithm", every_algorithm(), ids=repr)
@pytest.mark.parametrize("cost", [0, -1])
def test_every_algorithm_refuses_a_cost_below_one(algorithm: RateAlgorithm[Any], cost: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        algorithm.decide(None, NOW, cost)


@pytest.mark.parametrize(
    "build",
    [
        lambda: FixedWindow(0, 60),
        lambda: FixedWindow(10, 0),
        lambda: FixedWindow(10, math.inf),
        lambda: SlidingWindowLog(10, -1),
        lambda: SlidingWindowCounter(2.5, 60),  # type: ignore[arg-type]
        lambda: TokenBucket(rate=0, burst=10),
        lambda: TokenBucket(rate=1, burst=0),
        lambda: LeakyBucket(rate=1, max_delay=-1),
        lambda: LeakyBucket(rate=math.nan, max_delay=1),
        lambda: Concurrency(0),
        lambda: CalendarQuota(10, "week"),
    ],
)
def test_every_algorithm_refuses_a_meaningless_setting(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


# -- fixed window ----------------------------------------------------------------------------


def test_fixed_window_rejects_the_101st_request_in_the_window() -> None:
    limiter = LocalLimiter(FixedWindow(100, 60), clock=FakeClock(wall=NOW))
    assert all(limiter.hit("k").allowed for _ in range(100))
    assert not limiter.hit("k").allowed


@pytest.mark.parametrize(
    ("window", "reset_after"),
    [(1, 1), (60, 40), (3600, 3600 - (13 * 60 + 20)), (86400, 86400 - (22 * 3600 + 13 * 60 + 20))],
)
def test_fixed_window_aligns_windows_to_the_epoch(window: int, reset_after: int) -> None:
    # NOW is 2023-11-14T22:13:20Z.
    decision, state = FixedWindow(10, window).decide(None, NOW)
    assert decision.reset_after == reset_after
    assert state == WindowCount(NOW + reset_after - window, 1)


def test_fixed_window_of_seven_seconds_starts_at_multiples_of_seven_since_the_epoch() -> None:
    algorithm = FixedWindow(1, 7)
    _, state = algorithm.decide(None, 70.5)
    assert state == WindowCount(70.0, 1)
    assert not algorithm.decide(state, 76.999)[0].allowed
    assert algorithm.decide(state, 77.0)[0].allowed


def test_fixed_window_starts_afresh_when_the_next_window_begins() -> None:
    clock = FakeClock(wall=MINUTE_START + 59)
    limiter = LocalLimiter(FixedWindow(3, 60), clock=clock)
    assert [limiter.hit("k").allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(1)
    assert [limiter.hit("k").allowed for _ in range(4)] == [True, True, True, False]


def test_fixed_window_retry_after_is_the_time_to_the_next_window() -> None:
    algorithm = FixedWindow(3, 60)
    state = spend(algorithm, 3, NOW)
    assert assert_retry_after_is_exact(algorithm, state, NOW) == 40.0


def test_fixed_window_keeps_counting_when_the_wall_clock_steps_back_a_window() -> None:
    algorithm = FixedWindow(2, 60)
    state = spend(algorithm, 2, MINUTE_START + 1)
    decision, _ = algorithm.decide(state, MINUTE_START - 5)
    assert not decision.allowed
    assert decision.retry_after == 65.0  # until the end of the later window


def test_fixed_window_expires_a_state_at_the_end_of_its_window() -> None:
    algorithm = FixedWindow(2, 60)
    assert algorithm.expires_at(WindowCount(MINUTE_START, 1)) == MINUTE_START + 60


# -- sliding window log ----------------------------------------------------------------------


def test_sliding_log_rejects_the_101st_request_in_the_window() -> None:
    clock = FakeClock(wall=NOW)
    limiter = LocalLimiter(SlidingWindowLog(100, 60), clock=clock)
    for _ in range(100):
        assert limiter.hit("k").allowed
        clock.advance(0.5)
    assert not limiter.hit("k").allowed


def test_sliding_log_admits_again_once_the_oldest_request_leaves_the_window() -> None:
    algorithm = SlidingWindowLog(3, 10)
    state = None
    for at in (NOW, NOW + 2, NOW + 4):
        _, state = algorithm.decide(state, at)
    assert assert_retry_after_is_exact(algorithm, state, NOW + 5) == 5.0
    decision, state = algorithm.decide(state, NOW + 10)
    assert decision.allowed
    assert decision.remaining == 0
    assert state is not None
    assert [at for at, _ in state.entries] == [NOW + 2, NOW + 4, NOW + 10]


def test_sliding_log_does_not_align_to_the_clock_the_way_a_fixed_window_does() -> None:
    algorithm = SlidingWindowLog(2, 60)
    state = spend(algorithm, 2, MINUTE_START + 59)
    assert not algorithm.decide(state, MINUTE_START + 61)[0].allowed


def test_sliding_log_waits_for_as_many_old_requests_to_leave_as_the_cost_needs() -> None:
    algorithm = SlidingWindowLog(10, 60)
    state = None
    for at, cost in ((NOW, 3), (NOW + 1, 4), (NOW + 2, 3)):
        _, state = algorithm.decide(state, at, cost)
    # Cost 5 needs the first two (3 + 4) to leave; the second leaves at NOW + 61.
    assert assert_retry_after_is_exact(algorithm, state, NOW + 30, cost=5) == 31.0
    assert assert_retry_after_is_exact(algorithm, state, NOW + 30, cost=3) == 30.0


def test_sliding_log_reset_after_is_when_its_newest_request_leaves() -> None:
    algorithm = SlidingWindowLog(5, 60)
    _, state = algorithm.decide(None, NOW)
    decision, state = algorithm.decide(state, NOW + 20)
    assert decision.reset_after == 60.0
    assert state is not None
    assert algorithm.expires_at(state) == NOW + 80


def test_sliding_log_keeps_no_entry_that_left_the_window() -> None:
    algorithm = SlidingWindowLog(3, 10)
    state = None
    for step in range(50):
        _, state = algorithm.decide(state, NOW + 4 * step)
    assert state is not None
    assert len(state.entries) == 3


def test_sliding_log_keeps_its_log_sorted_when_the_wall_clock_steps_back() -> None:
    algorithm = SlidingWindowLog(3, 10)
    _, state = algorithm.decide(None, NOW)
    _, state = algorithm.decide(state, NOW - 30)
    assert state is not None
    assert [at for at, _ in state.entries] == [NOW, NOW]


# -- sliding window counter ------------------------------------------------------------------


def test_sliding_counter_rejects_the_101st_request_in_the_window() -> None:
    limiter = LocalLimiter(SlidingWindowCounter(100, 60), clock=FakeClock(wall=NOW))
    assert all(limiter.hit("k").allowed for _ in range(100))
    assert not limiter.hit("k").allowed


def test_sliding_counter_weighs_the_previous_window_by_the_part_still_covered() -> None:
    algorithm = SlidingWindowCounter(100, 60)
    previous = SlidingCounterState(MINUTE_START - 60, 0, 80)
    # 15 s into the minute, three quarters of the previous one is still covered: 60 counted.
    decision, state = algorithm.decide(previous, MINUTE_START + 15)
    assert decision.remaining == 39
    assert state == SlidingCounterState(MINUTE_START, 80, 1)
    # 30 s in, half of it: 40.
    decision, _ = algorithm.decide(previous, MINUTE_START + 30)
    assert decision.remaining == 59


def test_sliding_counter_rounds_a_fraction_of_a_request_against_the_client() -> None:
    algorithm = SlidingWindowCounter(10, 60)
    previous = SlidingCounterState(MINUTE_START - 60, 0, 5)
    # 5 * 50/60 = 4.17 counted: five of cost 1 fit after this one? No: 10 - 1 - 4.17 = 4.83.
    decision, state = algorithm.decide(previous, MINUTE_START + 10)
    assert decision.remaining == 4
    for _ in range(4):
        decision, state = algorithm.decide(state, MINUTE_START + 10)
        assert decision.allowed
    assert not algorithm.decide(state, MINUTE_START + 10)[0].allowed


def test_sliding_counter_forgets_windows_before_the_previous_one() -> None:
    algorithm = SlidingWindowCounter(10, 60)
    old = SlidingCounterState(MINUTE_START - 120, 10, 10)
    decision, state = algorithm.decide(old, MINUTE_START + 1)
    assert decision.remaining == 9
    assert state == SlidingCounterState(MINUTE_START, 0, 1)


def test_sliding_counter_retry_after_waits_for_the_previous_window_to_fade() -> None:
    algorithm = SlidingWindowCounter(10, 60)
    state = SlidingCounterState(MINUTE_START, 10, 0)
    # 10 * (60 - e)/60 <= 9 from e = 6 s on.
    assert assert_retry_after_is_exact(algorithm, state, MINUTE_START + 1) == pytest.approx(5.0)


def test_sliding_counter_retry_after_reaches_into_the_next_window() -> None:
    algorithm = SlidingWindowCounter(10, 60)
    state = spend(algorithm, 10, MINUTE_START + 30)
    # In the next window the 10 fade: 10 * (60 - e)/60 <= 9 from e = 6 s on.
    retry = assert_retry_after_is_exact(algorithm, state, MINUTE_START + 30)
    assert retry == pytest.approx(36.0)


def test_sliding_counter_reset_after_is_when_the_current_count_has_faded() -> None:
    algorithm = SlidingWindowCounter(10, 60)
    decision, state = algorithm.decide(None, MINUTE_START + 30)
    assert decision.reset_after == 90.0
    assert state is not None
    assert algorithm.expires_at(state) == MINUTE_START + 120


# -- token bucket ----------------------------------------------------------------------------


def test_token_bucket_admits_a_burst_then_one_request_per_refilled_token() -> None:
    clock = FakeClock(wall=NOW)
    limiter = LocalLimiter(TokenBucket(rate=2, burst=5), clock=clock)
    assert [limiter.hit("k").allowed for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.5)
    assert [limiter.hit("k").allowed for _ in range(2)] == [True, False]


def test_token_bucket_refills_continuously_at_its_rate() -> None:
    algorithm = TokenBucket(rate=4, burst=10)
    state = BucketState(0.0, NOW)
    decision, _ = algorithm.decide(state, NOW + 1.25)
    assert decision.remaining == 4  # 5 tokens refilled, one spent


def test_token_bucket_never_holds_more_than_its_burst() -> None:
    algorithm = TokenBucket(rate=100, burst=10)
    decision, _ = algorithm.decide(BucketState(3.0, NOW), NOW + 3600)
    assert decision.remaining == 9


def test_token_bucket_retry_after_is_the_time_to_refill_the_missing_tokens() -> None:
    algorithm = TokenBucket(rate=3, burst=10)
    state = spend(algorithm, 10, NOW)
    assert assert_retry_after_is_exact(algorithm, state, NOW, cost=1) == pytest.approx(1 / 3)
    assert assert_retry_after_is_exact(algorithm, state, NOW, cost=6) == pytest.approx(2.0)


def test_token_bucket_retry_after_is_exact_at_the_magnitude_of_wall_time() -> None:
    algorithm = TokenBucket(rate=7, burst=3)
    state = BucketState(0.123456789, NOW + 0.987654321)
    assert_retry_after_is_exact(algorithm, state, NOW + 1.0, cost=3)


def test_token_bucket_reset_after_is_the_time_to_fill_up_again() -> None:
    algorithm = TokenBucket(rate=2, burst=10)
    decision, state = algorithm.decide(None, NOW, cost=4)
    assert decision.reset_after == 2.0
    assert state is not None
    assert algorithm.expires_at(state) == NOW + 2


def test_token_bucket_refills_nothing_when_the_wall_clock_steps_back() -> None:
    algorithm = TokenBucket(rate=1, burst=2)
    state = spend(algorithm, 2, NOW)
    assert not algorithm.decide(state, NOW - 100)[0].allowed
    assert algorithm.decide(state, NOW + 1)[0].allowed


# -- leaky bucket ----------------------------------------------------------------------------


def test_leaky_bucket_delays_requests_over_the_rate_to_space_them_evenly() -> None:
    algorithm = LeakyBucket(rate=4, max_delay=1)
    state = None
    delays = []
    for _ in range(5):
        decision, state = algorithm.decide(state, NOW)
        assert decision.allowed
        delays.append(decision.delay)
    assert delays == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert not algorithm.decide(state, NOW)[0].allowed


def test_leaky_bucket_does_not_delay_requests_under_the_rate() -> None:
    algorithm = LeakyBucket(rate=4, max_delay=1)
    state = None
    for step in range(10):
        decision, state = algorithm.decide(state, NOW + 0.25 * step)
        assert decision.delay == 0.0


def test_leaky_bucket_rejects_a_request_that_would_wait_past_max_delay() -> None:
    algorithm = LeakyBucket(rate=2, max_delay=1.5)
    state = spend(algorithm, 4, NOW)  # departures at 0, 0.5, 1, 1.5; the next would leave at 2
    assert algorithm.decide(state, NOW)[0].limit == 4
    assert assert_retry_after_is_exact(algorithm, state, NOW) == 0.5
    decision, _ = algorithm.decide(state, NOW + 0.5)
    assert decision.delay == 1.5


def test_leaky_bucket_holds_the_next_request_back_by_cost_over_rate() -> None:
    algorithm = LeakyBucket(rate=2, max_delay=10)
    _, state = algorithm.decide(None, NOW, cost=5)
    decision, _ = algorithm.decide(state, NOW)
    assert decision.delay == 2.5


def test_leaky_bucket_with_no_delay_polices_one_request_per_interval() -> None:
    algorithm = LeakyBucket(rate=10, max_delay=0)
    state = spend(algorithm, 1, NOW)
    decision, _ = algorithm.decide(state, NOW)
    assert not decision.allowed
    assert decision.limit == 1
    # The first wall time (a float near 1.7e9) at which the bucket has drained.
    assert decision.retry_after == pytest.approx(0.1, abs=1e-6)


def test_leaky_bucket_remaining_counts_the_requests_that_still_fit_the_queue() -> None:
    algorithm = LeakyBucket(rate=1, max_delay=5)
    decision, state = algorithm.decide(None, NOW)
    assert (decision.limit, decision.remaining, decision.reset_after) == (6, 5, 1.0)
    decision, state = algorithm.decide(state, NOW + 0.5)
    assert decision.remaining == 4
    assert decision.delay == 0.5
    assert decision.reset_after == 1.5
    assert state == QueueState(1.5, NOW + 0.5)
    assert algorithm.expires_at(state) == NOW + 2


def test_leaky_bucket_never_makes_a_request_wait_out_a_wall_clock_step_back() -> None:
    algorithm = LeakyBucket(rate=1, max_delay=5)
    _, state = algorithm.decide(None, NOW)
    decision, _ = algorithm.decide(state, NOW - 3600)
    assert decision.allowed
    assert decision.delay == 1.0


# -- concurrency -----------------------------------------------------------------------------


def test_concurrency_admits_up_to_the_limit_in_flight_and_frees_a_slot_on_release() -> None:
    limiter = ConcurrencyLimiter(2)
    assert limiter.acquire("k").allowed
    assert limiter.acquire("k").allowed
    rejected = limiter.acquire("k")
    assert not rejected.allowed
    assert rejected.retry_after == 1.0
    limiter.release("k")
    assert limiter.acquire("k").allowed
    assert limiter.in_flight("k") == 2


def test_concurrency_limits_each_key_apart() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.acquire("a").allowed
    assert limiter.acquire("b").allowed
    assert not limiter.acquire("a").allowed


def test_concurrency_releases_in_a_finally_when_the_request_fails() -> None:
    limiter = ConcurrencyLimiter(1)

    def handle() -> None:
        assert limiter.acquire("k").allowed
        try:
            raise ConnectionResetError("client went away")
        finally:
            limiter.release("k")

    with pytest.raises(ConnectionResetError):
        handle()
    assert limiter.in_flight("k") == 0


def test_concurrency_forgets_a_key_with_nothing_in_flight() -> None:
    limiter = ConcurrencyLimiter(5)
    limiter.acquire("k", cost=3)
    limiter.release("k", cost=3)
    assert len(limiter) == 0


def test_concurrency_never_counts_below_zero_on_an_extra_release() -> None:
    limiter = ConcurrencyLimiter(1)
    limiter.release("k")
    limiter.release("k")
    assert limiter.in_flight("k") == 0
    assert limiter.acquire("k").allowed
    assert not limiter.acquire("k").allowed


def test_concurrency_rejected_acquire_holds_no_slot() -> None:
    limiter = ConcurrencyLimiter(3)
    limiter.acquire("k", cost=2)
    assert not limiter.acquire("k", cost=2).allowed
    assert limiter.in_flight("k") == 2


# -- quotas ----------------------------------------------------------------------------------


def test_daily_quota_resets_at_local_midnight_not_utc_midnight() -> None:
    algorithm = CalendarQuota(2, "day", "Asia/Tokyo")
    before = utc("2024-06-01T14:30:00")  # 23:30 in Tokyo
    state = spend(algorithm, 2, before)
    decision, _ = algorithm.decide(state, before)
    assert decision.reset_after == 1800.0
    assert assert_retry_after_is_exact(algorithm, state, before) == 1800.0


def test_daily_quota_reset_after_counts_the_23_hours_of_a_spring_forward_day() -> None:
    algorithm = CalendarQuota(5, "day", "America/New_York")
    decision, state = algorithm.decide(None, local("2024-03-10T00:30", "America/New_York"))
    # Midnight to midnight is 23 hours that day: 22.5 of them are left at 00:30.
    assert decision.reset_after == 22.5 * 3600
    assert state is not None
    assert state.start == utc("2024-03-10T05:00")


def test_daily_quota_reset_after_counts_the_25_hours_of_a_fall_back_day() -> None:
    algorithm = CalendarQuota(5, "day", "America/New_York")
    decision, _ = algorithm.decide(None, local("2024-11-03T00:30", "America/New_York"))
    assert decision.reset_after == 24.5 * 3600


def test_daily_quota_spent_the_evening_before_a_dst_change_returns_at_local_midnight() -> None:
    algorithm = CalendarQuota(1, "day", "America/New_York")
    evening = local("2024-03-09T23:00", "America/New_York")
    state = spend(algorithm, 1, evening)
    assert assert_retry_after_is_exact(algorithm, state, evening) == 3600.0
    decision, _ = algorithm.decide(state, local("2024-03-10T23:59:59", "America/New_York"))
    assert decision.allowed
    assert decision.reset_after == 1.0


def test_daily_quota_starts_a_day_whose_midnight_is_skipped_at_the_change() -> None:
    # Santiago went from 00:00 -04 straight to 01:00 -03 on 2024-09-08 (04:00 UTC).
    algorithm = CalendarQuota(1, "day", "America/Santiago")
    late = utc("2024-09-08T03:59:59")
    state = spend(algorithm, 1, late)
    assert assert_retry_after_is_exact(algorithm, state, late) == 1.0
    decision, new = algorithm.decide(state, utc("2024-09-08T04:00"))
    assert decision.reset_after == 23 * 3600
    assert new == WindowCount(utc("2024-09-08T04:00"), 1)


def test_monthly_quota_resets_on_the_first_of_the_month_in_its_zone() -> None:
    algorithm = CalendarQuota(100, "month", "Europe/Paris")
    now = utc("2024-02-29T12:00")
    decision, state = algorithm.decide(None, now)
    # March 1 00:00 in Paris is Feb 29 23:00 UTC.
    assert decision.reset_after == 11 * 3600
    assert state is not None
    assert state.start == utc("2024-01-31T23:00")
    assert algorithm.expires_at(state) == utc("2024-02-29T23:00")


def test_monthly_quota_spans_a_dst_change_inside_the_month() -> None:
    algorithm = CalendarQuota(100, "month", "Europe/Paris")
    decision, _ = algorithm.decide(None, utc("2024-03-01T00:00"))
    # March in Paris: 31 days less the hour lost on the 31st.
    assert decision.reset_after == 31 * 86400 - 3600 - 3600


def test_quota_keeps_counting_when_the_wall_clock_steps_back_into_yesterday() -> None:
    algorithm = CalendarQuota(1, "day", "UTC")
    state = spend(algorithm, 1, utc("2024-06-02T00:00:01"))
    decision, _ = algorithm.decide(state, utc("2024-06-01T23:59:59"))
    assert not decision.allowed
    assert decision.retry_after == 86401.0


# -- several limits --------------------------------------------------------------------------


def test_decide_all_admits_only_when_every_limit_admits() -> None:
    per_second = FixedWindow(5, 1)
    per_minute = FixedWindow(100, 60)
    combined = decide_all([(per_second, None), (per_minute, None)], NOW)
    assert combined.decision.allowed
    assert combined.limit_index == 0
    assert combined.decision.remaining == 4
    assert combined.states == (WindowCount(NOW, 1), WindowCount(MINUTE_START, 1))


def test_decide_all_consumes_nothing_when_one_limit_rejects() -> None:
    per_second = FixedWindow(5, 1)
    per_minute = FixedWindow(100, 60)
    full = WindowCount(MINUTE_START, 100)
    combined = decide_all([(per_second, None), (per_minute, full)], NOW)
    assert not combined.decision.allowed
    assert combined.limit_index == 1
    assert combined.states[0] is None
    assert combined.states[1] is full


def test_decide_all_names_the_limit_with_the_lowest_remaining() -> None:
    limits: list[tuple[RateAlgorithm[Any], Any]] = [
        (TokenBucket(rate=1, burst=50), None),
        (FixedWindow(10, 60), WindowCount(MINUTE_START, 7)),
        (SlidingWindowLog(20, 60), None),
    ]
    combined = decide_all(limits, NOW)
    assert combined.limit_index == 1
    assert combined.decision.remaining == 2


def test_decide_all_names_a_rejecting_limit_even_when_an_admitting_one_has_less_left() -> None:
    window = (FixedWindow(10, 60), WindowCount(MINUTE_START, 8))  # admits cost 2, leaving 0
    bucket = (TokenBucket(rate=1, burst=10), BucketState(1.0, NOW))  # rejects cost 2, has 1
    combined = decide_all([window, bucket], NOW, cost=2)
    assert not combined.decision.allowed
    assert combined.limit_index == 1
    assert combined.decision.remaining == 1
    assert combined.states == (window[1], bucket[1])


def test_decide_all_breaks_a_remaining_tie_by_the_longest_retry_after() -> None:
    limits = [
        (FixedWindow(5, 1), WindowCount(NOW, 5)),  # retry in 1 s
        (FixedWindow(5, 60), WindowCount(MINUTE_START, 5)),  # retry in 40 s
    ]
    combined = decide_all(limits, NOW)
    assert combined.limit_index == 1
    assert combined.decision.retry_after == 40.0


def test_decide_all_tells_a_client_to_wait_for_every_rejecting_limit() -> None:
    limits: list[tuple[RateAlgorithm[Any], Any]] = [
        (FixedWindow(5, 60), WindowCount(MINUTE_START, 5)),  # retry in 40 s, remaining 0
        (SlidingWindowLog(3, 100), None),
        (FixedWindow(10, 3600), WindowCount(NOW - 13 * 60 - 20, 8)),  # remaining 2, in 2800 s
    ]
    combined = decide_all(limits, NOW, cost=3)
    assert combined.limit_index == 0
    assert combined.decision.retry_after == 3600 - 13 * 60 - 20


def test_decide_all_delays_by_the_longest_shaper() -> None:
    slow = LeakyBucket(rate=1, max_delay=10)
    fast = LeakyBucket(rate=10, max_delay=10)
    combined = decide_all([(slow, QueueState(3.0, NOW)), (fast, QueueState(5.0, NOW))], NOW)
    assert combined.decision.delay == 3.0


def test_decide_all_needs_a_limit() -> None:
    with pytest.raises(ValueError):
        decide_all([], NOW)


# -- local limiter ---------------------------------------------------------------------------


def test_local_limiter_reads_the_injected_clock() -> None:
    clock = FakeClock(wall=NOW)
    limiter = LocalLimiter(FixedWindow(1, 60), clock=clock)
    assert limiter.hit("k").allowed
    decision = limiter.hit("k")
    clock.advance(decision.retry_after)
    assert limiter.hit("k").allowed


def test_local_limiter_keeps_keys_apart() -> None:
    limiter = LocalLimiter(FixedWindow(1, 60), clock=FakeClock(wall=NOW))
    assert limiter.hit("a").allowed
    assert limiter.hit("b").allowed
    assert not limiter.hit("a").allowed
    assert len(limiter) == 2


def test_local_limiter_evicts_expired_keys_first_when_full() -> None:
    clock = FakeClock(wall=NOW)
    limiter = LocalLimiter(SlidingWindowLog(1, 10), clock=clock, max_keys=4)
    limiter.hit("old")
    clock.advance(5)
    for key in ("a", "b", "c"):
        limiter.hit(key)
    clock.advance(5)  # "old" has expired; the others have not
    limiter.hit("new")
    assert len(limiter) == 4
    for key in ("a", "b", "c"):
        assert not limiter.hit(key).allowed


def test_local_limiter_evicts_the_least_recently_admitted_keys_when_none_expired() -> None:
    clock = FakeClock(wall=NOW)
    limiter = LocalLimiter(TokenBucket(rate=0.001, burst=2), clock=clock, max_keys=8)
    for number in range(8):
        limiter.hit(f"key-{number}")
    limiter.hit("key-0")  # key-0 is now the most recently admitted
    limiter.hit("new")
    assert len(limiter) == 8
    assert limiter.hit("key-1").remaining == 1  # evicted, so afresh
    assert limiter.hit("key-0").remaining == 0  # kept: its second token goes now


def test_local_limiter_stores_nothing_for_a_rejected_new_key() -> None:
    limiter = LocalLimiter(FixedWindow(2, 60), clock=FakeClock(wall=NOW))
    assert limiter.hit("k", cost=3).retry_after == math.inf
    assert len(limiter) == 0


def test_limiter_reprs_show_their_state() -> None:
    limiter = LocalLimiter(TokenBucket(rate=2, burst=5), clock=FakeClock(wall=NOW))
    limiter.hit("k")
    assert repr(limiter) == "LocalLimiter(TokenBucket(rate=2.0, burst=5), keys=1, max_keys=100000)"
    concurrency = ConcurrencyLimiter(3)
    concurrency.acquire("k")
    assert "in_flight={'k': 1}" in repr(concurrency)


def test_decisions_compare_and_replace_by_field() -> None:
    decision = Decision(True, 10, 9, 60.0, 0.0)
    assert decision.delay == 0.0
    assert decision == Decision(True, 10, 9, 60.0, 0.0)
    assert decision != Decision(True, 10, 8, 60.0, 0.0)
    assert decision != (True, 10, 9, 60.0, 0.0, 0.0)
    assert decision.replace(delay=0.5) == Decision(True, 10, 9, 60.0, 0.0, 0.5)
    assert decision.replace(retry_after=3.0).retry_after == 3.0
    assert hash(decision) == hash(Decision(True, 10, 9, 60.0, 0.0))
    assert repr(decision) == (
        "Decision(allowed=True, limit=10, remaining=9, reset_after=60.0, retry_after=0.0, "
        "delay=0.0)"
    )
