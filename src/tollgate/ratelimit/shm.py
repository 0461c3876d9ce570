"""The node-wide store of rate-limit state: a hash table in a file that every worker maps.

Workers of one node are separate processes, so exact counters need state they all see. No
Python library gives a shared-memory map that survives a worker dying mid-update:
`multiprocessing.shared_memory` is raw bytes, `multiprocessing.Manager` puts a server process
and a round trip on every request, and `multiprocessing.Lock` is a semaphore that a killed
holder never gives back, wedging every other worker. So this module builds one from parts the
kernel makes robust:

- a file (on tmpfs, e.g. under /dev/shm) of fixed layout, mapped with `mmap` by every worker;
- `fcntl` byte-range locks, one per stripe of the table: the kernel drops a process's locks
  when it dies, so a crashed worker cannot wedge the others. They are open file description
  locks (Linux 3.15 and later), which belong to an open file rather than to a process: two
  stores opened in one process exclude each other too, and closing one leaves the other's
  locks alone. Where the system has none, the store runs unlocked only (one worker);
- a CRC-32 in every record, so that a record torn by a writer that died mid-write is detected.

Table. `capacity` records of 64 bytes in stripes of up to 64 records (one 4 KiB page each).
A key is hashed (keyed BLAKE2b, with a random salt made at creation, so that clients cannot
aim keys at one stripe) to a stripe and a home slot in it. Open addressing with linear
probing from the home slot, within the stripe: a record for the key and the algorithm's tag is
looked for across the whole stripe (one `mmap.find` of the digest, in C), and a new record
takes the first free slot from home on, else a torn record's or an expired one's, else the
slot whose state expires first (an eviction: that key starts afresh, which errs on the side of
admitting). A stripe fills before the table does: with live keys at half the capacity
practically never, at three quarters one stripe in sixty is full and one new key in a thousand
evicts, at nine tenths one in seventy. Size it at twice the keys live at once.

Why a crash cannot corrupt the table:

1. Every read and write of a stripe happens under that stripe's lock, so a reader sees each
   record either as its last writer left it complete or torn by a writer that died mid-write
   (the kernel released its lock when it died).
2. Every record carries a CRC-32 of its other bytes, written with them. A torn record (some
   new bytes, some old) fails it but for a chance of 2**-32; a record that fails is treated as
   empty: its key starts afresh and its slot is free for reuse.
3. No invariant spans two records: a key's state lives in one record, and lookups scan the
   whole stripe rather than stopping at a gap, so no write order between records matters.
   The one multi-record write, a request admitted by several limits, may be cut short by a
   crash: some limits then count a request the dead worker never sent on (an over-count of
   one request per crash).
4. The header is written once, into a temporary file renamed into place: a worker sees no
   file or a complete one. The per-stripe eviction counters carry a CRC-32 too; a torn one
   restarts from zero (it is a statistic).

States are packed as fixed fields, so the store holds every algorithm whose state has a fixed
size: fixed-window, quota, sliding-window, token-bucket, leaky-bucket and concurrency. The
sliding-window log keeps up to `limit` timestamps per key and is not supported: `hit` and
`check_algorithm` reject it with a `ValueError`.

Deciding. With the compiled primitives, a request with one limit of a fixed-window,
sliding-window, token-bucket, leaky-bucket or concurrency kind is one C call
(`_shmtable.hit`): lock the stripe, find the record, decide, write the new state, unlock, and
back come the decision's fields. The C is those algorithms again, operation for operation, so
its decisions and the states it writes are theirs bit for bit (the tests check both against
the pure algorithms by hypothesis, and that the table fills, reuses and evicts slots byte for
byte as the Python path does). Quotas (time zones), requests with several limits, and the rare
request the C hands back (a time or cost out of its range) are decided by the algorithms in
Python, between a locked read and a write.

Layout of the file (little-endian), all offsets in bytes:

    header    [0, 4096)             magic "TGSHMRL1", format version, record size, stripes,
                                    slots per stripe, records offset, file size, salt, CRC-32
    counters  [4096, ...)           one 64-byte line per stripe: evictions (u64), CRC-32
    records   [records offset, ...) page-aligned; stripe s holds slots_per_stripe records

    record (64 bytes)
      0  digest    16  keyed BLAKE2b-128 of the key (UTF-8); all zero in a free slot
     16  tag        1  the algorithm kind (0: free slot)
     17  padding    7
     24  field 1    8  float64 or int64, by tag
     32  field 2    8
     40  field 3    8
     48  expires    8  float64: wall time from which the state counts for nothing
     56  crc32      4  CRC-32 of bytes 0-55
     60  padding    4

Locks: stripe s is guarded by an exclusive (or, to read, shared) lock on byte s of the file.
Locks are advisory and need not cover the bytes they guard. Stripes are locked in ascending
order, so that requests with several limits cannot deadlock.

The time is always passed in (wall seconds), never read here. One store object per process:
the supervisor calls `create` before starting workers, each worker calls `open`; a store
object inherited across `fork` refuses to work (a forked child shares its parent's locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

from tollgate.errors import TollgateError
from tollgate.ratelimit.algorithms import (
    BucketState,
    CombinedDecision,
    Concurrency,
    Decision,
    FixedWindow,
    LeakyBucket,
    QueueState,
    RateAlgorithm,
    SlidingCounterState,
    SlidingWindowCounter,
    TokenBucket,
    WindowCount,
    decide_all,
)

try:  # the compiled primitives (setup.py builds them); the same table without, only slower
    from tollgate.ratelimit import _shmtable as _compiled  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pure-Python install
    _compiled = None
_C: Any = _compiled

MAGIC: Final = b"TGSHMRL1"
FORMAT_VERSION: Final = 2
HEADER_SIZE: Final = 4096
PAGE_SIZE: Final = 4096
RECORD_SIZE: Final = 64
# A lookup scans its whole stripe in C and a new key's miss scans all of it: one page keeps
# that near a microsecond. Smaller stripes would overflow (and evict) at lower loads.
STRIPE_SLOTS: Final = 64
# A line per stripe so that two stripes' counters never share a cache line.
COUNTER_SIZE: Final = 64
# 16 Mi records is a 1 GiB file: far past any node's live keys, so more is surely a typo.
MAX_CAPACITY: Final = 1 << 24
# Keys whose digest and place a store remembers (a few hundred bytes each), cleared when full:
# hashing is a tenth of a hit, and the same keys come back request after request.
LOCATION_CACHE_SIZE: Final = 4096
# Algorithms whose codec and C parameters a store remembers, cleared when full: a gateway has
# one algorithm object per configured limit, replaced only by a reload.
DECIDER_CACHE_SIZE: Final = 1024
# Keys whose C arguments `hit_fields` keeps ready (as LOCATION_CACHE_SIZE), cleared when full.
PREPARED_CACHE_SIZE: Final = 4096

FREE: Final = 0
# One tag per algorithm kind: a key's records under two kinds are two records.
KIND_TAGS: Final = {
    "fixed-window": 1,
    "quota": 2,
    "sliding-window": 3,
    "token-bucket": 4,
    "leaky-bucket": 5,
    "concurrency": 6,
}

_DIGEST_SIZE = 16
_TAG_AT = 16
_EXPIRES_AT = 48
_CRC_AT = 56
_SALT_SIZE = 16

_HEADER = struct.Struct("<8sIIIIQQ16sI")
_HEADER_CRC = struct.Struct("<I")
_COUNTER = struct.Struct("<QI")  # evictions, CRC-32 of them
_COUNT = struct.Struct("<Q")
_CRC = struct.Struct("<I4x")
_EXPIRES = struct.Struct("<d")
_TWO_WORDS = struct.Struct("<QQ")
_EMPTY_RECORD = bytes(RECORD_SIZE)
# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid, padding to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")
# Set a lock, waiting for it: on an open file description (Linux 3.15+); -1 where there is none.
_SETLKW: Final[int] = getattr(fcntl, "F_OFD_SETLKW", -1)

# How a store's stripes are locked (in its header): fcntl byte-range locks on the file, or
# robust process-shared mutexes in the counter lines (with the compiled primitives).
LOCKS_FCNTL: Final = 1
LOCKS_MUTEX: Final = 2
# A stripe's mutex in its counter line, after the eviction counter.
_MUTEX_AT: Final = 16
# What this process uses: no locks at all (locking=False), or the store's kind.
_UNLOCKED: Final = 0
if _C is not None and _C.mutex_size() > COUNTER_SIZE - _MUTEX_AT:  # pragma: no cover
    _C = None  # a libc whose mutex does not fit the line: fcntl locks then

_UNSUPPORTED = (
    "the shared-memory store keeps fixed-size states, and {kind!r} keeps a variable-size one "
    "(up to `limit` timestamps per key); use 'sliding-window', close to exact at a fixed size"
)


class SharedMemoryError(TollgateError):
    """A store file that cannot be used: not a store, another format version, truncated."""


# -- records -----------------------------------------------------------------------------------


class _Codec:
    """How one kind's state sits in a record's three fields."""

    __slots__ = ("body", "fields", "layout", "record", "state", "tag")

    def __init__(
        self,
        kind: str,
        layout: bytes,
        fields: Callable[[Any], tuple[Any, ...]],
        state: Callable[[tuple[Any, ...]], Any],
    ) -> None:
        """`layout`: each field's code, `d` float64, `q` int64 or `x` unused."""
        self.tag = KIND_TAGS[kind]
        self.layout = layout
        codes = "".join("8x" if code == "x" else code for code in layout.decode())
        self.body = struct.Struct(f"<16sB7x{codes}d")  # bytes 0-55 of a record
        self.record = struct.Struct(f"<16sB7x{codes}dI4x")  # all 64, the CRC-32 last
        assert self.body.size == _CRC_AT and self.record.size == RECORD_SIZE
        self.fields = fields  # state -> the used fields, in order
        self.state = state  # the used fields -> state


def _window_codec(kind: str) -> _Codec:
    return _Codec(kind, b"dqx", lambda s: (s.start, s.spent), lambda f: WindowCount(f[0], f[1]))


_CODECS: Final = {
    "fixed-window": _window_codec("fixed-window"),
    "quota": _window_codec("quota"),
    "sliding-window": _Codec(
        "sliding-window",
        b"dqq",
        lambda s: (s.start, s.previous, s.current),
        lambda f: SlidingCounterState(f[0], f[1], f[2]),
    ),
    "token-bucket": _Codec(
        "token-bucket",
        b"ddx",
        lambda s: (s.tokens, s.updated_at),
        lambda f: BucketState(f[0], f[1]),
    ),
    "leaky-bucket": _Codec(
        "leaky-bucket",
        b"ddx",
        lambda s: (s.queued, s.updated_at),
        lambda f: QueueState(f[0], f[1]),
    ),
    "concurrency": _Codec("concurrency", b"qxx", lambda s: (s,), lambda f: f[0]),
}


# Giving back what is in flight is the same arithmetic whatever the limit: one instance does it
# for every key, so that `release` needs only the key, as the `Store` protocol has it.
_RELEASER: Final = Concurrency(1)


def _codec_for(algorithm: RateAlgorithm[Any]) -> _Codec:
    codec = _CODECS.get(algorithm.kind)
    if codec is None:
        if algorithm.kind == "sliding-window-log":
            raise ValueError(_UNSUPPORTED.format(kind=algorithm.kind))
        raise ValueError(f"the shared-memory store has no record layout for {algorithm!r}")
    return codec


def _pack(compiled: Any, codec: _Codec, digest: bytes, state: Any, expires: float) -> bytes:
    if compiled is not None:
        record: bytes = compiled.encode(
            digest, codec.tag, codec.layout, codec.fields(state), expires
        )
        return record
    body = codec.body.pack(digest, codec.tag, *codec.fields(state), expires)
    return body + _CRC.pack(zlib.crc32(body))


# Parameters of a limit that `_shmtable.hit` decides: its kind's tag, an integer and two
# floats (the C's `Params`; see `_c_params`).
_C_PARAMS = struct.Struct("<qqdd")
# Where a key's record is, for `_shmtable.hit` (after the key's 16-byte digest): the stripe's
# first byte, the home slot's, the stripe's counter line (its mutex at `_MUTEX_AT` in it), the
# slots per stripe, and whether to lock that mutex. Packed once per key, so that a request
# passes one bytes object rather than boxing five integers.
_C_WHERE = struct.Struct("<qqqqq")
# The C keeps integers (limits, costs, counts) within this, where they are exact as doubles and
# their sums and differences exact in int64: its arithmetic is then Python's.
_C_EXACT_INTEGER: Final = 1 << 50


def _c_params(algorithm: RateAlgorithm[Any]) -> bytes | None:
    """`algorithm`'s parameters packed for `_shmtable.hit`, or None if it decides in Python.

    The C reproduces these exact classes (a subclass may decide otherwise); a quota's periods
    need time zones, and a limit past 2**50 leaves the range where the C's integers are
    Python's. The floats are the algorithm's own attributes, not recomputed.
    """
    if type(algorithm) is FixedWindow or type(algorithm) is SlidingWindowCounter:
        limit, first, second = algorithm.limit, algorithm.window, 0.0
    elif type(algorithm) is TokenBucket:
        limit, first, second = algorithm.burst, algorithm.rate, algorithm._capacity
    elif type(algorithm) is LeakyBucket:
        limit, first, second = algorithm.capacity, algorithm.rate, algorithm._room
    elif type(algorithm) is Concurrency:
        limit, first, second = algorithm.limit, algorithm.retry_after, 0.0
    else:
        return None
    if not 1 <= limit <= _C_EXACT_INTEGER:
        return None
    return _C_PARAMS.pack(KIND_TAGS[algorithm.kind], limit, first, second)


# -- file layout -------------------------------------------------------------------------------


class _Layout(NamedTuple):
    stripes: int
    stripe_slots: int
    records_at: int
    file_size: int

    @classmethod
    def for_capacity(cls, capacity: int) -> _Layout:
        stripe_slots = min(STRIPE_SLOTS, capacity)
        return cls.for_stripes(-(-capacity // stripe_slots), stripe_slots)

    @classmethod
    def for_stripes(cls, stripes: int, stripe_slots: int) -> _Layout:
        counters_end = HEADER_SIZE + stripes * COUNTER_SIZE
        records_at = -(-counters_end // PAGE_SIZE) * PAGE_SIZE
        return cls(
            stripes, stripe_slots, records_at, records_at + stripes * stripe_slots * RECORD_SIZE
        )

    @property
    def capacity(self) -> int:
        return self.stripes * self.stripe_slots

    def header(self, salt: bytes, locks: int) -> bytes:
        fixed = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            RECORD_SIZE,
            self.stripes,
            self.stripe_slots,
            self.records_at,
            self.file_size,
            salt,
            locks,
        )
        return fixed + _HEADER_CRC.pack(zlib.crc32(fixed))


def _read_header(path: Path, fd: int) -> tuple[_Layout, bytes, int]:
    """The layout, salt and lock kind a store file's header describes, checked."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, _HEADER.size + _HEADER_CRC.size, 0)
    if len(raw) < _HEADER.size + _HEADER_CRC.size or not raw.startswith(MAGIC):
        raise SharedMemoryError(f"{path} is not a Tollgate shared-memory store")
    fixed = raw[: _HEADER.size]
    (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if zlib.crc32(fixed) != crc:
        raise SharedMemoryError(f"{path}: the store's header is damaged; create the store again")
    _, version, record_size, stripes, stripe_slots, records_at, file_size, salt, locks = (
        _HEADER.unpack(fixed)
    )
    if version != FORMAT_VERSION or record_size != RECORD_SIZE:
        raise SharedMemoryError(
            f"{path} is a store of format version {version} ({record_size}-byte records); "
            f"this Tollgate reads version {FORMAT_VERSION}: create the store again"
        )
    layout = _Layout.for_stripes(stripes, stripe_slots)
    if (
        not (0 < stripe_slots <= STRIPE_SLOTS)
        or layout[2:] != (records_at, file_size)
        or locks not in (LOCKS_FCNTL, LOCKS_MUTEX)
    ):
        raise SharedMemoryError(f"{path}: the store's header describes an impossible layout")
    if size != file_size:
        raise SharedMemoryError(
            f"{path} is {size} bytes long but its header says {file_size}: "
            "it was truncated or extended; create the store again"
        )
    return layout, salt, locks


# -- the store ---------------------------------------------------------------------------------


def _check_locking(locking: bool) -> None:
    if locking and _SETLKW == -1:  # pragma: no cover - not Linux
        raise SharedMemoryError(
            "the shared-memory store's locks need open file description locks (Linux 3.15 "
            "and later); on this system run one worker process, with locking=False"
        )


_process_generation = 0


def _after_fork_in_child() -> None:
    global _process_generation
    _process_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

# Where a key lives: its digest, its stripe, the stripe's first byte and its home slot's, the
# fcntl requests that lock and unlock the stripe, its mutex's offset, and all of that which
# `_shmtable.hit` needs, packed (`_C_WHERE`; built once).
_Place = tuple[bytes, int, int, int, bytes, bytes, int, bytes]


def _lock_request(mode: int, stripe: int) -> bytes:
    """The `struct flock` that sets `mode` (F_WRLCK, F_RDLCK, F_UNLCK) on byte `stripe`."""
    return _FLOCK.pack(mode, os.SEEK_SET, stripe, 1, 0)


class SharedMemoryStore:
    """Rate-limit states of one node, shared by its worker processes through a mapped file.

    `create` (once per node, before workers start) makes the file; each worker `open`s it.
    `hit` decides all the limits of one request at once; every method takes the wall time
    `now` from the caller. `locking=False` skips the stripe locks: for a node with one worker
    process only, where nothing else can touch the table.

    The locks belong to the store's open file, so one store object serves one thread (a
    worker's event loop); a thread of its own would need a store of its own.
    """

    __slots__ = (
        "_c",
        "_c_hit",
        "_deciders",
        "_fd",
        "_layout",
        "_locations",
        "_lock_mode",
        "_map",
        "_owner",
        "_path",
        "_prepared",
        "_records_at",
        "_salt",
        "_slots",
        "_stripe_bytes",
        "_stripes",
        "_view",
    )

    def __init__(
        self, path: Path, fd: int, mapped: mmap.mmap, layout: _Layout, salt: bytes, lock_mode: int
    ) -> None:
        """Use `create` or `open`."""
        self._path = path
        self._fd = fd
        self._map = mapped
        self._view = memoryview(mapped)
        self._layout = layout
        self._salt = salt
        self._lock_mode = lock_mode
        # The compiled primitives, if this process has them (fixed when the store is opened).
        self._c: Any = _C
        # `_shmtable.hit`, looked up once (a module attribute is a dict lookup per call).
        self._c_hit: Any = None if _C is None else _C.hit
        # Each algorithm's codec and `_shmtable.hit` parameters (None: decided in Python),
        # keyed by the algorithm object: a limit's parameters never change once it is built
        # (a reload builds new ones).
        self._deciders: dict[RateAlgorithm[Any], tuple[_Codec, bytes | None]] = {}
        self._stripes = layout.stripes
        self._slots = layout.stripe_slots
        self._stripe_bytes = layout.stripe_slots * RECORD_SIZE
        self._records_at = layout.records_at
        self._locations: dict[str, _Place] = {}
        # key -> (algorithm, packed place, C parameters): `hit_fields`' one lookup per request.
        self._prepared: dict[str, tuple[RateAlgorithm[Any], bytes, bytes]] = {}
        # The process generation this store may be used in; -1 once closed.
        self._owner = _process_generation

    # -- lifecycle

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], capacity: object, *, locking: bool = True
    ) -> Self:
        """Make a new, empty store of at least `capacity` records at `path`, and open it.

        An existing file at `path` is replaced (processes that have it open keep the old one).
        Capacity is rounded up to whole stripes; the file takes 64 bytes per record plus about
        a byte per record of header and counters.
        """
        # `object`, checked here: a compiled signature would refuse a wrong type less clearly.
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise ValueError(f"capacity is a number of records, not {capacity!r}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(
                f"capacity must be from 1 to {MAX_CAPACITY:,} records "
                f"({MAX_CAPACITY * RECORD_SIZE >> 30} GiB), not {capacity:,}"
            )
        path = Path(path)
        layout = _Layout.for_capacity(capacity)
        locks = LOCKS_MUTEX if _C is not None else LOCKS_FCNTL
        if locks == LOCKS_FCNTL:
            _check_locking(locking)
        # Built aside and renamed into place, so that no worker ever maps a half-made file.
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        try:
            os.ftruncate(fd, layout.file_size)
            os.pwrite(fd, layout.header(os.urandom(_SALT_SIZE), locks), 0)
            if locks == LOCKS_MUTEX:
                with mmap.mmap(fd, layout.file_size) as mapped:
                    _C.init_locks(mapped, HEADER_SIZE + _MUTEX_AT, COUNTER_SIZE, layout.stripes)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        finally:
            os.close(fd)
        return cls.open(path, locking=locking)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, locking: bool = True) -> Self:
        """Open the store a supervisor created at `path` (in each worker process)."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        try:
            layout, salt, locks = _read_header(path, fd)
            if locking and locks == LOCKS_MUTEX and _C is None:
                raise SharedMemoryError(
                    f"{path} is locked with process-shared mutexes, which need Tollgate's "
                    "compiled extension; this installation runs without it"
                )
            if locking and locks == LOCKS_FCNTL:
                _check_locking(locking)
            mapped = mmap.mmap(fd, layout.file_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapped, layout, salt, locks if locking else _UNLOCKED)

    def close(self) -> None:
        """Unmap the file and drop its locks. The file stays for the other processes."""
        if self._owner == -1:
            return
        self._owner = -1
        self._view.release()
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- limits

    @staticmethod
    def check_algorithm(algorithm: RateAlgorithm[Any]) -> None:
        """Raise `ValueError` if this store cannot hold `algorithm`'s state (call it at setup)."""
        _codec_for(algorithm)

    def hit(
        self, limits: Sequence[tuple[str, RateAlgorithm[Any]]], now: float, cost: int = 1
    ) -> CombinedDecision:
        """Decide on a request of `cost` against every (key, algorithm) in `limits`, atomically.

        As `decide_all`: admitted only if every limit admits it, and then every limit counts
        it; if any rejects it, none does. Each key may appear once per algorithm kind.

        `states` holds the new states (the old ones if rejected), as `decide_all` has them,
        except for a single limit decided in C (see `_hit_one_compiled`): there it is empty,
        the states staying in the table (as the Redis store's stay in Redis). Nothing on the
        request path reads them; `peek` tells what a key's state says.
        """
        if len(limits) == 1:
            key, algorithm = limits[0]
            # With fcntl locks (a file made without the compiled primitives), the Python path
            # below takes them.
            if self._c is not None and self._lock_mode != LOCKS_FCNTL:
                return self._hit_one_compiled(key, algorithm, now, cost)
            return self._hit_one(key, algorithm, now, cost)
        return self._hit_many(limits, now, cost)

    def _hit_one(
        self, key: str, algorithm: RateAlgorithm[Any], now: float, cost: int
    ) -> CombinedDecision:
        codec = _codec_for(algorithm)
        if self._owner != _process_generation:
            self._refuse()
        place = self._locations.get(key) or self._place(key)
        digest, stripe, base, home, _, _, _, _ = place
        self._take(place)
        try:
            at, fields = self._find(digest, codec, base, home)
            state = None if fields is None else codec.state(fields)
            decision, new_state = algorithm.decide(state, now, cost)
            if not decision.allowed:
                return CombinedDecision(decision, 0, (state,))
            if new_state is not state:
                if at < 0:
                    at = self._free_slot(stripe, base, home, now, ())
                self._write(at, codec, digest, new_state, algorithm.expires_at(new_state))
            return CombinedDecision(decision, 0, (new_state,))
        finally:
            self._drop(place)

    def _hit_one_compiled(
        self, key: str, algorithm: RateAlgorithm[Any], now: float, cost: int
    ) -> CombinedDecision:
        """`_hit_one` with the compiled primitives (mutex locks, or none): one call of
        `_shmtable.hit` for the kinds it decides, else `_hit_one_split`.

        The C call locks, finds, decides, writes and unlocks; what comes back is the decision's
        fields, and the one `Decision` and `CombinedDecision` built here are all the objects
        a request makes. It hands a request back (None) when it cannot decide it exactly as
        the algorithm would: a time or cost of another type or out of its range, a state no
        algorithm writes.
        """
        decider = self._deciders.get(algorithm)
        if decider is None:
            decider = self._decider(algorithm)
        if self._owner != _process_generation:
            self._refuse()
        place = self._locations.get(key) or self._place(key)
        params = decider[1]
        if params is not None:
            decided = self._c_hit(self._map, place[7], params, now, cost)
            if decided is not None:
                return CombinedDecision(Decision(*decided), 0, ())
        return self._hit_one_split(self._c, place, decider[0], algorithm, now, cost)

    def hit_fields(
        self,
        key: str,
        algorithm: RateAlgorithm[Any],
        now: float,
        cost: int,
        pieces: tuple[bytes, ...],
    ) -> bytes | tuple[Any, ...] | None:
        """One limit's request in one C call, for the request path (`RequestLimiter`).

        Admitted at once: the response's rate-limit header lines, rendered from `pieces`
        (`headers.fields_pieces`). Refused, or admitted after a wait: the decision's fields,
        as `Decision(*fields)` takes them (an admitted request is counted either way). None,
        having counted nothing: this request is not one the C decides (see `_hit_one_compiled`);
        `hit` then decides it.
        """
        if self._owner != _process_generation:
            self._refuse()
        prepared = self._prepared.get(key)
        if prepared is None or prepared[0] is not algorithm:
            prepared = self._prepare(key, algorithm)
            if prepared is None:
                return None
        result: bytes | tuple[Any, ...] | None = self._c_hit(
            self._map, prepared[1], prepared[2], now, cost, pieces
        )
        return result

    def _prepare(
        self, key: str, algorithm: RateAlgorithm[Any]
    ) -> tuple[RateAlgorithm[Any], bytes, bytes] | None:
        """`hit_fields`' arguments to the C for `key` under `algorithm`, kept for its next
        request; None if the C does not decide this algorithm (or is not in use)."""
        if self._c_hit is None or self._lock_mode == LOCKS_FCNTL:
            return None
        decider = self._deciders.get(algorithm)
        if decider is None:
            decider = self._decider(algorithm)
        params = decider[1]
        if params is None:
            return None
        place = self._locations.get(key) or self._place(key)
        prepared = (algorithm, place[7], params)
        if len(self._prepared) >= PREPARED_CACHE_SIZE:
            self._prepared.clear()
        self._prepared[key] = prepared
        return prepared

    def _decider(self, algorithm: RateAlgorithm[Any]) -> tuple[_Codec, bytes | None]:
        """`algorithm`'s codec and C parameters, worked out on its first request only."""
        decider = (_codec_for(algorithm), _c_params(algorithm))
        if len(self._deciders) >= DECIDER_CACHE_SIZE:
            self._deciders.clear()
        self._deciders[algorithm] = decider
        return decider

    def _hit_one_split(
        self,
        compiled: Any,
        place: _Place,
        codec: _Codec,
        algorithm: RateAlgorithm[Any],
        now: float,
        cost: int,
    ) -> CombinedDecision:
        """`_hit_one` in two calls of the compiled primitives: lock and read, write and unlock;
        the algorithm decides in between (a quota, or a request the C handed back)."""
        digest, stripe, base, home, _, _, lock_at, _ = place
        if self._lock_mode != LOCKS_MUTEX:
            lock_at = -1
        mapped = self._map
        at, fields = compiled.find(
            mapped, lock_at, digest, codec.tag, base, home, self._slots, codec.layout
        )
        try:
            state = None if fields is None else codec.state(fields)
            decision, new_state = algorithm.decide(state, now, cost)
            if not decision.allowed or new_state is state:
                if lock_at >= 0:
                    compiled.unlock(mapped, lock_at)
                return CombinedDecision(decision, 0, (new_state,))
            if at < 0:
                at = self._free_slot(stripe, base, home, now, ())
            expires = algorithm.expires_at(new_state)
            fields = codec.fields(new_state)
        except BaseException:
            if lock_at >= 0:
                compiled.unlock(mapped, lock_at)
            raise
        # Unlocks, whether the write succeeds or not; a state that does not fit writes nothing.
        compiled.save(mapped, at, digest, codec.tag, codec.layout, fields, expires, lock_at)
        return CombinedDecision(decision, 0, (new_state,))

    def _hit_many(
        self, limits: Sequence[tuple[str, RateAlgorithm[Any]]], now: float, cost: int
    ) -> CombinedDecision:
        if not limits:
            raise ValueError("a hit needs at least one limit")
        if self._owner != _process_generation:
            self._refuse()
        # Plain loops, not comprehensions: each of those is a call of its own on the hot path.
        locations = self._locations
        codecs: list[_Codec] = []
        places: list[_Place] = []
        identities = set()
        for key, algorithm in limits:
            codec = _codec_for(algorithm)
            codecs.append(codec)
            places.append(locations.get(key) or self._place(key))
            identities.add((key, codec.tag))
        if len(identities) < len(limits):
            raise ValueError("a key appears twice with one algorithm kind in one hit")
        # One place per stripe, in ascending stripe order: no two requests deadlock.
        stripes: dict[int, _Place] = {}
        for place in places:
            stripes.setdefault(place[1], place)
        locked = [stripes[stripe] for stripe in sorted(stripes)]
        taken = 0
        try:
            for place in locked:
                self._take(place)
                taken += 1
            found: list[int] = []
            pairs: list[tuple[RateAlgorithm[Any], Any]] = []
            for index, (_, algorithm) in enumerate(limits):
                codec = codecs[index]
                digest, _, base, home, _, _, _, _ = places[index]
                at, fields = self._find(digest, codec, base, home)
                found.append(at)
                pairs.append((algorithm, None if fields is None else codec.state(fields)))
            combined = decide_all(pairs, now, cost)
            if combined.decision.allowed:
                self._store_all(codecs, places, found, pairs, combined.states, now)
            return combined
        finally:
            for place in locked[:taken]:
                self._drop(place)

    def _store_all(
        self,
        codecs: list[_Codec],
        places: list[_Place],
        found: list[int],
        pairs: list[tuple[RateAlgorithm[Any], Any]],
        new_states: tuple[Any, ...],
        now: float,
    ) -> None:
        # Packed first, so that a state that cannot be packed fails before anything is written.
        writes = []
        for index, new_state in enumerate(new_states):
            algorithm, state = pairs[index]
            if new_state is not state:
                codec = codecs[index]
                expires = algorithm.expires_at(new_state)
                writes.append((index, _pack(self._c, codec, places[index][0], new_state, expires)))
        # A new record must not take a slot this request reads or writes.
        held = {at for at in found if at >= 0}
        mapped = self._map
        for index, packed in writes:
            at = found[index]
            if at < 0:
                _, stripe, base, home, _, _, _, _ = places[index]
                at = self._free_slot(stripe, base, home, now, held)
                if at < 0:
                    continue  # a stripe smaller than the request's limits: as if evicted
                held.add(at)
            mapped[at : at + RECORD_SIZE] = packed

    def peek(self, key: str, algorithm: RateAlgorithm[Any], now: float) -> Decision:
        """What a request of cost 1 for `key` would be told at `now`; nothing is counted."""
        codec = _codec_for(algorithm)
        if self._owner != _process_generation:
            self._refuse()
        place = self._locations.get(key) or self._place(key)
        digest, _, base, home, _, _, _, _ = place
        self._take(place, shared=True)
        try:
            _, fields = self._find(digest, codec, base, home)
        finally:
            self._drop(place)
        state = None if fields is None else codec.state(fields)
        return algorithm.decide(state, now, 1)[0]

    def release(self, key: str, cost: int = 1) -> None:
        """A request of `cost` that the concurrency limit under `key` admitted has ended."""
        if self._owner != _process_generation:
            self._refuse()
        place = self._locations.get(key) or self._place(key)
        digest, _, base, home, _, _, _, _ = place
        codec = _CODECS["concurrency"]
        self._take(place)
        try:
            at, fields = self._find(digest, codec, base, home)
            if fields is None:
                return  # evicted, reset or torn meanwhile: nothing is counted to give back
            left = _RELEASER.release(codec.state(fields), cost)
            if left is None:
                self._map[at : at + RECORD_SIZE] = _EMPTY_RECORD
            else:
                self._write(at, codec, digest, left, _RELEASER.expires_at(left))
        finally:
            self._drop(place)

    def reset(self, key: str) -> None:
        """Forget `key`'s state under every algorithm: its next request starts afresh."""
        if self._owner != _process_generation:
            self._refuse()
        place = self._locations.get(key) or self._place(key)
        digest, _, base, _, _, _, _, _ = place
        end = base + self._stripe_bytes
        mapped = self._map
        self._take(place)
        try:
            at = mapped.find(digest, base, end)
            while at >= 0:
                if not (at - base) % RECORD_SIZE:
                    mapped[at : at + RECORD_SIZE] = _EMPTY_RECORD
                at = mapped.find(digest, at + 1, end)
        finally:
            self._drop(place)

    # -- the table

    def _place(self, key: str) -> _Place:
        """Where `key` lives, remembered for its next requests."""
        digest = hashlib.blake2b(key.encode(), digest_size=_DIGEST_SIZE, key=self._salt).digest()
        high, low = _TWO_WORDS.unpack(digest)
        stripe = high % self._stripes
        base = self._records_at + stripe * self._stripe_bytes
        home = base + low % self._slots * RECORD_SIZE
        line = HEADER_SIZE + stripe * COUNTER_SIZE
        locked = self._lock_mode == LOCKS_MUTEX
        place = (
            digest,
            stripe,
            base,
            home,
            _lock_request(fcntl.F_WRLCK, stripe),
            _lock_request(fcntl.F_UNLCK, stripe),
            line + _MUTEX_AT,
            digest + _C_WHERE.pack(base, home, line, self._slots, locked),
        )
        if len(self._locations) >= LOCATION_CACHE_SIZE:
            self._locations.clear()
        self._locations[key] = place
        return place

    def _take(self, place: _Place, shared: bool = False) -> None:
        """Lock the stripe of `place` (`shared`: to read only, where the locks have modes)."""
        mode = self._lock_mode
        if mode == LOCKS_MUTEX:
            self._c.lock(self._map, place[6])  # a holder that died: its records' CRCs tell
        elif mode == LOCKS_FCNTL:
            request = _lock_request(fcntl.F_RDLCK, place[1]) if shared else place[4]
            fcntl.fcntl(self._fd, _SETLKW, request)

    def _drop(self, place: _Place) -> None:
        mode = self._lock_mode
        if mode == LOCKS_MUTEX:
            self._c.unlock(self._map, place[6])
        elif mode == LOCKS_FCNTL:
            fcntl.fcntl(self._fd, _SETLKW, place[5])

    def _write(self, at: int, codec: _Codec, digest: bytes, state: Any, expires: float) -> None:
        self._map[at : at + RECORD_SIZE] = _pack(self._c, codec, digest, state, expires)

    def _find(
        self, digest: bytes, codec: _Codec, base: int, home: int
    ) -> tuple[int, tuple[Any, ...] | None]:
        """The intact record of `digest` under `codec`'s tag in a stripe, where it is, and its
        used fields.

        Linear probing from the home slot to the stripe's end, then from its start (in C
        where compiled, else with `mmap.find`). Lookups never stop at a free slot, so freeing
        a record (or finding one torn) never hides the records placed after it.
        """
        if self._c is not None:
            found: tuple[int, tuple[Any, ...] | None] = self._c.find(
                self._map, -1, digest, codec.tag, base, home, self._slots, codec.layout
            )
            return found
        mapped = self._map
        end = base + self._stripe_bytes
        tag = codec.tag
        start, stop = home, end
        while True:
            at = mapped.find(digest, start, stop)
            if at < 0:
                if stop != end or home == base:
                    return -1, None
                start, stop = base, home  # wrap around to the stripe's start
                continue
            if not (at - base) % RECORD_SIZE and mapped[at + _TAG_AT] == tag:
                record = codec.record.unpack_from(mapped, at)
                if zlib.crc32(self._view[at : at + _CRC_AT]) == record[-1]:
                    return at, record[2:-2]
            start = at + 1  # the digest's bytes elsewhere, another kind, or a torn record

    def _free_slot(
        self, stripe: int, base: int, home: int, now: float, held: Container[int]
    ) -> int:
        """A slot for a new record: free, else torn, else expired, else the first to expire.

        -1 if every slot is `held` by the request being stored.
        """
        mapped = self._map
        tags = mapped[base + _TAG_AT : base + self._stripe_bytes : RECORD_SIZE]
        first = (home - base) // RECORD_SIZE
        slot = tags.find(FREE, first)
        if slot < 0:
            slot = tags.find(FREE, 0, first)
        if slot >= 0:
            return base + slot * RECORD_SIZE
        view = self._view
        slots = self._slots
        victim = -1
        earliest = math.inf
        for index in range(first, first + slots):
            at = base + index % slots * RECORD_SIZE
            if at in held:
                continue
            if zlib.crc32(view[at : at + _CRC_AT]) != _CRC.unpack_from(mapped, at + _CRC_AT)[0]:
                return at
            (expires,) = _EXPIRES.unpack_from(mapped, at + _EXPIRES_AT)
            if expires <= now:
                return at
            if victim < 0 or expires < earliest:
                victim = at
                earliest = expires
        if victim >= 0:
            self._count_eviction(stripe)
        return victim

    def _count_eviction(self, stripe: int) -> None:
        at = HEADER_SIZE + stripe * COUNTER_SIZE
        count = self._read_count(at) + 1
        self._map[at : at + _COUNTER.size] = _COUNTER.pack(count, zlib.crc32(_COUNT.pack(count)))

    def _read_count(self, at: int) -> int:
        count, crc = _COUNTER.unpack_from(self._map, at)
        return int(count) if zlib.crc32(_COUNT.pack(count)) == crc else 0

    def _refuse(self) -> None:
        if self._owner == -1:
            raise SharedMemoryError(f"the shared-memory store {self._path} is closed")
        raise SharedMemoryError(
            f"the shared-memory store {self._path} was opened before a fork; "
            "open it again in the child process (a child shares its parent's locks)"
        )

    # -- statistics

    @property
    def path(self) -> Path:
        return self._path

    @property
    def locks(self) -> str:
        """How this process locks the stripes: `mutex`, `fcntl` or `none`."""
        return {LOCKS_MUTEX: "mutex", LOCKS_FCNTL: "fcntl"}.get(self._lock_mode, "none")

    @property
    def capacity(self) -> int:
        """Records the table holds: the capacity asked for, rounded up to whole stripes."""
        return self._layout.capacity

    def used(self) -> int:
        """Slots holding a record, expired or not (an expired one is reused when needed)."""
        if self._owner == -1:
            self._refuse()
        tags = self._map[self._records_at + _TAG_AT :: RECORD_SIZE]
        return len(tags) - tags.count(FREE)

    def evictions(self) -> int:
        """Records evicted from full stripes since the store was created, by every process."""
        if self._owner == -1:
            self._refuse()
        return sum(
            self._read_count(HEADER_SIZE + stripe * COUNTER_SIZE) for stripe in range(self._stripes)
        )

    def __repr__(self) -> str:
        if self._owner == -1:
            return f"SharedMemoryStore({str(self._path)!r}, closed)"
        return (
            f"SharedMemoryStore({str(self._path)!r}, capacity={self.capacity}, "
            f"used={self.used()}, evictions={self.evictions()}, locks={self.locks!r})"
        )
