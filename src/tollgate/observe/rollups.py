"""Analytics rollups: per-minute aggregates of call records, merged into hours and days.

Key and values. Calls are counted per (minute, service, route, consumer, status class), with
the number of calls, 4xx and 5xx errors, bytes in and out, and three `LatencySketch`es: total,
gateway and upstream latency (calls that never reached an upstream add nothing to the
last). A missing service, route or consumer is stored as "" and a call with no status
(the client left) in status class 0.

Two levels, three granularities, six tables: `rollup_consumer_{minute,hour,day}` keyed as
above, and `rollup_route_{minute,hour,day}` keyed by (bucket, service, route) only, consumers
and status classes folded in (errors keep their own columns). The route level answers every
query that does not filter on a consumer: over 30 days the consumer level holds thousands of
rows a day to merge, the route level one per route and day, which is what keeps a 30-day
percentile query well under 200 ms. Both levels are built from the same minute aggregates.

Where they are built. In the log pipeline's writer thread, never on the request path:
`RollupSink.write` adds each record to in-memory minute aggregates (a few counters, and its
latencies appended to buffers; a dict look-up when its key is not the record before's), in C
(`_durations.aggregate`: 0.1 µs a record, where the Python loop took 1.2 µs of the core the
writer thread shares with the event loop); `flush`, every `flush_interval` (10 s),
builds the minutes' sketches and merges them into all six tables, in one transaction under
the writers' lock. Merging is additive (counts add,
sketches merge), so a minute flushed in several parts, or by several workers and nodes, ends
up as if it had been built at once; hours and days are merged from the same minute
aggregates, so an hour row equals the merge of its minute rows. Days are UTC days.

Sketch storage. The sketch's own `to_bytes` is compact but decodes at ~300 µs for a day's
worth of buckets in pure Python, too slow for a query that merges thousands of rows. Rollups
store sketches in a form made for merging: a header (accuracy, min, max, sum, zero count,
lowest bucket index) and the bucket counts from the lowest to the highest index as dense
little-endian uint64, zlib-compressed (the many zero counts compress away; a day's sketch
takes about as much room as `to_bytes`). Read as one Python integer, the counts of two
sketches add in a single big-integer addition once one is shifted by 64 bits per index of
offset; no count can carry into its neighbour below 2**64 calls. So `SketchSum` merges a row
in a few µs (decompress, `int.from_bytes`, shift, add), all in C, and decodes into a
`LatencySketch` only once per answer. The result is bucket for bucket what `LatencySketch.
merge` gives, collapsed sketches included (tests pin that).
"""

from __future__ import annotations

import heapq
import logging
import math
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final, Literal

from tollgate.clock import SYSTEM_CLOCK, Clock
from tollgate.observe.database import Database, migrate
from tollgate.observe.records import COLUMNS, RecordRow
from tollgate.observe.sinks import Sink
from tollgate.observe.sketch import LatencySketch

__all__ = [
    "DAY",
    "GRANULARITIES",
    "HOUR",
    "LATENCIES",
    "LEVELS",
    "MINUTE",
    "RollupAggregator",
    "RollupKey",
    "RollupRow",
    "RollupSink",
    "SketchSum",
    "decode_sketch",
    "encode_sketch",
    "ensure_rollup_schema",
    "group_rows",
    "merge_minutes",
    "merge_rows",
    "prune_rollups",
    "table_name",
]

log = logging.getLogger("tollgate.observe.rollups")

Level = Literal["consumer", "route"]
LEVELS: Final[tuple[Level, ...]] = ("consumer", "route")
MINUTE: Final = 60
HOUR: Final = 3_600
DAY: Final = 86_400
GRANULARITIES: Final = {MINUTE: "minute", HOUR: "hour", DAY: "day"}
LATENCIES: Final = ("total", "gateway", "upstream")
# Seconds between merges into the database: the rollups' lag behind the calls.
DEFAULT_FLUSH_INTERVAL: Final = 10.0
# Keys per `IN (VALUES ...)` look-up of existing rows: well under both databases' limits.
_LOOKUP_CHUNK: Final = 200

# -- the merge-friendly sketch encoding ----------------------------------------------------

_FORMAT_VERSION: Final = 1
_FLAG_COLLAPSED: Final = 0x01
# version, flags, alpha, max_buckets, min, max, sum, zero count, count (zero bucket included),
# lowest bucket index, number of indexes from the lowest to the highest
_HEADER: Final = struct.Struct("<BBdIdddQQiI")
_FIELD_BITS: Final = 64
_ZLIB_LEVEL: Final = 1  # compression is written often; level 1 is several times faster
_LITTLE_ENDIAN: Final = sys.byteorder == "little"


def _counts_bytes(counts: array[int]) -> bytes:
    if not _LITTLE_ENDIAN:
        counts = array("Q", counts)
        counts.byteswap()
    return counts.tobytes()


def _counts_array(data: bytes) -> array[int]:
    counts = array("Q")
    counts.frombytes(data)
    if not _LITTLE_ENDIAN:
        counts.byteswap()
    return counts


def encode_sketch(sketch: LatencySketch) -> bytes:
    """A sketch in the rollups' dense, compressed form (module docstring)."""
    data = sketch.to_dict()
    pairs: list[list[int]] = data["buckets"]
    lowest = pairs[0][0] if pairs else 0
    span = pairs[-1][0] - lowest + 1 if pairs else 0
    counts = array("Q", bytes(8 * span))
    for index, count in pairs:
        counts[index - lowest] = count
    header = _HEADER.pack(
        _FORMAT_VERSION,
        _FLAG_COLLAPSED if data["collapsed"] else 0,
        data["relative_accuracy"],
        data["max_buckets"],
        sketch.min if sketch.min is not None else float("inf"),
        sketch.max if sketch.max is not None else float("-inf"),
        data["sum"],
        data["zero_count"],
        sketch.count,
        lowest,
        span,
    )
    return header + zlib.compress(_counts_bytes(counts), _ZLIB_LEVEL)


def decode_sketch(blob: bytes) -> LatencySketch:
    """The inverse of `encode_sketch`."""
    total = SketchSum()
    total.add_encoded(blob)
    return total.to_sketch()


class SketchSum:
    """Merges encoded sketches in the encoded domain: bucket counts as one big integer."""

    __slots__ = (
        "_count",
        "_counts",
        "_floor",
        "_lowest",
        "_max",
        "_max_buckets",
        "_min",
        "_relative_accuracy",
        "_sum",
        "_zero_count",
    )

    def __init__(self) -> None:
        self._relative_accuracy: float | None = None
        self._max_buckets = 0
        self._counts = 0  # bucket (lowest + k)'s count in bits [64k, 64k + 64)
        self._lowest = 0
        self._floor: int | None = None  # the highest collapsed floor among the inputs
        self._zero_count = 0
        self._count = 0
        self._sum = 0.0
        self._min = float("inf")
        self._max = float("-inf")

    @property
    def count(self) -> int:
        return self._count

    def add_encoded(self, blob: bytes) -> None:
        """Merge one `encode_sketch` output in."""
        (
            version,
            flags,
            alpha,
            max_buckets,
            minimum,
            maximum,
            total,
            zero_count,
            count,
            lowest,
            span,
        ) = _HEADER.unpack_from(blob)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unknown rollup sketch format version {version}")
        if self._relative_accuracy is None:
            self._relative_accuracy = alpha
            self._max_buckets = max_buckets
        elif alpha != self._relative_accuracy:
            raise ValueError(
                f"cannot merge a sketch of relative accuracy {alpha!r} "
                f"into one of {self._relative_accuracy!r}"
            )
        if span:
            counts = int.from_bytes(zlib.decompress(blob[_HEADER.size :]), "little")
            if not self._counts:
                self._counts, self._lowest = counts, lowest
            elif lowest >= self._lowest:
                self._counts += counts << (_FIELD_BITS * (lowest - self._lowest))
            else:
                self._counts = (self._counts << (_FIELD_BITS * (self._lowest - lowest))) + counts
                self._lowest = lowest
            if flags & _FLAG_COLLAPSED and (self._floor is None or lowest > self._floor):
                self._floor = lowest
        self._zero_count += zero_count
        self._count += count
        self._sum += total
        self._min = min(self._min, minimum)
        self._max = max(self._max, maximum)

    def add_sketch(self, sketch: LatencySketch) -> None:
        self.add_encoded(encode_sketch(sketch))

    def _pairs(self) -> tuple[list[list[int]], bool]:
        """[index, count] pairs in index order, collapsed as `LatencySketch.merge` would;
        and whether the result is collapsed."""
        counts = self._counts
        if not counts:
            return [], self._floor is not None
        fields = (counts.bit_length() + _FIELD_BITS - 1) // _FIELD_BITS
        dense = _counts_array(counts.to_bytes(fields * 8, "little"))
        lowest = self._lowest
        pairs = [[lowest + offset, count] for offset, count in enumerate(dense) if count]
        collapsed = self._floor is not None
        if self._floor is not None:
            pairs = _fold_below(pairs, self._floor)
        if len(pairs) > self._max_buckets:
            excess = len(pairs) - self._max_buckets
            pairs = _fold_below(pairs, heapq.nsmallest(excess + 1, (p[0] for p in pairs))[-1])
            collapsed = True
        return pairs, collapsed

    def to_sketch(self) -> LatencySketch:
        """The merged sketch (an empty default one if nothing was added)."""
        if self._relative_accuracy is None:
            return LatencySketch()
        pairs, collapsed = self._pairs()
        return LatencySketch.from_dict(
            {
                "version": 1,
                "relative_accuracy": self._relative_accuracy,
                "max_buckets": self._max_buckets,
                "collapsed": collapsed,
                "min": self._min if self._count else None,
                "max": self._max if self._count else None,
                "sum": self._sum,
                "zero_count": self._zero_count,
                "buckets": pairs,
            }
        )

    def encode(self) -> bytes:
        """The merged sketch, encoded; without decoding it unless a collapse must be applied."""
        if self._relative_accuracy is None:
            return encode_sketch(LatencySketch())
        counts = self._counts
        fields = (counts.bit_length() + _FIELD_BITS - 1) // _FIELD_BITS
        if self._floor is not None or fields > self._max_buckets:
            return encode_sketch(self.to_sketch())
        header = _HEADER.pack(
            _FORMAT_VERSION,
            0,
            self._relative_accuracy,
            self._max_buckets,
            self._min,
            self._max,
            self._sum,
            self._zero_count,
            self._count,
            self._lowest if fields else 0,
            fields,
        )
        return header + zlib.compress(counts.to_bytes(fields * 8, "little"), _ZLIB_LEVEL)

    def __repr__(self) -> str:
        return f"SketchSum(count={self._count}, lowest={self._lowest})"


def _fold_below(pairs: list[list[int]], floor: int) -> list[list[int]]:
    """Move the counts of buckets below `floor` into it, as `LatencySketch` collapses."""
    folded = sum(count for index, count in pairs if index < floor)
    kept = [pair for pair in pairs if pair[0] >= floor]
    if kept and kept[0][0] == floor:
        kept[0] = [floor, kept[0][1] + folded]
    else:
        kept.insert(0, [floor, folded])
    return kept


# -- aggregation -----------------------------------------------------------------------------

# (bucket start, service, route, consumer, status class); at the route level consumer is ""
# and status class 0 for every row.
RollupKey = tuple[int, str, str, str, int]


@dataclass(slots=True)
class RollupRow:
    """One row's values: counters and the three encoded latency sketches."""

    count: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sketches: tuple[SketchSum, SketchSum, SketchSum] = field(
        default_factory=lambda: (SketchSum(), SketchSum(), SketchSum())
    )

    def add_row(
        self,
        count: int,
        errors_4xx: int,
        errors_5xx: int,
        bytes_in: int,
        bytes_out: int,
        blobs: Sequence[bytes],
    ) -> None:
        self.count += count
        self.errors_4xx += errors_4xx
        self.errors_5xx += errors_5xx
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        for total, blob in zip(self.sketches, blobs, strict=True):
            total.add_encoded(blob)

    def values(self) -> tuple[int, int, int, int, int, bytes, bytes, bytes]:
        total, gateway, upstream = (sketch.encode() for sketch in self.sketches)
        return (
            self.count,
            self.errors_4xx,
            self.errors_5xx,
            self.bytes_in,
            self.bytes_out,
            total,
            gateway,
            upstream,
        )


MinuteValues = tuple[int, int, int, int, int, tuple[bytes, ...]]

# The fields the aggregator reads, by their indexes in a record (`_durations.aggregate`), and
# fetched from a record in one C call (the Python aggregator).
_AGGREGATE_FIELDS: Final = tuple(
    COLUMNS.index(name)
    for name in (
        "time",
        "service",
        "route",
        "consumer",
        "status",
        "bytes_in",
        "bytes_out",
        "total_ms",
        "gateway_ms",
        "upstream_ms",
    )
)
_ROLLUP_FIELDS: Final = itemgetter(*_AGGREGATE_FIELDS)

try:  # counted in C when the package was built with its extensions
    from tollgate.observe._durations import (  # type: ignore[import-not-found,unused-ignore]
        aggregate as _c_aggregate,
    )
except ImportError:  # pragma: no cover - a build without a compiler
    _c_aggregate = None


# A minute aggregate as records come in (the layout `_durations.aggregate` fills): five native
# int64 counters (calls, 4xx, 5xx, bytes in, bytes out), then the total, gateway and upstream
# latencies as native doubles, appended, until `take` builds the sketches (a sketch `add` per
# record costs several times more here, where thousands of small sketches are built at once,
# than a batch of adds later).
_Minute = tuple[bytearray, bytearray, bytearray, bytearray]
_COUNTERS: Final = struct.Struct("=5q")
_LATENCY: Final = struct.Struct("=d")


def _new_minute() -> _Minute:
    return (bytearray(_COUNTERS.size), bytearray(), bytearray(), bytearray())


def _aggregate_python(records: Iterable[RecordRow], minutes: dict[RollupKey, _Minute]) -> None:
    """`_durations.aggregate`, the reference and the fallback of a build without a compiler."""
    get = minutes.get
    pack = _LATENCY.pack
    for (
        moment,
        service,
        route,
        consumer,
        status,
        bytes_in,
        bytes_out,
        total_ms,
        gateway_ms,
        upstream_ms,
    ) in map(_ROLLUP_FIELDS, records):
        klass = status // 100 if 100 <= status <= 599 else 0
        key = (
            int(moment // MINUTE) * MINUTE,
            "" if service is None else service,
            "" if route is None else route,
            "" if consumer is None else consumer,
            klass,
        )
        minute = get(key)
        if minute is None:
            minute = minutes[key] = _new_minute()
        counters, total, gateway, upstream = minute
        count, errors_4xx, errors_5xx, in_bytes, out_bytes = _COUNTERS.unpack(counters)
        _COUNTERS.pack_into(
            counters,
            0,
            count + 1,
            errors_4xx + (klass == 4),
            errors_5xx + (klass == 5),
            in_bytes + bytes_in,
            out_bytes + bytes_out,
        )
        total += pack(total_ms)
        gateway += pack(gateway_ms)
        if upstream_ms is not None:
            upstream += pack(upstream_ms)


def _encode_latencies(values: array[float]) -> bytes:
    sketch = LatencySketch()
    try:
        sketch.add_many(values)
    except ValueError:
        # A negative latency (a clock step) counts as 0; NaN and infinities not at all.
        sketch = LatencySketch()
        sketch.add_many(array("d", [max(value, 0.0) for value in values if math.isfinite(value)]))
    return encode_sketch(sketch)


class RollupAggregator:
    """Minute aggregates of the records added since the last `take`."""

    __slots__ = ("_minutes", "_restored")

    def __init__(self) -> None:
        self._minutes: dict[RollupKey, _Minute] = {}
        self._restored: dict[RollupKey, MinuteValues] = {}

    def add_batch(self, records: Sequence[RecordRow]) -> None:
        """Count each record in its minute's aggregate: about 0.1 µs a record in C (of the
        same key as the record before), 1.5 µs in Python."""
        if _c_aggregate is not None:
            _c_aggregate(records, self._minutes, _AGGREGATE_FIELDS, "")
        else:
            _aggregate_python(records, self._minutes)

    def add(self, record: RecordRow) -> None:
        self.add_batch((record,))

    def __len__(self) -> int:
        return len(self._minutes) + len(self._restored)

    def take(self) -> dict[RollupKey, MinuteValues]:
        """The minute aggregates (sketches built and encoded), leaving the aggregator empty."""
        minutes, self._minutes = self._minutes, {}
        taken, self._restored = self._restored, {}
        for key, (counters, *latencies) in minutes.items():
            values: MinuteValues = (
                *_COUNTERS.unpack(counters),
                tuple(_encode_latencies(array("d", doubles)) for doubles in latencies),
            )
            earlier = taken.get(key)
            taken[key] = values if earlier is None else _combine(earlier, values)
        return taken

    def restore(self, taken: dict[RollupKey, MinuteValues]) -> None:
        """Put back what `take` returned (after a failed merge), for the next `take`."""
        restored = self._restored
        for key, values in taken.items():
            earlier = restored.get(key)
            restored[key] = values if earlier is None else _combine(earlier, values)

    def __repr__(self) -> str:
        return f"RollupAggregator(minutes={len(self._minutes)}, restored={len(self._restored)})"


def _combine(left: MinuteValues, right: MinuteValues) -> MinuteValues:
    blobs: list[bytes] = []
    for one, other in zip(left[5], right[5], strict=True):
        total = SketchSum()
        total.add_encoded(one)
        total.add_encoded(other)
        blobs.append(total.encode())
    return (
        left[0] + right[0],
        left[1] + right[1],
        left[2] + right[2],
        left[3] + right[3],
        left[4] + right[4],
        tuple(blobs),
    )


def group_rows(
    minutes: dict[RollupKey, MinuteValues],
    granularity: int,
    level: Level,
) -> dict[RollupKey, RollupRow]:
    """Minute aggregates grouped into rows of `granularity` at `level`."""
    rows: dict[RollupKey, RollupRow] = {}
    for (minute, service, route, consumer, klass), values in minutes.items():
        bucket = minute - minute % granularity
        if level == "consumer":
            key = (bucket, service, route, consumer, klass)
        else:  # the route level folds consumers and status classes together
            key = (bucket, service, route, "", 0)
        row = rows.get(key)
        if row is None:
            row = rows[key] = RollupRow()
        row.add_row(*values)
    return rows


# -- storage ---------------------------------------------------------------------------------


def table_name(level: Level, granularity: int) -> str:
    return f"rollup_{level}_{GRANULARITIES[granularity]}"


def _key_columns(level: Level) -> tuple[str, ...]:
    if level == "consumer":
        return ("bucket", "service", "route", "consumer", "status_class")
    return ("bucket", "service", "route")


VALUE_COLUMNS: Final = (
    "count",
    "errors_4xx",
    "errors_5xx",
    "bytes_in",
    "bytes_out",
    "total_sketch",
    "gateway_sketch",
    "upstream_sketch",
)


def _migrations(database: Database) -> tuple[tuple[str, ...], ...]:
    statements: list[str] = []
    integer, blob = database.int_type, database.blob_type
    for level in LEVELS:
        keys = _key_columns(level)
        for granularity in GRANULARITIES:
            table = table_name(level, granularity)
            key_types = {"bucket": integer, "status_class": integer}
            columns = [f"{name} {key_types.get(name, 'TEXT')} NOT NULL" for name in keys]
            columns += [f"{name} {integer} NOT NULL" for name in VALUE_COLUMNS[:5]]
            columns += [f"{name} {blob} NOT NULL" for name in VALUE_COLUMNS[5:]]
            statements.append(
                f"CREATE TABLE {table} ({', '.join(columns)}, PRIMARY KEY ({', '.join(keys)}))"
            )
            if level == "consumer":
                # Consumer filters; and top consumers read counts from an index, not the rows.
                statements.append(f"CREATE INDEX {table}_consumer ON {table} (consumer, bucket)")
                statements.append(
                    f"CREATE INDEX {table}_counts ON {table} "
                    "(bucket, service, route, consumer, count)"
                )
    return (tuple(statements),)


def ensure_rollup_schema(database: Database, connection: Any) -> None:
    migrate(database, connection, "rollups", _migrations(database))


def _chunks(items: Sequence[tuple[Any, ...]], size: int) -> Iterator[Sequence[tuple[Any, ...]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def merge_rows(
    database: Database,
    cursor: Any,
    level: Level,
    granularity: int,
    rows: dict[RollupKey, RollupRow],
) -> None:
    """Merge `rows` into their table (in the caller's transaction, which holds the lock)."""
    if not rows:
        return
    table = table_name(level, granularity)
    key_columns = _key_columns(level)
    consumer_level = level == "consumer"

    def stored_key(key: RollupKey) -> tuple[Any, ...]:
        return key if consumer_level else key[:3]

    by_stored = {stored_key(key): row for key, row in rows.items()}
    width = len(key_columns)
    tuple_sql = "(" + ", ".join("?" for _ in key_columns) + ")"
    keys = list(by_stored)
    for chunk in _chunks(keys, _LOOKUP_CHUNK):
        statement = (
            f"SELECT {', '.join(key_columns)}, {', '.join(VALUE_COLUMNS)} FROM {table} "
            f"WHERE ({', '.join(key_columns)}) IN (VALUES {', '.join(tuple_sql for _ in chunk)})"
        )
        cursor.execute(database.sql(statement), [value for key in chunk for value in key])
        for stored in cursor.fetchall():
            row = by_stored[tuple(stored[:width])]
            count, errors_4xx, errors_5xx, bytes_in, bytes_out, *blobs = stored[width:]
            row.add_row(
                count, errors_4xx, errors_5xx, bytes_in, bytes_out, [bytes(b) for b in blobs]
            )
    columns = (*key_columns, *VALUE_COLUMNS)
    updates = ", ".join(f"{name} = excluded.{name}" for name in VALUE_COLUMNS)
    statement = (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET {updates}"
    )
    cursor.executemany(
        database.sql(statement), [(*key, *row.values()) for key, row in by_stored.items()]
    )


def merge_minutes(
    database: Database,
    connection: Any,
    minutes: dict[RollupKey, MinuteValues],
) -> None:
    """Merge minute aggregates into all six tables, in one transaction."""
    if not minutes:
        return
    grouped = {
        (level, granularity): group_rows(minutes, granularity, level)
        for level in LEVELS
        for granularity in GRANULARITIES
    }
    with database.transaction(connection) as cursor:
        for (level, granularity), rows in grouped.items():
            merge_rows(database, cursor, level, granularity, rows)


def prune_rollups(
    database: Database,
    now: float,
    *,
    minute_days: float = 7,
    hour_days: float = 90,
    day_days: float | None = None,
) -> int:
    """Delete rollup rows older than their granularity's retention; how many were deleted.

    Minutes are kept a week and hours 90 days by default, days forever: the coarser the
    rows, the fewer they are, and queries over long ranges read only days.
    """
    keep = {MINUTE: minute_days, HOUR: hour_days, DAY: day_days}
    connection = database.connect()
    deleted = 0
    try:
        ensure_rollup_schema(database, connection)
        with database.transaction(connection) as cursor:
            for level in LEVELS:
                for granularity, days in keep.items():
                    if days is None:
                        continue
                    cursor.execute(
                        database.sql(
                            f"DELETE FROM {table_name(level, granularity)} WHERE bucket < ?"
                        ),
                        (int(now - days * DAY),),
                    )
                    deleted += max(cursor.rowcount, 0)
    finally:
        connection.close()
    return deleted


# -- the sink --------------------------------------------------------------------------------


class RollupSink(Sink):
    """Builds rollups from the pipeline's batches and merges them into the database.

    `write` only aggregates in memory and cannot fail, so the pipeline never hands it a batch
    twice; `flush` merges (when `flush_interval` has passed) and may raise, keeping the
    aggregates for the next try; `close` merges whatever is left.
    """

    name = "rollups"

    def __init__(
        self,
        database: Database,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.database = database
        self._connection = database.connect()
        ensure_rollup_schema(database, self._connection)
        self._aggregator = RollupAggregator()
        self._flush_interval = flush_interval
        self._clock = clock
        self._last_flush = clock.monotonic()

    def write(self, batch: Sequence[RecordRow]) -> None:
        self._aggregator.add_batch(batch)

    def flush(self) -> None:
        if self._clock.monotonic() - self._last_flush >= self._flush_interval:
            self.flush_now()

    def flush_now(self) -> None:
        """Merge the pending aggregates into the database now."""
        self._last_flush = self._clock.monotonic()
        if not len(self._aggregator):
            return
        minutes = self._aggregator.take()
        try:
            if not self.database.usable(self._connection):
                self._connection = self.database.connect()
            merge_minutes(self.database, self._connection, minutes)
        except BaseException:
            self._aggregator.restore(minutes)
            raise

    def close(self) -> None:
        try:
            self.flush_now()
        finally:
            self._connection.close()

    def __repr__(self) -> str:
        return f"RollupSink({self.database!r}, {self._aggregator!r})"
