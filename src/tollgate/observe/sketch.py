"""A mergeable latency sketch: quantiles with bounded relative error, from buckets, not raw data.

In the spirit of DDSketch (Masson, Rim and Lee, VLDB 2019). With relative accuracy alpha and
gamma = (1 + alpha) / (1 - alpha), a value v > 0 goes to bucket i = ceil(log_gamma(v)), which
covers (gamma^(i-1), gamma^i]; the bucket answers 2 gamma^i / (gamma + 1) for its values, which
is within alpha of every one of them. So `quantile(q)` is within alpha (relative) of the exact
value of rank floor(q * (count - 1)) in the sorted data (rank 0 the smallest), whatever the
distribution. Two sketches with the same alpha merge by adding their bucket counts, so
per-minute rollups add up to hours and days with no loss: the merge of two streams' sketches
equals the sketch of the concatenated stream, bucket for bucket (`sum` alone can differ in its
last bits, as float addition is not associative).

Values up to `MIN_INDEXABLE_MS` (including 0) are counted in a zero bucket that answers 0
(clamped to the smallest value seen), so their error is absolute, below 1 ns. Negative,
infinite and NaN values are rejected with `ValueError`. `min` and `max` are exact, and every
answer is clamped into [min, max]: `quantile(0)` is the minimum and `quantile(1)` the maximum.

Size is bounded: past `max_buckets` buckets, the lowest ones collapse into one, and later
values below it join it. Only low quantiles lose accuracy then (they are answered too high);
the high quantiles that latency alerts read stay within alpha. With alpha = 0.01, 2048 buckets
span a ratio of gamma^2048 ~ 6e17 between the smallest and largest value, so real latencies
never collapse. Merging keeps the bound; once a sketch has collapsed, merges are no longer exact.

Storage formats. `to_bytes` (all little-endian; varints are unsigned LEB128):

    offset  size  field
    0       1     format version (1)
    1       1     flags: bit 0 set if the lowest bucket holds collapsed buckets
    2       8     relative accuracy alpha (float64)
    10      4     maximum number of buckets (uint32)
    14      8     min (float64; +inf when empty)
    22      8     max (float64; -inf when empty)
    30      8     sum (float64)
    38      ...   zero-bucket count (varint), number of buckets n (varint), then n pairs in
                  increasing index order: the index (the first zigzag-encoded, as it may be
                  negative; each later one as its difference from the previous, ≥ 1) and
                  the count (≥ 1), all varints.

The count is not stored: it is the zero-bucket count plus the bucket counts. `to_dict` holds
the same fields for JSON: `version`, `relative_accuracy`, `max_buckets`, `collapsed`, `min`
and `max` (null when empty), `sum`, `zero_count`, and `buckets` as [index, count] pairs in
increasing index order. Both round trips are exact; `from_bytes` and `from_dict` reject a
malformed input with `ValueError`.
"""

from __future__ import annotations

import heapq
import math
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from math import ceil, log
from typing import Any

try:  # counted in C when the package was built with its extensions
    from tollgate.observe._durations import (  # type: ignore[import-not-found,unused-ignore]
        bucket_counts as _bucket_counts,
    )
except ImportError:  # pragma: no cover - a build without a compiler
    _bucket_counts = None

DEFAULT_RELATIVE_ACCURACY = 0.01

# 2048 buckets cover a ratio of ~6e17 at alpha = 0.01 and serialise to at most ~10 KB.
DEFAULT_MAX_BUCKETS = 2048

# 1 ns: finer than any timer the gateway reads, so a value this small is as good as zero.

MIN_INDEXABLE_MS = 1e-6

FORMAT_VERSION = 1
_FLAG_COLLAPSED = 0x01
_HEADER = struct.Struct("<BBdIddd")
_MAX_FLOAT = sys.float_info.max
_MAX_BUCKETS_STORABLE = 2**32 - 1  # stored as a uint32


class LatencySketch:
    """Latencies (ms) in logarithmic buckets: `add` per call, `merge` rollups, `quantile` to read.

    `add` is on the request path: one `log`, one dict update and a few comparisons.
    """

    __slots__ = (
        "_buckets",
        "_count",
        "_floor",
        "_gamma",
        "_log_gamma",
        "_max",
        "_max_buckets",
        "_min",
        "_multiplier",
        "_relative_accuracy",
        "_sum",
        "_zero_count",
    )

    def __init__(
        self,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), not {relative_accuracy!r}")
        if not 1 <= max_buckets <= _MAX_BUCKETS_STORABLE:
            raise ValueError(
                f"max_buckets must be in [1, {_MAX_BUCKETS_STORABLE}], not {max_buckets!r}"
            )
        self._relative_accuracy = relative_accuracy
        self._max_buckets = max_buckets
        self._gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        self._log_gamma = log(self._gamma)
        self._multiplier = 1.0 / self._log_gamma
        self._buckets: dict[int, int] = {}
        # Once collapsed, the lowest bucket: it holds every value below it too (`_collapse`).
        self._floor: int | None = None
        self._zero_count = 0
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    # -- recording -------------------------------------------------------------------------

    def add(self, value_ms: float, count: int = 1) -> None:
        """Record `count` occurrences of `value_ms` (≥ 0, finite)."""
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count!r}")
        if MIN_INDEXABLE_MS < value_ms <= _MAX_FLOAT:
            index = ceil(log(value_ms) * self._multiplier)
            buckets = self._buckets
            if index in buckets:
                buckets[index] += count
            else:
                self._add_bucket(index, count)
        elif 0.0 <= value_ms <= MIN_INDEXABLE_MS:
            self._zero_count += count
        else:
            raise ValueError(f"a latency must be finite and non-negative, not {value_ms!r}")
        self._count += count
        self._sum += value_ms * count
        if value_ms < self._min:
            self._min = value_ms
        if value_ms > self._max:
            self._max = value_ms

    def add_many(self, values: Sequence[float]) -> None:
        """`add(value)` for each of `values` (each ≥ 0 and finite), in bulk.

        For an `array("d")`, the buckets are counted in C (`_durations.bucket_counts`, a few ns
        a value); otherwise by one list comprehension and a `Counter`: either way a fraction
        of `add`'s cost per value, for the thousands of values a minute's rollup turns into
        sketches. The buckets are the same as with `add`, new
        ones taken in ascending order (what `max_buckets` folds, if it must, can differ from
        one `add` at a time, within the same accuracy); `sum` may differ in its last bits.
        """
        if not values:
            return
        multiplier = self._multiplier
        floor = MIN_INDEXABLE_MS
        count = len(values)
        counts: Mapping[int, int]
        counted_in_c = None
        if _bucket_counts is not None and isinstance(values, array) and values.typecode == "d":
            counted_in_c = _bucket_counts(values, multiplier, floor)
            valid = counted_in_c is not None
        else:
            total = sum(values)
            lowest = min(values)
            valid = math.isfinite(total) and lowest >= 0.0  # else a NaN, an infinity or a negative
        if not valid:
            for value in values:
                self.add(value)  # raises at the first bad one, as `add` would
            return
        if counted_in_c is not None:
            counts, zeros, total, lowest, highest = counted_in_c
        else:
            counted = Counter([ceil(log(value) * multiplier) for value in values if value > floor])
            counts, zeros = counted, count - counted.total()
            highest = max(values)
        buckets = self._buckets
        for index in sorted(counts):
            if index in buckets:
                buckets[index] += counts[index]
            else:
                self._add_bucket(index, counts[index])
        self._zero_count += zeros
        self._count += count
        self._sum += total
        if lowest < self._min:
            self._min = lowest
        if highest > self._max:
            self._max = highest

    def merge(self, other: LatencySketch) -> None:
        """Add `other`'s values to this sketch (which must have the same relative accuracy)."""
        if other._relative_accuracy != self._relative_accuracy:
            raise ValueError(
                f"cannot merge a sketch of relative accuracy {other._relative_accuracy!r} "
                f"into one of {self._relative_accuracy!r}"
            )
        floors = [floor for floor in (self._floor, other._floor) if floor is not None]
        buckets = self._buckets
        for index, count in list(other._buckets.items()):
            buckets[index] = buckets.get(index, 0) + count
        if floors:
            self._fold_below(max(floors))
        if len(buckets) > self._max_buckets:
            self._collapse()
        self._zero_count += other._zero_count
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def _add_bucket(self, index: int, count: int) -> None:
        buckets = self._buckets
        floor = self._floor
        if floor is not None and index < floor:
            buckets[floor] += count
            return
        buckets[index] = count
        if len(buckets) > self._max_buckets:
            self._collapse()

    def _collapse(self) -> None:
        """Fold the lowest buckets into one so that `max_buckets` remain."""
        excess = len(self._buckets) - self._max_buckets
        lowest = heapq.nsmallest(excess + 1, self._buckets)
        self._fold_below(lowest[-1])

    def _fold_below(self, floor: int) -> None:
        """Move every count below bucket `floor` into it; it becomes the collapsed bucket."""
        buckets = self._buckets
        folded = sum(buckets.pop(index) for index in [i for i in buckets if i < floor])
        buckets[floor] = buckets.get(floor, 0) + folded
        self._floor = floor

    # -- reading ---------------------------------------------------------------------------

    def quantile(self, q: float) -> float | None:
        """The value of rank floor(q * (count - 1)) within alpha, or None for an empty sketch."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be in [0, 1], not {q!r}")
        if self._count == 0:
            return None
        if q == 0.0:
            return self._min
        if q == 1.0:
            return self._max
        rank = q * (self._count - 1)
        seen = self._zero_count
        if seen > rank:
            return self._min  # the zero bucket answers 0, clamped to the smallest value
        buckets = self._buckets
        for index in sorted(buckets):
            seen += buckets[index]
            if seen > rank:
                return self._value_of(index)
        return self._max  # unreachable while the counts add up; rounding of `rank` aside

    def _value_of(self, index: int) -> float:
        """Bucket `index`'s answer, 2gamma^i / (gamma + 1), clamped into [min, max]."""
        log_value = index * self._log_gamma + log(2.0 / (self._gamma + 1.0))
        # Compared in logs first: near the float maximum, exp would overflow.
        if log_value >= log(self._max):
            return self._max
        return max(math.exp(log_value), self._min)

    @property
    def relative_accuracy(self) -> float:
        return self._relative_accuracy

    @property
    def max_buckets(self) -> int:
        return self._max_buckets

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float | None:
        return self._min if self._count else None

    @property
    def max(self) -> float | None:
        return self._max if self._count else None

    @property
    def mean(self) -> float | None:
        return self._sum / self._count if self._count else None

    def __repr__(self) -> str:
        return (
            f"LatencySketch(relative_accuracy={self._relative_accuracy!r}, count={self._count}, "
            f"min={self.min!r}, max={self.max!r}, buckets={len(self._buckets)}, "
            f"zero_count={self._zero_count}, collapsed={self._floor is not None})"
        )

    # -- storage ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The compact binary form described in the module docstring."""
        out = bytearray(
            _HEADER.pack(
                FORMAT_VERSION,
                0 if self._floor is None else _FLAG_COLLAPSED,
                self._relative_accuracy,
                self._max_buckets,
                self._min,
                self._max,
                self._sum,
            )
        )
        _write_varint(out, self._zero_count)
        _write_varint(out, len(self._buckets))
        previous: int | None = None
        for index in sorted(self._buckets):
            _write_varint(out, _zigzag(index) if previous is None else index - previous)
            _write_varint(out, self._buckets[index])
            previous = index
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencySketch:
        if len(data) < _HEADER.size:
            raise ValueError(f"a sketch needs at least {_HEADER.size} bytes, got {len(data)}")
        version, flags, alpha, max_buckets, minimum, maximum, total = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown sketch format version {version}")
        offset = _HEADER.size
        zero_count, offset = _read_varint(data, offset)
        bucket_count, offset = _read_varint(data, offset)
        pairs: list[tuple[int, int]] = []
        index = 0
        for position in range(bucket_count):
            step, offset = _read_varint(data, offset)
            index = _unzigzag(step) if position == 0 else index + step
            count, offset = _read_varint(data, offset)
            pairs.append((index, count))
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes left over after the sketch")
        collapsed = bool(flags & _FLAG_COLLAPSED)
        return cls._restore(
            alpha, max_buckets, collapsed, minimum, maximum, total, zero_count, pairs
        )

    def to_dict(self) -> dict[str, Any]:
        """The same fields as `to_bytes`, as JSON-ready values (module docstring)."""
        return {
            "version": FORMAT_VERSION,
            "relative_accuracy": self._relative_accuracy,
            "max_buckets": self._max_buckets,
            "collapsed": self._floor is not None,
            "min": self.min,
            "max": self.max,
            "sum": self._sum,
            "zero_count": self._zero_count,
            "buckets": [[index, self._buckets[index]] for index in sorted(self._buckets)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencySketch:
        try:
            if data["version"] != FORMAT_VERSION:
                raise ValueError(f"unknown sketch format version {data['version']!r}")
            minimum, maximum = data["min"], data["max"]
            return cls._restore(
                float(data["relative_accuracy"]),
                int(data["max_buckets"]),
                bool(data["collapsed"]),
                math.inf if minimum is None else float(minimum),
                -math.inf if maximum is None else float(maximum),
                float(data["sum"]),
                int(data["zero_count"]),
                [(int(index), int(count)) for index, count in data["buckets"]],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a latency sketch: {exc!r}") from exc

    @classmethod
    def _restore(
        cls,
        relative_accuracy: float,
        max_buckets: int,
        collapsed: bool,
        minimum: float,
        maximum: float,
        total: float,
        zero_count: int,
        pairs: list[tuple[int, int]],
    ) -> LatencySketch:
        """The one place both decoders build a sketch and check that its fields agree."""
        sketch = cls(relative_accuracy, max_buckets)
        buckets = dict(pairs)
        if len(buckets) != len(pairs) or len(buckets) > max_buckets:
            raise ValueError("a sketch's bucket indexes must be distinct and within max_buckets")
        if zero_count < 0 or any(count < 1 for count in buckets.values()):
            raise ValueError("a sketch's counts must be positive")
        count = zero_count + sum(buckets.values())
        if count:
            agree = 0.0 <= minimum <= maximum <= _MAX_FLOAT
        else:
            agree = minimum == math.inf and maximum == -math.inf and not collapsed
        if not agree:
            raise ValueError("a sketch's min, max and counts disagree")
        sketch._buckets = buckets
        sketch._floor = min(buckets) if collapsed else None
        sketch._zero_count = zero_count
        sketch._count = count
        sketch._sum = total
        sketch._min = minimum
        sketch._max = maximum
        return sketch


def _zigzag(number: int) -> int:
    return number * 2 if number >= 0 else -number * 2 - 1


def _unzigzag(number: int) -> int:
    return number >> 1 if number & 1 == 0 else -((number + 1) >> 1)


def _write_varint(out: bytearray, number: int) -> None:
    while number >= 0x80:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    number = shift = 0
    while offset < len(data):
        byte = data[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        if byte < 0x80:
            return number, offset
        shift += 7
    raise ValueError("a sketch's bytes end inside a number")
