from __future__ import annotations

import json
import math
import random
import sys
from array import array
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.observe.sketch import MIN_INDEXABLE_MS, LatencySketch

ALPHA = 0.01
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
SAMPLES = 100_000
SEED = 20240501
# A value on a bucket boundary can land one bucket off through float rounding of its log; the
# error then exceeds alpha in the last bits only.
ROUNDING = 1e-12


def exact_quantile(ordered: list[float], q: float) -> float:
    """The value of rank floor(q * (n - 1)) in sorted data: what the sketch estimates."""
    return ordered[math.floor(q * (len(ordered) - 1))]


def relative_error(estimate: float | None, exact: float) -> float:
    assert estimate is not None
    return abs(estimate - exact) / exact if exact else abs(estimate)


def sketch_of(values: Iterable[float], **options: Any) -> LatencySketch:
    sketch = LatencySketch(**options)
    for value in values:
        sketch.add(value)
    return sketch


def state(sketch: LatencySketch) -> dict[str, Any]:
    """Everything but `sum`, which float addition makes order-dependent in its last bits."""
    fields = sketch.to_dict()
    del fields["sum"]
    return fields


def assert_same_sketch(left: LatencySketch, right: LatencySketch) -> None:
    assert state(left) == state(right)
    assert math.isclose(left.sum, right.sum, rel_tol=1e-9)


def uniform(rng: random.Random) -> float:
    return rng.uniform(0.5, 500.0)


def lognormal(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(40.0), 0.9)


def exponential_with_long_tail(rng: random.Random) -> float:
    if rng.random() < 0.01:
        return 1000.0 * rng.paretovariate(1.2)  # timeouts and retries, up to minutes
    return rng.expovariate(1 / 25.0)


def bimodal(rng: random.Random) -> float:
    if rng.random() < 0.7:
        return rng.lognormvariate(math.log(2.0), 0.2)  # cache hits
    return rng.lognormvariate(math.log(250.0), 0.3)  # upstream calls


DISTRIBUTIONS: dict[str, Callable[[random.Random], float]] = {
    "uniform": uniform,
    "lognormal": lognormal,
    "exponential-with-long-tail": exponential_with_long_tail,
    "bimodal": bimodal,
}


def draw(distribution: Callable[[random.Random], float], count: int = SAMPLES) -> list[float]:
    rng = random.Random(SEED)
    return [distribution(rng) for _ in range(count)]


def assert_quantiles_within(sketch: LatencySketch, values: list[float], alpha: float) -> None:
    ordered = sorted(values)
    errors = {q: relative_error(sketch.quantile(q), exact_quantile(ordered, q)) for q in QUANTILES}
    assert max(errors.values()) <= alpha + ROUNDING, errors


latencies = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
streams = st.lists(latencies, max_size=60)


# -- accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_quantiles_are_within_the_relative_accuracy_of_the_exact_ones(name: str) -> None:
    values = draw(DISTRIBUTIONS[name])
    assert_quantiles_within(sketch_of(values), values, ALPHA)


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_the_relative_accuracy_is_a_parameter(alpha: float) -> None:
    values = draw(lognormal, 20_000)
    assert_quantiles_within(sketch_of(values, relative_accuracy=alpha), values, alpha)


def test_count_sum_min_max_and_mean_are_exact() -> None:
    values = draw(bimodal, 1000)
    sketch = sketch_of(values)
    assert sketch.count == len(values)
    assert sketch.sum == sum(values)  # added in the same order
    assert sketch.min == min(values)
    assert sketch.max == max(values)
    assert sketch.mean == sum(values) / len(values)


def test_quantile_zero_is_the_minimum_and_quantile_one_the_maximum() -> None:
    values = draw(exponential_with_long_tail, 1000)
    sketch = sketch_of(values)
    assert sketch.quantile(0.0) == min(values)
    assert sketch.quantile(1.0) == max(values)


def test_adding_a_value_with_a_count_equals_adding_it_that_many_times() -> None:
    once = LatencySketch()
    once.add(12.5, count=7)
    once.add(0.0, count=3)
    assert_same_sketch(once, sketch_of([12.5] * 7 + [0.0] * 3))


@given(streams, st.sampled_from([4, 2048]), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_quantile_is_monotone_in_q(
    values: list[float], max_buckets: int, first: float, second: float
) -> None:
    sketch = sketch_of(values, max_buckets=max_buckets)
    low, high = sorted((first, second))
    if not values:
        assert sketch.quantile(low) is None
        return
    low_value, high_value = sketch.quantile(low), sketch.quantile(high)
    assert low_value is not None and high_value is not None
    assert min(values) <= low_value <= high_value <= max(values)


# -- merging -------------------------------------------------------------------------------


def test_merging_minute_sketches_equals_the_sketch_of_the_whole_stream_bucket_for_bucket() -> None:
    values = draw(exponential_with_long_tail)
    hour = LatencySketch()
    for minute in range(60):
        hour.merge(sketch_of(values[minute::60]))
    assert_same_sketch(hour, sketch_of(values))
    assert_quantiles_within(hour, values, ALPHA)


@given(streams, streams)
def test_merge_is_commutative(left: list[float], right: list[float]) -> None:
    left_then_right = sketch_of(left)
    left_then_right.merge(sketch_of(right))
    right_then_left = sketch_of(right)
    right_then_left.merge(sketch_of(left))
    assert_same_sketch(left_then_right, right_then_left)
    assert_same_sketch(left_then_right, sketch_of(left + right))


@given(streams, streams, streams)
def test_merge_is_associative(first: list[float], second: list[float], third: list[float]) -> None:
    grouped_left = sketch_of(first)
    grouped_left.merge(sketch_of(second))
    grouped_left.merge(sketch_of(third))
    second_and_third = sketch_of(second)
    second_and_third.merge(sketch_of(third))
    grouped_right = sketch_of(first)
    grouped_right.merge(second_and_third)
    assert_same_sketch(grouped_left, grouped_right)


def test_merging_a_sketch_into_itself_doubles_every_count() -> None:
    values = draw(bimodal, 500)
    sketch = sketch_of(values)
    sketch.merge(sketch)
    assert_same_sketch(sketch, sketch_of(values + values))


def test_merging_an_empty_sketch_changes_nothing() -> None:
    values = draw(uniform, 500)
    sketch = sketch_of(values)
    sketch.merge(LatencySketch())
    assert_same_sketch(sketch, sketch_of(values))


def test_merging_sketches_of_different_accuracy_is_refused() -> None:
    with pytest.raises(ValueError, match="relative accuracy"):
        LatencySketch(0.01).merge(LatencySketch(0.02))


# -- bounded size --------------------------------------------------------------------------


def log_uniform(rng: random.Random) -> float:
    return 10.0 ** rng.uniform(-3.0, 5.0)  # eight decades: more than 256 buckets can hold


def test_collapsing_keeps_the_bucket_count_bounded_and_high_quantiles_within_alpha() -> None:
    values = draw(log_uniform)
    sketch = sketch_of(values, max_buckets=256)
    fields = sketch.to_dict()
    assert fields["collapsed"]
    assert len(fields["buckets"]) == 256
    assert sketch.count == len(values)
    ordered = sorted(values)
    for q in (0.9, 0.95, 0.99, 0.999):
        exact = exact_quantile(ordered, q)
        assert relative_error(sketch.quantile(q), exact) <= ALPHA + ROUNDING


def test_collapsing_answers_low_quantiles_too_high() -> None:
    values = draw(log_uniform)
    sketch = sketch_of(values, max_buckets=256)
    exact = exact_quantile(sorted(values), 0.5)
    estimate = sketch.quantile(0.5)
    assert estimate is not None
    assert estimate > exact * (1 + ALPHA)


def test_merging_collapsed_sketches_keeps_the_bound_and_high_quantiles_within_alpha() -> None:
    values = draw(log_uniform)
    merged = LatencySketch(max_buckets=256)
    for part in range(4):
        merged.merge(sketch_of(values[part::4], max_buckets=256))
    assert len(merged.to_dict()["buckets"]) <= 256
    assert merged.count == len(values)
    ordered = sorted(values)
    for q in (0.9, 0.99, 0.999):
        exact = exact_quantile(ordered, q)
        assert relative_error(merged.quantile(q), exact) <= ALPHA + ROUNDING


def test_values_below_the_collapsed_bucket_join_it() -> None:
    sketch = sketch_of([1.0, 10.0, 100.0, 1000.0], max_buckets=3)
    assert len(sketch.to_dict()["buckets"]) == 3
    sketch.add(0.001)
    buckets = sketch.to_dict()["buckets"]
    assert len(buckets) == 3
    assert buckets[0][1] == 3
    assert sketch.min == 0.001


# -- storage -------------------------------------------------------------------------------


@given(streams, st.sampled_from([0.01, 0.05]), st.sampled_from([4, 2048]))
def test_bytes_round_trip_exactly(values: list[float], alpha: float, max_buckets: int) -> None:
    sketch = sketch_of(values, relative_accuracy=alpha, max_buckets=max_buckets)
    restored = LatencySketch.from_bytes(sketch.to_bytes())
    assert restored.to_dict() == sketch.to_dict()
    assert restored.to_bytes() == sketch.to_bytes()


@given(streams, st.sampled_from([0.01, 0.05]), st.sampled_from([4, 2048]))
def test_json_round_trips_exactly(values: list[float], alpha: float, max_buckets: int) -> None:
    sketch = sketch_of(values, relative_accuracy=alpha, max_buckets=max_buckets)
    restored = LatencySketch.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert restored.to_bytes() == sketch.to_bytes()


def test_a_restored_sketch_keeps_collapsing_like_the_original() -> None:
    original = sketch_of([1.0, 10.0, 100.0, 1000.0], max_buckets=3)
    restored = LatencySketch.from_bytes(original.to_bytes())
    for sketch in (original, restored):
        sketch.add(0.5)
        sketch.add(5000.0)
    assert restored.to_bytes() == original.to_bytes()


def test_a_sketch_of_100k_latencies_fits_in_a_kilobyte() -> None:
    assert len(sketch_of(draw(lognormal)).to_bytes()) < 1024


def test_from_bytes_rejects_truncated_extended_and_unknown_input() -> None:
    data = sketch_of(draw(lognormal, 100)).to_bytes()
    for broken in (data[:-1], data[:10], data + b"\x00", b"\x02" + data[1:]):
        with pytest.raises(ValueError):
            LatencySketch.from_bytes(broken)


def test_from_dict_rejects_missing_fields_and_disagreeing_counts() -> None:
    fields = sketch_of([1.0, 2.0]).to_dict()
    del fields["zero_count"]
    with pytest.raises(ValueError, match="not a latency sketch"):
        LatencySketch.from_dict(fields)
    empty_with_a_minimum = LatencySketch().to_dict() | {"min": 1.0}
    with pytest.raises(ValueError, match="disagree"):
        LatencySketch.from_dict(empty_with_a_minimum)


# -- edges ---------------------------------------------------------------------------------


def test_an_empty_sketch_has_no_quantiles_and_no_min_max_or_mean() -> None:
    sketch = LatencySketch()
    assert sketch.quantile(0.5) is None
    assert (sketch.count, sketch.sum) == (0, 0.0)
    assert (sketch.min, sketch.max, sketch.mean) == (None, None, None)


def test_a_single_value_is_every_quantile_exactly() -> None:
    sketch = sketch_of([42.7])
    assert {sketch.quantile(q) for q in (0.0, *QUANTILES, 1.0)} == {42.7}


def test_a_sketch_of_zeros_answers_zero() -> None:
    sketch = sketch_of([0.0] * 100)
    assert {sketch.quantile(q) for q in QUANTILES} == {0.0}
    assert sketch.to_dict()["buckets"] == []
    assert sketch.mean == 0.0


def test_values_below_the_minimum_indexable_value_count_as_zero() -> None:
    sketch = sketch_of([0.0, MIN_INDEXABLE_MS / 10, MIN_INDEXABLE_MS, 5.0, 5.0])
    fields = sketch.to_dict()
    assert fields["zero_count"] == 3
    assert [count for _, count in fields["buckets"]] == [2]
    median = sketch.quantile(0.5)
    assert median is not None and median <= MIN_INDEXABLE_MS
    assert relative_error(sketch.quantile(0.99), 5.0) <= ALPHA


def test_huge_values_are_answered_within_alpha_without_overflow() -> None:
    values = [1e300, sys.float_info.max, 1e200]
    sketch = sketch_of(values)
    assert_quantiles_within(sketch, values, ALPHA)
    assert sketch.quantile(1.0) == sys.float_info.max
    assert LatencySketch.from_bytes(sketch.to_bytes()).to_dict() == sketch.to_dict()


@given(streams, st.sampled_from([4, 2048]), st.sampled_from([list, "array"]))
def test_add_many_equals_adding_one_at_a_time(
    values: list[float], max_buckets: int, kind: object
) -> None:
    # A list is counted in Python, an array of doubles in C (observe/_durations.c).
    one_by_one = sketch_of(values, max_buckets=max_buckets)
    bulk = LatencySketch(max_buckets=max_buckets)
    bulk.add_many(array("d", values) if kind == "array" else values)
    if not state(one_by_one)["collapsed"]:  # nothing folded: the very same buckets
        assert_same_sketch(bulk, one_by_one)
    assert (bulk.count, bulk.min, bulk.max) == (one_by_one.count, one_by_one.min, one_by_one.max)
    assert len(state(bulk)["buckets"]) <= max_buckets


def test_the_c_bucket_counts_equal_the_python_ones_over_a_wide_range() -> None:
    from tollgate.observe import _durations  # built with the package (setup.py)

    rng = random.Random(4)
    values = [rng.lognormvariate(0.0, 3.0) for _ in range(20_000)] + [0.0, MIN_INDEXABLE_MS]
    values += [1e-300, 1e300, 5e-7]  # a span wider than the C code's counting array
    for chosen in (values, values[:-3]):
        in_c = LatencySketch()
        in_c.add_many(array("d", chosen))
        in_python = LatencySketch()
        in_python.add_many(chosen)
        assert_same_sketch(in_c, in_python)
    counts, zeros, total, lowest, highest = _durations.bucket_counts(
        array("d", values), 100.0, MIN_INDEXABLE_MS
    )
    assert (total, lowest, highest) == (sum(values), min(values), max(values))
    assert zeros + sum(counts.values()) == len(values)
    assert _durations.bucket_counts(array("d", [1.0, math.nan]), 100.0, 0.0) is None
    with pytest.raises(TypeError, match="doubles"):
        _durations.bucket_counts(array("f", [1.0]), 1.0, 0.0)


@pytest.mark.parametrize("kind", [list, "array"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_add_many_rejects_what_add_rejects_and_keeps_what_came_before(
    value: float, kind: object
) -> None:
    sketch = LatencySketch()
    values = [1.0, 2.0, value, 3.0]
    with pytest.raises(ValueError, match="finite and non-negative"):
        sketch.add_many(array("d", values) if kind == "array" else values)
    assert sketch.count == 2  # added one at a time up to the bad one, as `add` would
    assert (sketch.min, sketch.max, sketch.sum) == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("value", [-1.0, -0.001, math.nan, math.inf, -math.inf])
def test_negative_and_non_finite_latencies_are_rejected(value: float) -> None:
    sketch = LatencySketch()
    with pytest.raises(ValueError, match="finite and non-negative"):
        sketch.add(value)
    assert sketch.count == 0


def test_a_count_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="count"):
        LatencySketch().add(1.0, count=0)


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_a_quantile_outside_zero_to_one_is_rejected(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        sketch_of([1.0]).quantile(q)


@pytest.mark.parametrize(
    "options", [{"relative_accuracy": 0.0}, {"relative_accuracy": 1.0}, {"max_buckets": 0}]
)
def test_impossible_settings_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LatencySketch(**options)


def test_repr_shows_the_state() -> None:
    assert repr(sketch_of([0.0, 3.0, 4.0])) == (
        "LatencySketch(relative_accuracy=0.01, count=3, min=0.0, max=4.0, buckets=2, "
        "zero_count=1, collapsed=False)"
    )
