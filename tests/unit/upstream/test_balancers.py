from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.clock import FakeClock
from tollgate.upstream.balancers import (
    BALANCER_KINDS,
    DEFAULT_UNTRIED_LATENCY,
    Balancer,
    ConsistentHash,
    LeastConnections,
    PeakEwma,
    SmoothWeightedRoundRobin,
    create_balancer,
)

KEYS = [f"user-{number}".encode() for number in range(100_000)]


def picks(balancer: Balancer, count: int, exclude: Sequence[int] = ()) -> list[int | None]:
    return [balancer.pick(exclude=exclude) for _ in range(count)]


def owners(balancer: Balancer, keys: Sequence[bytes] = KEYS) -> list[int | None]:
    return [balancer.pick(key) for key in keys]


# -- every balancer ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_returns_none_when_every_weight_is_zero(kind: str) -> None:
    balancer = create_balancer(kind, [0, 0, 0])
    assert balancer.pick(b"key") is None
    assert balancer.pick() is None


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_returns_none_without_targets(kind: str) -> None:
    assert create_balancer(kind, []).pick(b"key") is None


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_always_picks_the_only_target(kind: str) -> None:
    balancer = create_balancer(kind, [0, 3, 0])
    for number in range(20):
        index = balancer.pick(f"key-{number}".encode())
        assert index == 1
        balancer.started(index)
        balancer.finished(index, 0.01)


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_returns_none_when_the_only_target_is_excluded(kind: str) -> None:
    assert create_balancer(kind, [0, 3]).pick(b"key", exclude={1}) is None


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_returns_none_when_every_target_is_excluded(kind: str) -> None:
    balancer = create_balancer(kind, [1, 2, 3, 4, 5])
    assert balancer.pick(b"key", exclude=range(5)) is None


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_never_picks_a_drained_or_excluded_target(kind: str) -> None:
    balancer = create_balancer(kind, [1, 0, 1, 1, 1], clock=FakeClock())
    chosen = set()
    for number in range(500):
        index = balancer.pick(f"key-{number}".encode(), exclude=(3,))
        assert index is not None
        chosen.add(index)
        balancer.started(index)
        balancer.finished(index, 0.01)
    assert chosen == {0, 2, 4}


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_shows_its_weights_in_repr(kind: str) -> None:
    balancer = create_balancer(kind, [5, 1, 1])
    assert "weights=[5, 1, 1]" in repr(balancer)


def test_create_balancer_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown balancer 'random'"):
        create_balancer("random", [1])


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_every_balancer_rejects_a_negative_weight(kind: str) -> None:
    with pytest.raises(ValueError, match="negative"):
        create_balancer(kind, [1, -1])


# -- smooth weighted round-robin -----------------------------------------------------------


def test_round_robin_spreads_weights_5_1_1_as_a_a_b_a_c_a_a() -> None:
    balancer = SmoothWeightedRoundRobin([5, 1, 1])
    assert picks(balancer, 14) == [0, 0, 1, 0, 2, 0, 0] * 2


def test_round_robin_takes_turns_over_equal_weights() -> None:
    assert picks(SmoothWeightedRoundRobin([1, 1, 1]), 6) == [0, 1, 2, 0, 1, 2]


@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8))
def test_round_robin_picks_each_target_exactly_its_weight_in_every_cycle(
    weights: list[int],
) -> None:
    balancer = SmoothWeightedRoundRobin(weights)
    cycle = sum(weights)
    for _ in range(3):
        counts = Counter(picks(balancer, cycle))
        assert [counts[index] for index in range(len(weights))] == weights


def test_round_robin_keeps_the_others_in_proportion_while_one_is_excluded() -> None:
    balancer = SmoothWeightedRoundRobin([3, 2, 1])
    excluded = picks(balancer, 50, exclude=(2,))
    assert Counter(excluded) == {0: 30, 1: 20}
    assert excluded[:5] == [0, 1, 0, 1, 0]


def test_round_robin_returns_to_its_weights_once_nothing_is_excluded() -> None:
    balancer = SmoothWeightedRoundRobin([3, 2, 1])
    picks(balancer, 7, exclude=(0,))
    counts = Counter(picks(balancer, 600))
    assert abs(counts[0] - 300) <= 3
    assert abs(counts[1] - 200) <= 3
    assert abs(counts[2] - 100) <= 3


def test_round_robin_never_picks_a_zero_weight_target() -> None:
    assert set(picks(SmoothWeightedRoundRobin([0, 2, 0, 1]), 30)) == {1, 3}


# -- least connections ---------------------------------------------------------------------


def test_least_connections_sends_the_next_request_to_an_idle_target() -> None:
    balancer = LeastConnections([1, 1, 1])
    balancer.started(0)
    balancer.started(2)
    assert balancer.pick() == 1


def test_least_connections_follows_started_and_finished() -> None:
    balancer = LeastConnections([1, 1])
    for _ in range(3):
        balancer.started(0)
    balancer.started(1)
    assert balancer.pick() == 1
    balancer.started(1)
    balancer.started(1)
    assert balancer.pick() == 0
    balancer.finished(1, None)
    balancer.finished(1, 0.2)
    assert balancer.pick() == 1


def test_least_connections_counts_in_flight_per_unit_of_weight() -> None:
    balancer = LeastConnections([3, 1])
    balancer.started(0)
    balancer.started(0)
    balancer.started(1)
    assert balancer.pick() == 0  # 2/3 beats 1/1
    balancer.started(0)
    balancer.started(0)
    assert balancer.pick() == 1  # 4/3 loses to 1/1


def test_least_connections_breaks_ties_round_robin() -> None:
    assert picks(LeastConnections([1, 1, 1]), 6) == [0, 1, 2, 0, 1, 2]


def test_least_connections_breaks_ties_by_weight() -> None:
    counts = Counter(picks(LeastConnections([5, 1, 1]), 70))
    assert counts == {0: 50, 1: 10, 2: 10}


def test_least_connections_keeps_in_flight_in_proportion_to_weight() -> None:
    balancer = LeastConnections([2, 1])
    for _ in range(30):
        index = balancer.pick()
        assert index is not None
        balancer.started(index)
    assert "in_flight=[20, 10]" in repr(balancer)


def test_least_connections_ignores_a_finish_without_a_start() -> None:
    balancer = LeastConnections([1, 1])
    balancer.finished(0, None)
    balancer.started(1)
    assert balancer.pick() == 0
    assert "in_flight=[0, 1]" in repr(balancer)


# -- consistent hash -----------------------------------------------------------------------


def test_consistent_hash_sends_a_key_to_the_same_target_every_time() -> None:
    balancer = ConsistentHash([1, 1, 1, 1])
    first = owners(balancer, KEYS[:1000])
    assert owners(balancer, KEYS[:1000]) == first
    assert owners(ConsistentHash([1, 1, 1, 1]), KEYS[:1000]) == first


def test_consistent_hash_maps_keys_the_same_in_every_process() -> None:
    program = (
        "from tollgate.upstream.balancers import ConsistentHash\n"
        "balancer = ConsistentHash([1, 2, 3])\n"
        "print([balancer.pick(f'user-{n}'.encode()) for n in range(300)])\n"
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", program], env=environment, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == str(owners(ConsistentHash([1, 2, 3]), KEYS[:300]))


@pytest.mark.parametrize(
    "weights", [[1, 1, 1], [1, 2, 3], [5, 1, 1], [1] * 10, [100, 100, 100], [2, 3, 5, 7]]
)
def test_consistent_hash_shares_keys_in_proportion_to_weight(weights: list[int]) -> None:
    counts = Counter(owners(ConsistentHash(weights)))
    for index, weight in enumerate(weights):
        expected = len(KEYS) * weight / sum(weights)
        assert abs(counts[index] - expected) <= 0.1 * expected, (index, counts)


@pytest.mark.parametrize(
    ("weights", "drained"), [([1, 1, 1, 1], 2), ([3, 2, 1], 1), ([3, 2, 1], 2), ([4, 4, 1], 0)]
)
def test_draining_a_target_moves_exactly_its_keys(weights: list[int], drained: int) -> None:
    before = owners(ConsistentHash(weights))
    after = owners(ConsistentHash([0 if i == drained else w for i, w in enumerate(weights)]))
    moved = [key for key, old, new in zip(KEYS, before, after, strict=True) if old != new]
    assert len(moved) == before.count(drained) > 0
    assert drained not in after


def test_adding_a_target_moves_about_one_key_in_n_and_only_to_it() -> None:
    before = owners(ConsistentHash([1, 1, 1, 1]))
    after = owners(ConsistentHash([1, 1, 1, 1, 1]))
    moved_to = [new for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved_to) == {4}
    assert 0.18 <= len(moved_to) / len(KEYS) <= 0.22


def test_an_excluded_target_passes_each_key_to_the_next_allowed_target() -> None:
    # Walking past an excluded target's points lands where the ring without them would.
    with_all = ConsistentHash([1, 2, 3, 1])
    without_two = ConsistentHash([1, 2, 0, 1])
    keys = KEYS[:20_000]
    assert [with_all.pick(key, exclude={2}) for key in keys] == owners(without_two, keys)


def test_an_excluded_target_keeps_other_keys_where_they_were() -> None:
    balancer = ConsistentHash([1, 1, 1])
    keys = KEYS[:5000]
    for key, owner in zip(keys, owners(balancer, keys), strict=True):
        if owner != 0:
            assert balancer.pick(key, exclude=(0,)) == owner


def test_consistent_hash_without_a_key_spreads_picks_by_weight() -> None:
    counts = Counter(picks(ConsistentHash([3, 1]), 40_000))
    assert 29_000 <= counts[0] <= 31_000
    assert 9_000 <= counts[1] <= 11_000


def test_consistent_hash_keeps_a_point_for_a_very_light_target() -> None:
    balancer = ConsistentHash([65535, 1])
    assert "points=2049" in repr(balancer)


# -- peak EWMA -----------------------------------------------------------------------------


def serve(
    balancer: PeakEwma, clock: FakeClock, latencies: Sequence[float], seconds: float
) -> Counter[int]:
    """Send requests one after another for `seconds`, each taking its target's latency."""
    counts: Counter[int] = Counter()
    deadline = clock.monotonic() + seconds
    while clock.monotonic() < deadline:
        index = balancer.pick()
        assert index is not None
        balancer.started(index)
        clock.advance(latencies[index])
        balancer.finished(index, latencies[index])
        counts[index] += 1
    return counts


def test_peak_ewma_tries_an_untried_target_before_a_slower_one() -> None:
    balancer = PeakEwma([1, 1], clock=FakeClock())
    balancer.started(0)
    balancer.finished(0, 0.2)
    assert balancer.pick() == 1


def test_peak_ewma_prefers_the_faster_target() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1, 1], clock=clock)
    counts = serve(balancer, clock, [0.1, 0.01], seconds=60)
    assert counts[1] > 0.98 * counts.total()


def test_peak_ewma_over_many_targets_takes_the_cheaper_of_two_random_targets() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1] * 6, clock=clock, random_source=random.Random(7))
    latencies = [0.2, 0.2, 0.2, 0.01, 0.01, 0.01]
    counts = serve(balancer, clock, latencies, seconds=60)
    # A slow target wins only when both candidates are slow: 3/6 x 2/5 = 20% of draws.
    slow_share = (counts[0] + counts[1] + counts[2]) / counts.total()
    assert 0.15 <= slow_share <= 0.25


def test_peak_ewma_recovers_when_the_slow_target_speeds_up() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1, 1], clock=clock)
    serve(balancer, clock, [0.01, 1.0], seconds=30)
    serve(balancer, clock, [0.01, 0.01], seconds=90)
    counts = serve(balancer, clock, [0.01, 0.01], seconds=10)
    assert counts[1] > 0.3 * counts.total()


def test_peak_ewma_believes_a_latency_peak_at_once() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1, 1], clock=clock)
    serve(balancer, clock, [0.01, 0.01], seconds=5)
    balancer.started(1)
    balancer.finished(1, 0.5)
    assert picks(balancer, 10) == [0] * 10


def test_peak_ewma_fades_an_estimate_without_news() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1, 1], clock=clock, decay_seconds=10.0)
    balancer.started(0)
    balancer.finished(0, 1.0)
    clock.advance(10.0)
    assert "estimates=[0.367879," in repr(balancer)
    clock.advance(20.0)
    balancer.started(1)
    balancer.finished(1, 0.06)
    assert balancer.pick() == 0  # 1 s thirty seconds ago has faded to 0.0498 s


def test_peak_ewma_spreads_requests_in_flight() -> None:
    balancer = PeakEwma([1, 1, 1], clock=FakeClock())
    chosen = []
    for _ in range(6):
        index = balancer.pick()
        assert index is not None
        balancer.started(index)
        chosen.append(index)
    assert Counter(chosen) == {0: 2, 1: 2, 2: 2}
    assert f"estimates=[{DEFAULT_UNTRIED_LATENCY}" in repr(balancer)


def test_peak_ewma_keeps_in_flight_in_proportion_to_weight() -> None:
    balancer = PeakEwma([2, 1], clock=FakeClock())
    for _ in range(30):
        index = balancer.pick()
        assert index is not None
        balancer.started(index)
    assert "in_flight=[20, 10]" in repr(balancer)


def test_peak_ewma_learns_nothing_from_a_request_without_latency() -> None:
    clock = FakeClock()
    balancer = PeakEwma([1, 1], clock=clock)
    balancer.started(0)
    balancer.finished(0, None)
    assert "in_flight=[0, 0]" in repr(balancer)
    assert f"estimates=[{DEFAULT_UNTRIED_LATENCY}, {DEFAULT_UNTRIED_LATENCY}]" in repr(balancer)


def test_peak_ewma_rejects_a_decay_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="decay_seconds"):
        PeakEwma([1], decay_seconds=0)
