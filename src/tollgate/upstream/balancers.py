"""Load balancing: which of an upstream's targets takes the next request.

Pure algorithms: no sockets, no tasks, no real clock. Each balancer chooses among the fixed
list of targets it was built with; `weights[i]` is target i's share, and a weight of 0 drains
the target (never chosen; if every weight is 0, nothing is available). Changing the targets
means building a new balancer, once, off the request path.

The hot path calls `pick`, `started` and `finished` once per request, so they build no lists
or other objects in the common case and take a fast path when only one target can be chosen.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from bisect import bisect_right
from collections.abc import Container, Sequence
from typing import Protocol

from tollgate.clock import SYSTEM_CLOCK, Clock

BALANCER_KINDS = ("round-robin", "least-connections", "consistent-hash", "peak-ewma")

# The heaviest target gets this many ring points, up to twice as many (a power of two): fewer
# leaves shares uneven (160 per target was 17% off for ten equal targets), more costs memory.
RING_POINTS_FOR_HEAVIEST = 1024

# 2**32 over the golden ratio: stepping by it, keyless picks sweep the ring evenly.
_KEYLESS_STEP = 0x9E3779B9

_RING_SPACE = 1 << 32  # crc32 of a key and every ring point are 32-bit

# Eight 32-bit ring points from one 32-byte digest.
_POINTS_PER_DIGEST = struct.Struct("<8I")

# How long a latency estimate takes to fade to 1/e without news (Finagle's default is 10 s).
DEFAULT_DECAY_SECONDS = 10.0

# What a target nobody has tried yet is assumed to answer in: low enough that it gets tried
# soon, while its cost still grows with each request sent to it before it answers.
DEFAULT_UNTRIED_LATENCY = 0.030

# Up to this many targets, peak EWMA compares them all; past it, two chosen at random.
PEAK_EWMA_FULL_SCAN_TARGETS = 3


class Balancer(Protocol):
    def pick(self, key: bytes | None = None, exclude: Container[int] = ()) -> int | None:
        """The index of the target for the next request, or `None` if none is available.

        `key` is the hash key (consistent-hash only). `exclude` holds indexes not to choose:
        targets that already failed this request, unhealthy ones.
        """
        ...

    def started(self, index: int) -> None:
        """A request to target `index` began."""
        ...

    def finished(self, index: int, latency: float | None) -> None:
        """A request to target `index` ended, after `latency` seconds when known."""
        ...


def create_balancer(kind: str, weights: Sequence[int], *, clock: Clock = SYSTEM_CLOCK) -> Balancer:
    """A balancer of `kind` (one of `BALANCER_KINDS`) over targets with these weights."""
    match kind:
        case "round-robin":
            return SmoothWeightedRoundRobin(weights)
        case "least-connections":
            return LeastConnections(weights)
        case "consistent-hash":
            return ConsistentHash(weights)
        case "peak-ewma":
            return PeakEwma(weights, clock=clock)
    raise ValueError(f"unknown balancer {kind!r}; expected one of {', '.join(BALANCER_KINDS)}")


class _WeightedTargets:
    """The targets every balancer starts from: their weights and which of them can be chosen."""

    __slots__ = ("_active", "_single_target", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if any(weight < 0 for weight in weights):
            raise ValueError(f"weights cannot be negative: {list(weights)}")
        self._weights = tuple(weights)
        # Indexes of the targets with a positive weight: the only ones ever chosen.
        self._active = tuple(index for index, weight in enumerate(weights) if weight > 0)
        # The one choosable target's index when there is exactly one, else -1.
        self._single_target = self._active[0] if len(self._active) == 1 else -1

    def started(self, index: int) -> None:
        pass

    def finished(self, index: int, latency: float | None) -> None:
        pass


class SmoothWeightedRoundRobin(_WeightedTargets):
    """nginx's smooth weighted round-robin: weights 5, 1, 1 give a a b a c a a, never a burst.

    Each pick adds every candidate's weight to its `current` score, takes the highest, and
    takes the candidates' total weight back from it. Over any sum(weights) picks each target is
    chosen exactly weight times; an excluded target sits the round out, and the others keep
    their proportions among themselves.
    """

    __slots__ = ("_current",)

    def __init__(self, weights: Sequence[int]) -> None:
        super().__init__(weights)
        self._current = [0] * len(self._weights)

    def pick(self, key: bytes | None = None, exclude: Container[int] = ()) -> int | None:
        single = self._single_target
        if single >= 0:
            return None if single in exclude else single
        weights = self._weights
        current = self._current
        best = -1
        best_score = 0
        total = 0
        for index in self._active:
            if index in exclude:
                continue
            weight = weights[index]
            score = current[index] + weight
            current[index] = score
            total += weight
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return None
        current[best] = best_score - total
        return best

    def __repr__(self) -> str:
        return f"SmoothWeightedRoundRobin(weights={list(self._weights)}, current={self._current})"


class LeastConnections(_WeightedTargets):
    """The target with the fewest requests in flight per unit of weight.

    Ties, common when traffic is light and nothing is in flight, go round-robin by weight
    (smooth weighted round-robin among the tied targets, as nginx's least_conn does), so they
    neither all land on the first target nor ignore the weights.
    """

    __slots__ = ("_current", "_in_flight")

    def __init__(self, weights: Sequence[int]) -> None:
        super().__init__(weights)
        self._in_flight = [0] * len(self._weights)
        self._current = [0] * len(self._weights)

    def pick(self, key: bytes | None = None, exclude: Container[int] = ()) -> int | None:
        single = self._single_target
        if single >= 0:
            return None if single in exclude else single
        weights = self._weights
        in_flight = self._in_flight
        # in_flight / weight compared by cross-multiplying: exact, and no float division.
        best = -1
        best_in_flight = 0
        best_weight = 1
        tied = 0
        for index in self._active:
            if index in exclude:
                continue
            load = in_flight[index] * best_weight
            least = best_in_flight * weights[index]
            if best < 0 or load < least:
                best = index
                best_in_flight = in_flight[index]
                best_weight = weights[index]
                tied = 1
            elif load == least:
                tied += 1
        if tied < 2:
            return None if best < 0 else best
        current = self._current
        chosen = -1
        chosen_score = 0
        total = 0
        for index in self._active:
            if index in exclude:
                continue
            if in_flight[index] * best_weight != best_in_flight * weights[index]:
                continue
            weight = weights[index]
            score = current[index] + weight
            current[index] = score
            total += weight
            if chosen < 0 or score > chosen_score:
                chosen = index
                chosen_score = score
        current[chosen] = chosen_score - total
        return chosen

    def started(self, index: int) -> None:
        self._in_flight[index] += 1

    def finished(self, index: int, latency: float | None) -> None:
        # Never below zero: one unmatched call must not skew every later pick.
        if self._in_flight[index] > 0:
            self._in_flight[index] -= 1

    def __repr__(self) -> str:
        return f"LeastConnections(weights={list(self._weights)}, in_flight={self._in_flight})"


class ConsistentHash(_WeightedTargets):
    """A hash ring: the same key goes to the same target, and few keys move when targets change.

    Each target owns points on a 32-bit ring, as many as its weight times `points_per_weight`;
    a key (crc32) goes to the owner of the first point after it. Target i's points depend only
    on i and its own point count, so draining a target (weight 0) moves exactly that target's
    keys, and adding one moves only the keys it takes over. `points_per_weight` is a power of
    two chosen from the largest weight alone: it changes only if draining the heaviest target
    changes the largest weight's power of two, and then the remaining targets gain or lose
    points and some of their keys move as well.

    An excluded owner passes its key on to the next point of an allowed target. Without a key,
    picks sweep the ring in even steps, which spreads them by weight.
    """

    __slots__ = ("_keyless_position", "_owners", "_points", "_points_per_weight")

    def __init__(self, weights: Sequence[int]) -> None:
        super().__init__(weights)
        self._points: list[int] = []
        self._owners: list[int] = []
        self._keyless_position = 0
        self._points_per_weight = 0.0
        if not self._active:
            return
        heaviest = max(self._weights)
        # The heaviest target's points land in [RING_POINTS_FOR_HEAVIEST, twice that).
        shift = RING_POINTS_FOR_HEAVIEST.bit_length() - heaviest.bit_length()
        self._points_per_weight = 2.0**shift
        ring: list[tuple[int, int]] = []
        for index in self._active:
            count = _scaled(self._weights[index], shift)
            ring.extend((point, index) for point in _ring_points(index, count))
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]

    def pick(self, key: bytes | None = None, exclude: Container[int] = ()) -> int | None:
        single = self._single_target
        if single >= 0:
            return None if single in exclude else single
        points = self._points
        if not points:
            return None
        if key is None:
            position = (self._keyless_position + _KEYLESS_STEP) % _RING_SPACE
            self._keyless_position = position
        else:
            position = zlib.crc32(key)
        slot = bisect_right(points, position)
        if slot == len(points):
            slot = 0
        owner = self._owners[slot]
        if owner not in exclude:
            return owner
        return self._next_allowed(slot, exclude)

    def _next_allowed(self, slot: int, exclude: Container[int]) -> int | None:
        """The owner of the first point at or after `slot` whose target is not excluded."""
        if all(index in exclude for index in self._active):
            return None
        owners = self._owners
        size = len(owners)
        while owners[slot] in exclude:
            slot += 1
            if slot == size:
                slot = 0
        return owners[slot]

    def __repr__(self) -> str:
        return (
            f"ConsistentHash(weights={list(self._weights)}, points={len(self._points)}, "
            f"points_per_weight={self._points_per_weight:g})"
        )


def _scaled(weight: int, shift: int) -> int:
    """`weight` times 2**shift, rounded; at least 1, so a light target keeps a point."""
    if shift >= 0:
        return weight << shift
    return max(1, (weight + (1 << (-shift - 1))) >> -shift)


def _ring_points(index: int, count: int) -> list[int]:
    """Target `index`'s first `count` ring points: the same in every process and every run."""
    points: list[int] = []
    group = 0
    while len(points) < count:
        digest = hashlib.blake2b(f"{index}-{group}".encode(), digest_size=32).digest()
        points.extend(_POINTS_PER_DIGEST.unpack(digest))
        group += 1
    del points[count:]
    return points


class PeakEwma(_WeightedTargets):
    """The target with the lowest expected wait: latency estimate x (in flight + 1) / weight.

    After Finagle's and linkerd's peak EWMA: a target's estimate jumps at once to any sample
    above it (a peak is believed immediately), is pulled down toward lower samples by the weight
    of the time since its last sample, and fades toward zero while there is no news, so a target
    that was slow once is tried again before long. A target nobody has tried starts at
    `untried_latency`. Up to `PEAK_EWMA_FULL_SCAN_TARGETS` targets are all compared; past that,
    the cheaper of two chosen at random ("power of two choices"): nearly as good, and it does
    not herd every request onto the one target that looks best right now.
    """

    __slots__ = (
        "_clock",
        "_decay_seconds",
        "_estimates",
        "_in_flight",
        "_inverse_weights",
        "_random",
        "_updated_at",
    )

    def __init__(
        self,
        weights: Sequence[int],
        *,
        clock: Clock = SYSTEM_CLOCK,
        decay_seconds: float = DEFAULT_DECAY_SECONDS,
        untried_latency: float = DEFAULT_UNTRIED_LATENCY,
        random_source: random.Random | None = None,
    ) -> None:
        super().__init__(weights)
        if decay_seconds <= 0:
            raise ValueError(f"decay_seconds must be positive, not {decay_seconds}")
        self._clock = clock
        self._decay_seconds = decay_seconds
        self._random = random_source if random_source is not None else random.Random()
        count = len(self._weights)
        now = clock.monotonic()
        self._estimates = [untried_latency] * count
        self._updated_at = [now] * count
        self._in_flight = [0] * count
        self._inverse_weights = [1.0 / weight if weight else 0.0 for weight in self._weights]

    def pick(self, key: bytes | None = None, exclude: Container[int] = ()) -> int | None:
        single = self._single_target
        if single >= 0:
            return None if single in exclude else single
        active = self._active
        count = len(active)
        now = self._clock.monotonic()
        if count <= PEAK_EWMA_FULL_SCAN_TARGETS:
            return self._cheapest(now, exclude)
        draw = self._random.random
        first_slot = int(draw() * count)
        second_slot = int(draw() * (count - 1))
        if second_slot >= first_slot:
            second_slot += 1
        first = active[first_slot]
        second = active[second_slot]
        if first in exclude or second in exclude:
            return self._cheapest(now, exclude)
        return first if self._cost(first, now) <= self._cost(second, now) else second

    def _cheapest(self, now: float, exclude: Container[int]) -> int | None:
        best = -1
        best_cost = 0.0
        for index in self._active:
            if index in exclude:
                continue
            cost = self._cost(index, now)
            if best < 0 or cost < best_cost:
                best = index
                best_cost = cost
        return None if best < 0 else best

    def _cost(self, index: int, now: float) -> float:
        return (
            self._estimate(index, now) * (self._in_flight[index] + 1) * self._inverse_weights[index]
        )

    def _estimate(self, index: int, now: float) -> float:
        """Target `index`'s latency estimate, faded by the time since its last sample."""
        return self._estimates[index] * math.exp(
            (self._updated_at[index] - now) / self._decay_seconds
        )

    def started(self, index: int) -> None:
        self._in_flight[index] += 1

    def finished(self, index: int, latency: float | None) -> None:
        # Never below zero: one unmatched call must not skew every later pick.
        if self._in_flight[index] > 0:
            self._in_flight[index] -= 1
        if latency is None or self._single_target >= 0:
            return
        now = self._clock.monotonic()
        kept = math.exp((self._updated_at[index] - now) / self._decay_seconds)
        estimate = self._estimates[index] * kept
        if latency >= estimate:
            self._estimates[index] = latency
        else:
            self._estimates[index] = estimate + (latency - estimate) * (1.0 - kept)
        self._updated_at[index] = now

    def __repr__(self) -> str:
        now = self._clock.monotonic()
        estimates = [round(self._estimate(index, now), 6) for index in range(len(self._weights))]
        return (
            f"PeakEwma(weights={list(self._weights)}, estimates={estimates}, "
            f"in_flight={self._in_flight}, decay_seconds={self._decay_seconds})"
        )
