"""What each algorithm guarantees over any arrival sequence (hypothesis)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from itertools import pairwise
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from hypothesis import given, settings
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
)

BASE = 1_700_000_000.0

# Sums of floats (rates times seconds) are compared with integer counts: allow rounding.
ROUNDING = 1e-6


class Arrival(NamedTuple):
    at: float
    cost: int
    decision: Decision
    state_before: Any
    state_after: Any


def arrival_sequences(max_gap_ms: int = 3000) -> st.SearchStrategy[list[tuple[float, int]]]:
    """Sorted wall times (millisecond steps, bursts included) with costs 1-5."""
    steps = st.lists(
        st.tuples(st.integers(0, max_gap_ms), st.integers(1, 5)), min_size=1, max_size=120
    )

    def to_times(items: list[tuple[int, int]]) -> list[tuple[float, int]]:
        elapsed = 0
        times = []
        for gap, cost in items:
            elapsed += gap
            times.append((BASE + elapsed / 1000, cost))
        return times

    return steps.map(to_times)


def run(algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]) -> list[Arrival]:
    state = None
    seen = []
    for at, cost in arrivals:
        decision, new_state = algorithm.decide(state, at, cost)
        seen.append(Arrival(at, cost, decision, state, new_state))
        state = new_state
    return seen


def admitted(seen: list[Arrival]) -> list[Arrival]:
    return [arrival for arrival in seen if arrival.decision.allowed]


windows = st.sampled_from([0.5, 1.0, 2.5, 10.0, 60.0])
limits = st.integers(1, 20)
rates = st.sampled_from([0.5, 1.0, 3.0, 7.5, 100.0])

algorithms = st.one_of(
    st.builds(FixedWindow, limits, windows),
    st.builds(SlidingWindowLog, limits, windows),
    st.builds(SlidingWindowCounter, limits, windows),
    st.builds(TokenBucket, rates, limits),
    st.builds(LeakyBucket, rates, st.sampled_from([0.0, 0.3, 1.0, 4.0])),
    st.builds(Concurrency, limits),
)


# -- each algorithm's bound ------------------------------------------------------------------


@given(limits, windows, arrival_sequences())
def test_sliding_log_never_admits_more_than_the_limit_in_any_window(
    limit: int, window: float, arrivals: list[tuple[float, int]]
) -> None:
    passed = admitted(run(SlidingWindowLog(limit, window), arrivals))
    # The busiest window of `window` seconds ends at an admitted request.
    for last in passed:
        in_window = sum(a.cost for a in passed if last.at - window < a.at <= last.at)
        assert in_window <= limit


@given(limits, windows, arrival_sequences())
def test_sliding_log_admits_whatever_fits_in_the_window(
    limit: int, window: float, arrivals: list[tuple[float, int]]
) -> None:
    seen = run(SlidingWindowLog(limit, window), arrivals)
    passed: list[Arrival] = []
    for arrival in seen:
        in_window = sum(a.cost for a in passed if arrival.at - window < a.at)
        assert arrival.decision.allowed == (in_window + arrival.cost <= limit)
        if arrival.decision.allowed:
            passed.append(arrival)


@given(limits, windows, arrival_sequences())
def test_fixed_window_never_admits_more_than_the_limit_per_aligned_window(
    limit: int, window: float, arrivals: list[tuple[float, int]]
) -> None:
    spent: dict[float, int] = defaultdict(int)
    for arrival in admitted(run(FixedWindow(limit, window), arrivals)):
        spent[arrival.at - arrival.at % window] += arrival.cost
    assert all(total <= limit for total in spent.values())


@given(limits, windows, arrival_sequences())
def test_sliding_counter_stays_within_the_limit_per_window_and_twice_it_in_any_window(
    limit: int, window: float, arrivals: list[tuple[float, int]]
) -> None:
    passed = admitted(run(SlidingWindowCounter(limit, window), arrivals))
    spent: dict[float, int] = defaultdict(int)
    for arrival in passed:
        spent[arrival.at - arrival.at % window] += arrival.cost
    assert all(total <= limit for total in spent.values())
    for last in passed:
        assert sum(a.cost for a in passed if last.at - window < a.at <= last.at) <= 2 * limit


@given(rates, limits, arrival_sequences(max_gap_ms=1000))
def test_token_bucket_never_admits_more_than_burst_plus_rate_times_t_in_any_interval(
    rate: float, burst: int, arrivals: list[tuple[float, int]]
) -> None:
    passed = admitted(run(TokenBucket(rate, burst), arrivals))
    for first_index, first in enumerate(passed):
        total = 0
        for last in passed[first_index:]:
            total += last.cost
            assert total <= burst + rate * (last.at - first.at) + ROUNDING


@given(rates, st.sampled_from([0.0, 0.3, 1.0, 4.0]), arrival_sequences(max_gap_ms=1000))
def test_leaky_bucket_spaces_departures_at_the_rate_and_never_delays_past_max_delay(
    rate: float, max_delay: float, arrivals: list[tuple[float, int]]
) -> None:
    passed = admitted(run(LeakyBucket(rate, max_delay), arrivals))
    for arrival in passed:
        assert 0.0 <= arrival.decision.delay <= max_delay + ROUNDING
    for earlier, later in pairwise(passed):
        departed = earlier.at + earlier.decision.delay
        assert later.at + later.decision.delay - departed >= earlier.cost / rate - ROUNDING


@given(rates, st.sampled_from([0.0, 0.3, 1.0, 4.0]), arrival_sequences(max_gap_ms=1000))
def test_leaky_bucket_delays_only_what_arrives_before_the_queue_has_drained(
    rate: float, max_delay: float, arrivals: list[tuple[float, int]]
) -> None:
    passed = admitted(run(LeakyBucket(rate, max_delay), arrivals))
    free_at = -math.inf
    for arrival in passed:
        expected = max(0.0, free_at - arrival.at)
        assert math.isclose(arrival.decision.delay, expected, abs_tol=ROUNDING)
        free_at = arrival.at + arrival.decision.delay + arrival.cost / rate


# -- what every algorithm promises -----------------------------------------------------------


@given(algorithms, arrival_sequences())
def test_every_rejected_request_consumes_nothing(
    algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]
) -> None:
    for arrival in run(algorithm, arrivals):
        if not arrival.decision.allowed:
            assert arrival.state_after is arrival.state_before
            assert arrival.decision.retry_after > 0


@given(algorithms, arrival_sequences())
def test_every_decision_keeps_remaining_within_zero_and_the_limit(
    algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]
) -> None:
    for arrival in run(algorithm, arrivals):
        decision = arrival.decision
        assert 0 <= decision.remaining <= decision.limit
        assert decision.reset_after >= 0
        assert decision.allowed == (decision.retry_after == 0.0)


@settings(max_examples=60)
@given(algorithms.filter(lambda a: not isinstance(a, Concurrency)), arrival_sequences())
def test_every_retry_after_is_exact(
    algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]
) -> None:
    for arrival in run(algorithm, arrivals):
        retry = arrival.decision.retry_after
        if arrival.decision.allowed or retry == math.inf:
            continue
        state, at, cost = arrival.state_before, arrival.at, arrival.cost
        assert algorithm.decide(state, at + retry, cost)[0].allowed
        if retry > 0.001:
            assert not algorithm.decide(state, at + retry - 0.001, cost)[0].allowed


@settings(max_examples=60)
@given(algorithms, arrival_sequences())
def test_every_remaining_is_exactly_what_the_next_requests_at_that_instant_get(
    algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]
) -> None:
    for arrival in admitted(run(algorithm, arrivals)):
        state = arrival.state_after
        for _ in range(arrival.decision.remaining):
            decision, state = algorithm.decide(state, arrival.at)
            assert decision.allowed
        assert not algorithm.decide(state, arrival.at)[0].allowed


@settings(max_examples=60)
@given(algorithms.filter(lambda a: not isinstance(a, Concurrency)), arrival_sequences())
def test_every_state_counts_for_nothing_once_expired(
    algorithm: RateAlgorithm[Any], arrivals: list[tuple[float, int]]
) -> None:
    for arrival in admitted(run(algorithm, arrivals)):
        later = algorithm.expires_at(arrival.state_after) + ROUNDING
        fresh = algorithm.decide(None, later, arrival.cost)[0]
        kept = algorithm.decide(arrival.state_after, later, arrival.cost)[0]
        assert (kept.allowed, kept.remaining) == (fresh.allowed, fresh.remaining)


# -- quotas over days ------------------------------------------------------------------------


@settings(max_examples=40)
@given(
    st.integers(1, 20),
    st.sampled_from(["America/New_York", "Europe/Paris", "Australia/Lord_Howe", "Asia/Kolkata"]),
    arrival_sequences(max_gap_ms=4 * 3600 * 1000),
)
def test_daily_quota_never_admits_more_than_the_limit_per_local_day(
    limit: int, zone: str, arrivals: list[tuple[float, int]]
) -> None:
    algorithm = CalendarQuota(limit, "day", zone)
    spent: dict[object, int] = defaultdict(int)
    seen = run(algorithm, arrivals)
    for arrival in admitted(seen):
        spent[datetime.fromtimestamp(arrival.at, ZoneInfo(zone)).date()] += arrival.cost
    assert all(total <= limit for total in spent.values())
    for arrival in seen:
        if not arrival.decision.allowed and arrival.decision.retry_after < math.inf:
            # A rejected request is told to come back at the first instant of a local day.
            moment = arrival.at + arrival.decision.retry_after
            today = datetime.fromtimestamp(moment, ZoneInfo(zone)).date()
            assert datetime.fromtimestamp(moment - 0.001, ZoneInfo(zone)).date() < today
