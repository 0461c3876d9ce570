from __future__ import annotations

import math
import random
import struct
from typing import Any

import pytest
from call_records import T0, generate_records, make_record
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.observe import rollups
from tollgate.observe.rollups import (
    DAY,
    HOUR,
    MINUTE,
    RollupAggregator,
    SketchSum,
    decode_sketch,
    encode_sketch,
    group_rows,
)
from tollgate.observe.sketch import LatencySketch


def sketch_of(values: list[float], **options: float) -> LatencySketch:
    sketch = LatencySketch(**options)  # type: ignore[arg-type]
    for value in values:
        sketch.add(value)
    return sketch


def same_sketch(left: LatencySketch, right: LatencySketch) -> bool:
    """Bucket for bucket equal; `sum` may differ in its last bits (float addition order)."""
    a, b = left.to_dict(), right.to_dict()
    sum_a, sum_b = a.pop("sum"), b.pop("sum")
    return a == b and sum_a == pytest.approx(sum_b, rel=1e-12)


def latencies(count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(3.4, 1.2) for _ in range(count)]


def test_encoding_round_trips_exactly() -> None:
    for values in ([], [0.0, 0.0], [5.0], latencies(5_000, 1), [1e-9, 3.0, 1e7]):
        sketch = sketch_of(values)
        decoded = decode_sketch(encode_sketch(sketch))
        assert decoded.to_dict() == sketch.to_dict()


def test_summing_encoded_sketches_equals_merging_the_sketches() -> None:
    parts = [sketch_of(latencies(2_000, seed)) for seed in range(12)]
    parts.append(sketch_of([0.0, 1e-7]))  # the zero bucket
    parts.append(LatencySketch())  # an empty one
    expected = LatencySketch()
    total = SketchSum()
    for part in parts:
        expected.merge(part)
        total.add_encoded(encode_sketch(part))
    assert total.count == expected.count
    assert same_sketch(total.to_sketch(), expected)
    assert same_sketch(decode_sketch(total.encode()), expected)


def test_summing_collapsed_sketches_collapses_like_merge() -> None:
    small = {"max_buckets": 40}
    parts = [sketch_of(latencies(3_000, seed), **small) for seed in range(4)]
    parts.append(sketch_of([1e-3, 1e5], **small))
    assert any(part.to_dict()["collapsed"] for part in parts)
    expected = LatencySketch(max_buckets=40)
    total = SketchSum()
    for part in parts:
        expected.merge(part)
        total.add_encoded(encode_sketch(part))
    assert same_sketch(total.to_sketch(), expected)
    assert same_sketch(decode_sketch(total.encode()), expected)


def test_summing_past_max_buckets_collapses_like_merge() -> None:
    low = sketch_of([1.0 + i * 0.05 for i in range(30)], max_buckets=30)
    high = sketch_of([1000.0 + i * 50 for i in range(30)], max_buckets=30)
    expected = LatencySketch(max_buckets=30)
    expected.merge(low)
    expected.merge(high)
    total = SketchSum()
    total.add_encoded(encode_sketch(low))
    total.add_encoded(encode_sketch(high))
    assert same_sketch(total.to_sketch(), expected)


def test_sketches_of_different_accuracy_do_not_sum() -> None:
    total = SketchSum()
    total.add_encoded(encode_sketch(sketch_of([1.0])))
    with pytest.raises(ValueError, match="relative accuracy"):
        total.add_encoded(encode_sketch(sketch_of([1.0], relative_accuracy=0.02)))


def test_an_empty_sum_is_an_empty_sketch() -> None:
    assert SketchSum().to_sketch().count == 0
    assert decode_sketch(SketchSum().encode()).count == 0


def test_aggregator_keys_by_minute_service_route_consumer_and_status_class() -> None:
    aggregator = RollupAggregator()
    aggregator.add_batch(
        [
            make_record(0, status=200, total_ms=10.0),
            make_record(1, status=204, total_ms=20.0),
            make_record(2, status=404, consumer=None),
            make_record(3, status=503, upstream_ms=None),
            make_record(61, status=200),  # the next minute
            make_record(4, status=0, service=None, route=None, total_ms=-1.0),
        ]
    )
    minutes = aggregator.take()
    assert len(aggregator) == 0
    assert set(minutes) == {
        (int(T0), "orders-api", "list-orders", "acme", 2),
        (int(T0), "orders-api", "list-orders", "", 4),
        (int(T0), "orders-api", "list-orders", "acme", 5),
        (int(T0) + MINUTE, "orders-api", "list-orders", "acme", 2),
        (int(T0), "", "", "acme", 0),
    }
    count, e4, e5, b_in, b_out, blobs = minutes[int(T0), "orders-api", "list-orders", "acme", 2]
    assert (count, e4, e5, b_in, b_out) == (2, 0, 0, 24, 690)
    total = decode_sketch(blobs[0])
    assert total.count == 2 and total.min == 10.0 and total.max == 20.0
    assert minutes[int(T0), "orders-api", "list-orders", "", 4][1:3] == (1, 0)
    five = minutes[int(T0), "orders-api", "list-orders", "acme", 5]
    assert five[1:3] == (0, 1)
    assert decode_sketch(five[5][2]).count == 0  # no upstream latency to add
    assert decode_sketch(minutes[int(T0), "", "", "acme", 0][5][0]).min == 0.0  # clamped


def test_latencies_that_are_not_numbers_count_in_no_sketch() -> None:
    aggregator = RollupAggregator()
    aggregator.add_batch(
        [
            make_record(0, total_ms=5.0),
            make_record(1, total_ms=math.nan),
            make_record(2, total_ms=math.inf),
            make_record(3, total_ms=-2.0),  # a clock step: counts as 0
        ]
    )
    ((count, _, _, _, _, blobs),) = aggregator.take().values()
    total = decode_sketch(blobs[0])
    assert count == 4  # every call counts; only its latency may not
    assert (total.count, total.min, total.max) == (2, 0.0, 5.0)


def test_restore_puts_back_what_take_removed() -> None:
    aggregator = RollupAggregator()
    aggregator.add(make_record(0))
    taken = aggregator.take()
    aggregator.add(make_record(1))
    aggregator.restore(taken)
    again = aggregator.take()
    ((count, *_rest, blobs),) = again.values()
    assert count == 2 and decode_sketch(blobs[0]).count == 2


def test_hours_merged_from_minutes_equal_hours_built_directly() -> None:
    records = generate_records(20_000, start=T0, seconds=3 * HOUR, seed=3)
    aggregator = RollupAggregator()
    aggregator.add_batch(records)
    hours = group_rows(aggregator.take(), HOUR, "route")
    direct: dict[tuple[int, str, str, str, int], LatencySketch] = {}
    for record in records:
        key = (int(record.time // HOUR) * HOUR, record.service or "", record.route or "", "", 0)
        direct.setdefault(key, LatencySketch()).add(record.total_ms)
    assert set(hours) == set(direct)
    for key, row in hours.items():
        assert row.count == direct[key].count
        assert same_sketch(row.sketches[0].to_sketch(), direct[key])


def test_grouping_into_days_at_route_level_drops_the_consumer() -> None:
    aggregator = RollupAggregator()
    aggregator.add_batch(generate_records(2_000, start=T0, seconds=2 * DAY, seed=5))
    minutes = aggregator.take()
    days = group_rows(minutes, DAY, "route")
    assert {key[0] for key in days} == {int(T0), int(T0) + DAY}
    assert {key[3] for key in days} == {""}
    assert sum(row.count for row in days.values()) == 2_000
    by_consumer = group_rows(minutes, DAY, "consumer")
    assert sum(row.count for row in by_consumer.values()) == 2_000
    assert {key[3] for key in by_consumer} == {"acme", "globex", "initech", ""}


# -- the C aggregator (observe/_durations.c) against the Python reference -------------------

SERVICES = st.sampled_from(["orders-api", "billing", "", None])
RECORDS = st.lists(
    st.builds(
        lambda minute, second, service, route, consumer, status, sizes, latencies: make_record(
            time=T0 + minute * MINUTE + second,
            service=service,
            route=route,
            consumer=consumer,
            status=status,
            bytes_in=sizes[0],
            bytes_out=sizes[1],
            total_ms=latencies[0],
            gateway_ms=latencies[1],
            upstream_ms=latencies[2],
        ),
        st.integers(-2, 2),
        st.one_of(st.floats(0, 60, exclude_max=True), st.integers(0, 59)),
        SERVICES,
        SERVICES,
        st.sampled_from(["acme", None]),
        st.sampled_from([0, 99, 100, 200, 204, 404, 429, 500, 503, 599, 600]),
        st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
        st.tuples(
            st.floats(allow_nan=False),
            st.integers(0, 10**6),
            st.one_of(st.none(), st.floats(allow_nan=True)),
        ),
    ),
    max_size=40,
)


def compiled_aggregate() -> Any:
    # The tests run on the compiled build (the README's command): a missing extension fails.
    if rollups._c_aggregate is None:
        pytest.fail("the compiled aggregator (tollgate.observe._durations) is not built")
    return rollups._c_aggregate


@settings(max_examples=300)
@given(batches=st.lists(RECORDS, min_size=1, max_size=3))
def test_the_c_aggregator_counts_as_the_python_one(batches: list[list[Any]]) -> None:
    aggregate = compiled_aggregate()
    in_c: dict[Any, Any] = {}
    in_python: dict[Any, Any] = {}
    for batch in batches:
        aggregate(batch, in_c, rollups._AGGREGATE_FIELDS, "")
        rollups._aggregate_python(batch, in_python)
    assert in_c == in_python
    assert all(type(key[0]) is int and type(key[4]) is int for key in in_c)


def test_the_c_aggregator_refuses_what_python_refuses() -> None:
    aggregate = compiled_aggregate()
    fields = rollups._AGGREGATE_FIELDS
    error: type[Exception] | tuple[type[Exception], ...]
    for bad, error in (
        (make_record(time=math.nan), ValueError),  # int(nan)
        (make_record(time=math.inf), ValueError),  # inf // 60 is nan
        (make_record(status=None), TypeError),
        (make_record(bytes_in=None), TypeError),
        (make_record(total_ms="1"), (TypeError, struct.error)),  # struct's, in Python
        (("too", "short"), IndexError),
    ):
        with pytest.raises(error):
            rollups._aggregate_python([bad], {})
        with pytest.raises(error):
            aggregate([bad], {}, fields, "")
