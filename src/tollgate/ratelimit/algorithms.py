"""Rate-limit algorithms: a key's state and the time in, a decision and the next state out.

Pure: no I/O, no tasks, no clock reads. Every algorithm has

- ``decide(state, now, cost) -> (Decision, new_state)``: `state` is the key's state as last
  stored, `None` for a key with no state; `now` is wall-clock seconds (windows align to it, and
  wall time is what every worker and node agrees on); `cost` is the request's weight, an integer
  of at least 1. A rejected request returns the very state it was given (nothing to store);
- ``expires_at(state)``: the wall time from which `state` counts for nothing, so a store may
  drop the key (a dict sweep here; a Redis TTL later).

States are small immutable values (slotted value classes, an int) so that a store can hold them
and check-and-store atomically: a dict per worker, shared memory, a Redis script. The hot path
builds no lists: one decision, one state and the tuple holding both per call (the sliding log
copies its log on admission; it is the exact, memory-hungry choice).

`LocalLimiter` and `ConcurrencyLimiter` keep states in a dict for one worker; `decide_all`
evaluates several limits on one request. See docs/rate-limiting.md for the trade-offs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from itertools import islice
from operator import itemgetter
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar
from zoneinfo import ZoneInfo

from tollgate.clock import SYSTEM_CLOCK, Clock

ALGORITHM_KINDS = (
    "fixed-window",
    "sliding-window-log",
    "sliding-window",
    "token-bucket",
    "leaky-bucket",
    "concurrency",
    "quota",
)

QUOTA_PERIODS = ("day", "month")

# Refill arithmetic in floats leaves 2.9999999999 tokens where 3 are meant: count that as 3.
# A billionth of a token admits nothing a client could notice.
TOKEN_EPSILON = 1e-9

# When a concurrency slot frees depends on other requests finishing, which nobody can know:
# clients are told to come back after this long.
DEFAULT_CONCURRENCY_RETRY_AFTER = 1.0

# Keys one LocalLimiter holds before it evicts: about 13 MB per limit and worker for the
# window and bucket states, plus the keys' strings (a sliding log holds up to `limit` entries
# per key on top).
DEFAULT_MAX_KEYS = 100_000

_COST_ERROR = "a request's cost is an integer of at least 1, not {!r}"

StateT = TypeVar("StateT")


class _Value:
    """Base of the small values below: immutable by convention, compared by their fields.

    Plain classes with slots rather than named tuples: compiled, building one is a few tens of
    nanoseconds where a named tuple's `__new__` costs half a microsecond, and the hot path
    builds a decision and a state per limit per request. Fields are `Final`: the type checker
    refuses an assignment, and the compiled classes have no setter.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[Any, ...]:
        """The fields' values, in order."""
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, _Value)
            and (self.values() == other.values())
        )

    def __hash__(self) -> int:
        return hash(self.values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class Decision(_Value):
    """What one limit says about one request."""

    __slots__ = ("allowed", "delay", "limit", "remaining", "reset_after", "retry_after")
    _fields = ("allowed", "limit", "remaining", "reset_after", "retry_after", "delay")

    def __init__(
        self,
        allowed: bool,
        limit: int,
        remaining: int,
        reset_after: float,
        retry_after: float,
        delay: float = 0.0,
    ) -> None:
        self.allowed: Final = allowed
        # The most cost one key can spend at once: the window's limit, the bucket's burst.
        self.limit: Final = limit
        # Cost still available right after this request (if admitted; as it is now, if not).
        self.remaining: Final = remaining
        # Seconds until the limit is fully available again, nothing counted against the key.
        self.reset_after: Final = reset_after
        # 0 if allowed. Otherwise seconds until a request of the same cost is admitted, if
        # nothing else is spent meanwhile: `decide` at `now + retry_after` admits it, and never
        # earlier. `math.inf` when the cost is more than the limit can ever admit.
        self.retry_after: Final = retry_after
        # Seconds the request must wait before going upstream (the leaky bucket shapes traffic).
        self.delay: Final = delay

    def replace(self, *, retry_after: float | None = None, delay: float | None = None) -> Decision:
        """This decision with another `retry_after` or `delay`."""
        return Decision(
            self.allowed,
            self.limit,
            self.remaining,
            self.reset_after,
            self.retry_after if retry_after is None else retry_after,
            self.delay if delay is None else delay,
        )


class RateAlgorithm(Protocol[StateT]):
    """What every algorithm offers to limiters and stores."""

    kind: ClassVar[str]  # its name in config, one of ALGORITHM_KINDS

    def decide(
        self, state: StateT | None, now: float, cost: int = 1
    ) -> tuple[Decision, StateT | None]:
        """The decision on a request of `cost` at wall time `now`, and the key's next state."""
        ...

    def expires_at(self, state: StateT) -> float:
        """The wall time from which `state` counts for nothing (the key may be forgotten)."""
        ...


# -- shared arithmetic ---------------------------------------------------------------------


def _seconds_until(now: float, moment: float) -> float:
    """`moment - now`, rounded up so that `now + result >= moment` holds in floats as well."""
    wait = moment - now
    while now + wait < moment:
        wait = math.nextafter(wait, math.inf)
    return wait


def _retry_after(now: float, moment: float, admits: Callable[[float], bool]) -> float:
    """Seconds from `now` until the first instant, from `moment` on, at which `admits` holds.

    `moment` comes from a closed form; rounding can put it a few units in the last place before
    the instant at which the algorithm's own arithmetic admits. Stepping forward (by doubling
    steps) until it does means a client that waits `retry_after` is never turned away.
    """
    moment = max(moment, now)
    step = 0.0
    while not admits(moment):
        step = max(2.0 * step, math.ulp(moment))
        moment += step
        if math.isinf(moment):
            return math.inf
    return _seconds_until(now, moment)


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, not {value!r}")


def _check_limit(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, not {value!r}")


# -- fixed windows and calendar quotas ----------------------------------------------------


class WindowCount(_Value):
    """Cost counted in the window (or quota period) that began at wall time `start`."""

    __slots__ = ("spent", "start")
    _fields = ("start", "spent")

    def __init__(self, start: float, spent: int) -> None:
        self.start: Final = start
        self.spent: Final = spent


class _PeriodCounter(ABC):
    """Counts cost per period and admits while it stays within `limit`.

    Subclasses say where periods begin and end. If the wall clock steps back into an earlier
    period, the later period keeps counting: a clock step never hands out a fresh allowance.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        _check_limit("limit", limit)
        self.limit = limit

    @abstractmethod
    def _period_start(self, now: float) -> float:
        """Wall time at which the period holding `now` began."""

    @abstractmethod
    def _period_end(self, start: float) -> float:
        """Wall time at which the period that began at `start` ends."""

    def _is_later_period(self, now: float, start: float) -> bool:
        return self._period_start(now) > start

    def decide(
        self, state: WindowCount | None, now: float, cost: int = 1
    ) -> tuple[Decision, WindowCount | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        limit = self.limit
        start = self._period_start(now)
        if state is None or state.start < start:
            used = 0
        else:
            used = state.spent
            start = state.start
        if used + cost <= limit:
            decision = Decision(
                True, limit, limit - used - cost, self._period_end(start) - now, 0.0
            )
            return decision, WindowCount(start, used + cost)
        if cost > limit:
            retry = math.inf
        else:
            counted = start
            retry = _retry_after(
                now, self._period_end(start), lambda t: self._is_later_period(t, counted)
            )
        reset = self._period_end(start) - now if used else 0.0
        return Decision(False, limit, limit - used, reset, retry), state

    def expires_at(self, state: WindowCount) -> float:
        return self._period_end(state.start)


class FixedWindow(_PeriodCounter):
    """At most `limit` cost per window of `window` seconds, windows aligned to the Unix epoch.

    A window of 60 starts on every UTC minute, 86400 on every UTC midnight. Cheapest of all
    (one count per key), but a client may spend `limit` at the end of one window and `limit`
    again at the start of the next: up to twice the limit within `window` seconds.
    """

    kind: ClassVar[str] = "fixed-window"

    __slots__ = ("window",)

    def __init__(self, limit: int, window: float) -> None:
        super().__init__(limit)
        _check_positive("window", window)
        self.window = float(window)

    def _period_start(self, now: float) -> float:
        return now - now % self.window

    def _period_end(self, start: float) -> float:
        return start + self.window

    def __repr__(self) -> str:
        return f"FixedWindow(limit={self.limit}, window={self.window})"


class CalendarQuota(_PeriodCounter):
    """At most `limit` cost per calendar day or month in a time zone, reset at local midnight.

    Days are the zone's own: 23 or 25 hours long across a daylight-saving change. A midnight a
    change skips starts the day at the change itself.
    """

    kind: ClassVar[str] = "quota"

    __slots__ = ("_bounds", "period", "time_zone")

    def __init__(self, limit: int, period: str = "day", time_zone: str | ZoneInfo = "UTC") -> None:
        super().__init__(limit)
        if period not in QUOTA_PERIODS:
            raise ValueError(f"unknown quota period {period!r}; expected one of day, month")
        self.period = period
        self.time_zone = time_zone if isinstance(time_zone, ZoneInfo) else ZoneInfo(time_zone)
        # The last period looked up, (start, end): time-zone arithmetic once per period, not
        # once per request. A memo of a pure function; replaced whole, never edited.
        self._bounds = (0.0, 0.0)

    def _period_start(self, now: float) -> float:
        start, end = self._bounds
        if not start <= now < end:
            start, end = self._bounds = self._period_around(now)
        return start

    def _period_end(self, start: float) -> float:
        bounds = self._bounds
        return bounds[1] if bounds[0] == start else self._period_around(start)[1]

    def _is_later_period(self, now: float, start: float) -> bool:
        # Periods are contiguous: later means past the end. Looking `now` up instead would
        # evict the current period from the memo on every rejection near its end.
        return now >= self._period_end(start)

    def _period_around(self, now: float) -> tuple[float, float]:
        today = datetime.fromtimestamp(now, self.time_zone).date()
        if self.period == "day":
            first = today
            following = today + timedelta(days=1)
        else:
            first = today.replace(day=1)
            following = (first + timedelta(days=32)).replace(day=1)
        return self._midnight(first), self._midnight(following)

    def _midnight(self, day: date) -> float:
        # fold=0 (the default) reads a midnight that a change skips with the offset before the
        # change: that is the instant of the change, the day's first instant.
        return datetime(day.year, day.month, day.day, tzinfo=self.time_zone).timestamp()

    def __repr__(self) -> str:
        return (
            f"CalendarQuota(limit={self.limit}, period={self.period!r}, "
            f"time_zone={self.time_zone.key!r})"
        )


# -- sliding window log ----------------------------------------------------------------------


class SlidingLogState(_Value):
    """The admitted requests not yet known to have left the window, oldest first.

    Each entry is (wall time, running total of cost up to and including it); `total_before`
    is the running total before the first entry. The cost in any suffix of the log is then
    one subtraction, and finding how many entries must leave for a cost to fit one bisection.
    """

    __slots__ = ("entries", "total_before")
    _fields = ("total_before", "entries")

    def __init__(self, total_before: int, entries: tuple[tuple[float, int], ...]) -> None:
        self.total_before: Final = total_before
        self.entries: Final = entries


_timestamp = itemgetter(0)
_running_total = itemgetter(1)


class SlidingWindowLog:
    """Exact: at most `limit` cost within any `window` seconds.

    A request counts until `window` seconds after it was admitted. Memory and the copy on
    admission grow with the limit (up to `limit` entries per key): for limits in the
    thousands prefer the sliding-window counter.
    """

    kind: ClassVar[str] = "sliding-window-log"

    __slots__ = ("limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        _check_limit("limit", limit)
        _check_positive("window", window)
        self.limit = limit
        self.window = float(window)

    def decide(
        self, state: SlidingLogState | None, now: float, cost: int = 1
    ) -> tuple[Decision, SlidingLogState | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        limit = self.limit
        window = self.window
        if state is None:
            if cost <= limit:
                entry = ((now, cost),)
                return Decision(True, limit, limit - cost, window, 0.0), SlidingLogState(0, entry)
            return Decision(False, limit, limit, 0.0, math.inf), None
        entries = state.entries
        # Entries at or before now - window have left the window.
        first = bisect_right(entries, now - window, key=_timestamp)
        base = entries[first - 1][1] if first else state.total_before
        newest, total = entries[-1]
        used = total - base
        if used + cost <= limit:
            # A wall clock stepping back must not unsort the log: the entry joins the newest.
            stamp = now if now > newest else newest
            kept = (*entries[first:], (stamp, total + cost))
            decision = Decision(True, limit, limit - used - cost, stamp + window - now, 0.0)
            return decision, SlidingLogState(base, kept)
        if cost > limit:
            retry = math.inf
        else:
            # The oldest entries must leave until `cost` fits; this one is the last to go.
            last = bisect_left(entries, base + used + cost - limit, lo=first, key=_running_total)
            leaving = entries[last][0]
            retry = _retry_after(now, leaving + window, lambda t: leaving <= t - window)
        reset = newest + window - now if used else 0.0
        return Decision(False, limit, limit - used, reset, retry), state

    def expires_at(self, state: SlidingLogState) -> float:
        return state.entries[-1][0] + self.window

    def __repr__(self) -> str:
        return f"SlidingWindowLog(limit={self.limit}, window={self.window})"


# -- sliding window counter ----------------------------------------------------------------


class SlidingCounterState(_Value):
    """Cost counted in the window that began at `start` and in the window before it."""

    __slots__ = ("current", "previous", "start")
    _fields = ("start", "previous", "current")

    def __init__(self, start: float, previous: int, current: int) -> None:
        self.start: Final = start
        self.previous: Final = previous
        self.current: Final = current


class SlidingWindowCounter:
    """Approximate sliding window from two fixed windows (epoch-aligned, like FixedWindow).

    The previous window's count is weighted by how much of it the sliding window still covers,
    as if its requests had been spread evenly: `previous * (window - elapsed) / window +
    current`. Two counts and a time per key. Never more than `limit` per aligned window, so
    never more than twice `limit` in any `window` seconds; with real traffic it stays close to
    the exact log (Cloudflare measured 0.003% of requests misjudged).
    """

    kind: ClassVar[str] = "sliding-window"

    __slots__ = ("limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        _check_limit("limit", limit)
        _check_positive("window", window)
        self.limit = limit
        self.window = float(window)

    def _roll(self, state: SlidingCounterState | None, now: float) -> SlidingCounterState | None:
        """`state` as seen from `now`'s window; `None` when nothing in it counts any more."""
        if state is None:
            return None
        window = self.window
        start = now - now % window
        if state.start >= start:
            return state  # the same window, or a later one the wall clock stepped back from
        if start - state.start < 1.5 * window:  # the window before (whatever the rounding)
            return SlidingCounterState(start, state.current, 0) if state.current else None
        return None

    def _weighted_previous(self, state: SlidingCounterState, now: float) -> float:
        previous = state.previous
        if not previous:
            return 0.0
        elapsed = now - state.start
        if elapsed <= 0:
            return float(previous)
        return previous * (self.window - elapsed) / self.window

    def _admits(self, state: SlidingCounterState | None, now: float, cost: int) -> bool:
        rolled = self._roll(state, now)
        if rolled is None:
            return cost <= self.limit
        return self._weighted_previous(rolled, now) <= self.limit - rolled.current - cost

    def decide(
        self, state: SlidingCounterState | None, now: float, cost: int = 1
    ) -> tuple[Decision, SlidingCounterState | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        limit = self.limit
        window = self.window
        rolled = self._roll(state, now)
        if rolled is None:
            rolled = SlidingCounterState(now - now % window, 0, 0)
        start = rolled.start
        previous = rolled.previous
        current = rolled.current
        weighted = self._weighted_previous(rolled, now)
        # Compared with integers on one side, so that `remaining` is exact: after it, exactly
        # that many requests of cost 1 at the same instant are admitted.
        room = limit - current - cost
        if weighted <= room:
            decision = Decision(
                True, limit, room - math.ceil(weighted), start + 2 * window - now, 0.0
            )
            return decision, SlidingCounterState(start, previous, current + cost)
        if cost > limit:
            retry = math.inf
        else:
            if room >= 0:
                # Within this window, as the previous one's weight fades.
                moment = start + window * (1 - room / previous)
            else:
                # In the next window, as this one's count fades in turn.
                moment = start + window + window * (1 - (limit - cost) / current)
            retry = _retry_after(now, moment, lambda t: self._admits(state, t, cost))
        if current:
            faded = start + 2 * window  # when this window's count has faded in the next one
        elif previous:
            faded = start + window
        else:
            faded = now
        remaining = max(0, limit - current - math.ceil(weighted))
        return Decision(False, limit, remaining, faded - now, retry), state

    def expires_at(self, state: SlidingCounterState) -> float:
        return state.start + 2 * self.window

    def __repr__(self) -> str:
        return f"SlidingWindowCounter(limit={self.limit}, window={self.window})"


# -- token bucket ----------------------------------------------------------------------------


class BucketState(_Value):
    """`tokens` in the bucket at wall time `updated_at` (it refills continuously from there)."""

    __slots__ = ("tokens", "updated_at")
    _fields = ("tokens", "updated_at")

    def __init__(self, tokens: float, updated_at: float) -> None:
        self.tokens: Final = tokens
        self.updated_at: Final = updated_at


class TokenBucket:
    """Bursts up to `burst`, `rate` tokens a second on average; a request spends `cost` tokens.

    The bucket refills continuously, so in any `t` seconds at most `burst + rate * t` cost is
    admitted. Two floats per key.
    """

    kind: ClassVar[str] = "token-bucket"

    __slots__ = ("_capacity", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        _check_positive("rate", rate)
        _check_limit("burst", burst)
        self.rate = float(rate)
        self.burst = burst
        self._capacity = float(burst)

    def _tokens(self, state: BucketState, now: float) -> float:
        elapsed = now - state.updated_at
        if elapsed <= 0:
            return state.tokens
        tokens = state.tokens + elapsed * self.rate
        return tokens if tokens < self._capacity else self._capacity

    def decide(
        self, state: BucketState | None, now: float, cost: int = 1
    ) -> tuple[Decision, BucketState | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        burst = self.burst
        if state is None:
            tokens = self._capacity
            updated_at = now
        else:
            tokens = self._tokens(state, now)
            updated_at = now if now > state.updated_at else state.updated_at
        if tokens + TOKEN_EPSILON >= cost:
            left = tokens - cost
            reset = updated_at + (self._capacity - left) / self.rate - now
            decision = Decision(True, burst, int(left + TOKEN_EPSILON), reset, 0.0)
            return decision, BucketState(left, updated_at)
        if cost > burst or state is None:
            retry = math.inf
        else:
            stored = state
            moment = stored.updated_at + (cost - TOKEN_EPSILON - stored.tokens) / self.rate
            retry = _retry_after(
                now, moment, lambda t: self._tokens(stored, t) + TOKEN_EPSILON >= cost
            )
        reset = updated_at + (self._capacity - tokens) / self.rate - now
        return Decision(False, burst, int(tokens + TOKEN_EPSILON), reset, retry), state

    def expires_at(self, state: BucketState) -> float:
        return state.updated_at + (self._capacity - state.tokens) / self.rate

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst})"


# -- leaky bucket (shaper) -----------------------------------------------------------------


class QueueState(_Value):
    """Cost `queued` for the upstream at wall time `updated_at`; it drains at the rate."""

    __slots__ = ("queued", "updated_at")
    _fields = ("queued", "updated_at")

    def __init__(self, queued: float, updated_at: float) -> None:
        self.queued: Final = queued
        self.updated_at: Final = updated_at


class LeakyBucket:
    """A shaper: requests leave for the upstream evenly spaced, `rate` cost a second.

    A request arriving while `queued` cost is ahead of it is admitted with a `delay` of
    `queued / rate` seconds (the caller waits that long before sending it upstream), as long as
    the queue has room for its cost: a request of cost `c` counts as `c` requests of cost 1,
    the last of which must not wait more than `max_delay`. Past that it is rejected. So a
    request of cost `c` holds the next one back by `c / rate` seconds. `max_delay=0` polices
    without queueing: one request of cost 1 per `1 / rate` seconds.

    The state counts queued cost rather than the next departure time: adding `1 / rate` to a
    wall time rounds to its quarter-microsecond grid, and a long queue would add up the drift.
    """

    kind: ClassVar[str] = "leaky-bucket"

    __slots__ = ("_room", "capacity", "max_delay", "rate")

    def __init__(self, rate: float, max_delay: float) -> None:
        _check_positive("rate", rate)
        if not (max_delay >= 0 and math.isfinite(max_delay)):
            raise ValueError(f"max_delay must be a number of seconds >= 0, not {max_delay!r}")
        self.rate = float(rate)
        self.max_delay = float(max_delay)
        # Cost that may queue behind a request leaving now: 1/rate, 2/rate... max_delay.
        self._room = max_delay * rate + TOKEN_EPSILON
        # Cost an idle bucket admits at one instant.
        self.capacity = int(self._room) + 1

    def _queued(self, state: QueueState, now: float) -> float:
        elapsed = now - state.updated_at
        if elapsed <= 0:
            return state.queued
        queued = state.queued - elapsed * self.rate
        return queued if queued > 0 else 0.0

    def decide(
        self, state: QueueState | None, now: float, cost: int = 1
    ) -> tuple[Decision, QueueState | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        rate = self.rate
        if state is None:
            queued = 0.0
            updated_at = now
        else:
            queued = self._queued(state, now)
            updated_at = now if now > state.updated_at else state.updated_at
        room = self._room - queued
        if room >= cost - 1:
            after = queued + cost
            room_after = self._room - after
            remaining = int(room_after) + 1 if room_after >= 0 else 0
            # The delay is a wait the caller sleeps, so it is the queue's length alone: after a
            # wall clock step back (updated_at > now) it must not include the step.
            reset = updated_at - now + after / rate
            decision = Decision(True, self.capacity, remaining, reset, 0.0, queued / rate)
            return decision, QueueState(after, updated_at)
        if cost > self.capacity or state is None:
            retry = math.inf
        else:
            stored = state
            moment = stored.updated_at + (stored.queued - self._room + cost - 1) / rate
            retry = _retry_after(
                now, moment, lambda t: self._room - self._queued(stored, t) >= cost - 1
            )
        remaining = int(room) + 1 if room >= 0 else 0
        reset = updated_at - now + queued / rate
        return Decision(False, self.capacity, remaining, reset, retry), state

    def expires_at(self, state: QueueState) -> float:
        return state.updated_at + state.queued / self.rate

    def __repr__(self) -> str:
        return f"LeakyBucket(rate={self.rate}, max_delay={self.max_delay})"


# -- concurrency -----------------------------------------------------------------------------


class Concurrency:
    """At most `limit` cost in flight per key; the state is the cost in flight.

    Unlike the rate algorithms, what is spent comes back: the caller must `release` what it
    acquired when the request ends, on success, error and client disconnect alike (in a
    `finally`). When a slot frees cannot be known, so `retry_after` and `reset_after` of a
    busy key are the configured hint, not a promise.
    """

    kind: ClassVar[str] = "concurrency"

    __slots__ = ("limit", "retry_after")

    def __init__(self, limit: int, retry_after: float = DEFAULT_CONCURRENCY_RETRY_AFTER) -> None:
        _check_limit("limit", limit)
        _check_positive("retry_after", retry_after)
        self.limit = limit
        self.retry_after = float(retry_after)

    def decide(self, state: int | None, now: float, cost: int = 1) -> tuple[Decision, int | None]:
        if cost < 1:
            raise ValueError(_COST_ERROR.format(cost))
        limit = self.limit
        in_flight = state or 0
        if in_flight + cost <= limit:
            decision = Decision(True, limit, limit - in_flight - cost, self.retry_after, 0.0)
            return decision, in_flight + cost
        retry = math.inf if cost > limit else self.retry_after
        reset = self.retry_after if in_flight else 0.0
        return Decision(False, limit, limit - in_flight, reset, retry), state

    def release(self, state: int | None, cost: int = 1) -> int | None:
        """The state once a request of `cost` has ended; `None` when nothing is in flight.

        Releasing more than was acquired is a caller's bug; the count still never goes below 0.
        """
        left = (state or 0) - cost
        return left if left > 0 else None

    def expires_at(self, state: int) -> float:
        return math.inf  # only a release frees what is in flight

    def __repr__(self) -> str:
        return f"Concurrency(limit={self.limit}, retry_after={self.retry_after})"


# -- several limits on one request -----------------------------------------------------------


class CombinedDecision(_Value):
    """The outcome of several limits on one request."""

    __slots__ = ("decision", "limit_index", "states")
    _fields = ("decision", "limit_index", "states")

    def __init__(self, decision: Decision, limit_index: int, states: tuple[Any, ...]) -> None:
        # The most restrictive limit's decision. When rejected, `retry_after` is the longest
        # of the rejecting limits' (the request needs them all); when admitted, `delay` is the
        # longest.
        self.decision: Final = decision
        # Which limit `decision` is about, as an index into the limits given.
        self.limit_index: Final = limit_index
        # The states to store, in the order given: the new ones if admitted, else the old ones.
        self.states: Final = states


def decide_all(
    limits: Sequence[tuple[RateAlgorithm[Any], Any]], now: float, cost: int = 1
) -> CombinedDecision:
    """Admit a request only if every limit admits it; if any rejects, none is spent.

    `limits` holds (algorithm, state) pairs. The decision returned is the most restrictive
    limit's: among the rejecting limits if any (else among all), the lowest `remaining`, then
    the longest `retry_after`, then the longest `reset_after`.
    """
    if len(limits) == 1:
        algorithm, state = limits[0]
        decision, new_state = algorithm.decide(state, now, cost)
        return CombinedDecision(decision, 0, (new_state,))
    if not limits:
        raise ValueError("decide_all needs at least one limit")
    new_states: list[Any] = []
    chosen: Decision | None = None
    chosen_index = -1
    rejected = False
    longest_retry = 0.0
    longest_delay = 0.0
    for index, (algorithm, state) in enumerate(limits):
        decision, new_state = algorithm.decide(state, now, cost)
        new_states.append(new_state)
        if decision.allowed:
            longest_delay = max(longest_delay, decision.delay)
            if rejected:
                continue
        else:
            longest_retry = max(longest_retry, decision.retry_after)
            if not rejected:
                rejected = True
                chosen = None
        if chosen is None or (
            decision.remaining,
            -decision.retry_after,
            -decision.reset_after,
        ) < (chosen.remaining, -chosen.retry_after, -chosen.reset_after):
            chosen = decision
            chosen_index = index
    assert chosen is not None
    if rejected:
        if chosen.retry_after != longest_retry:
            chosen = chosen.replace(retry_after=longest_retry)
        return CombinedDecision(chosen, chosen_index, tuple(state for _, state in limits))
    if chosen.delay != longest_delay:
        chosen = chosen.replace(delay=longest_delay)
    return CombinedDecision(chosen, chosen_index, tuple(new_states))


# -- in-memory limiters (one worker) --------------------------------------------------------


class LocalLimiter(Generic[StateT]):
    """One algorithm's states per key in a dict, for one worker; reads the injected clock.

    At most `max_keys` keys. When a new key finds the table full, keys whose state has expired
    go first; if that leaves less than an eighth of the table free, the least recently admitted
    keys go until it does, so a full table costs one scan per `max_keys / 8` new keys. An
    evicted key starts afresh: eviction errs on the side of admitting.
    """

    __slots__ = ("_algorithm", "_clock", "_max_keys", "_states")

    def __init__(
        self,
        algorithm: RateAlgorithm[StateT],
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        _check_limit("max_keys", max_keys)
        self._algorithm = algorithm
        self._clock = clock
        self._max_keys = max_keys
        # Least recently admitted first: an admitted key is moved to the end.
        self._states: dict[str, StateT] = {}

    def hit(self, key: str, cost: int = 1) -> Decision:
        """Decide on a request of `cost` for `key` now, and keep the key's new state."""
        states = self._states
        state = states.get(key)
        now = self._clock.wall()
        decision, new_state = self._algorithm.decide(state, now, cost)
        if new_state is not state:
            if state is not None:
                del states[key]
            elif len(states) >= self._max_keys:
                self._make_room(now)
            if new_state is not None:
                states[key] = new_state
        return decision

    def _make_room(self, now: float) -> None:
        states = self._states
        expires_at = self._algorithm.expires_at
        for key in [key for key, state in states.items() if expires_at(state) <= now]:
            del states[key]
        excess = len(states) - (self._max_keys - max(1, self._max_keys // 8))
        if excess > 0:
            for key in list(islice(states, excess)):
                del states[key]

    def __len__(self) -> int:
        return len(self._states)

    def __repr__(self) -> str:
        return (
            f"LocalLimiter({self._algorithm!r}, keys={len(self._states)}, "
            f"max_keys={self._max_keys})"
        )


class ConcurrencyLimiter:
    """Requests in flight per key, for one worker: `acquire` before, `release` after.

    The caller guarantees one `release` per admitted `acquire`, whatever happens to the request
    (in a `finally`, so that errors, cancellation and client disconnects release too). Only
    keys with something in flight are held, so the table is bounded by the requests in flight.
    """

    __slots__ = ("_algorithm", "_in_flight")

    def __init__(self, limit: int, *, retry_after: float = DEFAULT_CONCURRENCY_RETRY_AFTER) -> None:
        self._algorithm = Concurrency(limit, retry_after)
        self._in_flight: dict[str, int] = {}

    def acquire(self, key: str, cost: int = 1) -> Decision:
        decision, in_flight = self._algorithm.decide(self._in_flight.get(key), 0.0, cost)
        if decision.allowed and in_flight is not None:
            self._in_flight[key] = in_flight
        return decision

    def release(self, key: str, cost: int = 1) -> None:
        left = self._algorithm.release(self._in_flight.get(key), cost)
        if left is None:
            self._in_flight.pop(key, None)
        else:
            self._in_flight[key] = left

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def __len__(self) -> int:
        return len(self._in_flight)

    def __repr__(self) -> str:
        return f"ConcurrencyLimiter({self._algorithm!r}, in_flight={self._in_flight})"
