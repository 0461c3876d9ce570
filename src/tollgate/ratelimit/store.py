"""Where rate-limit state lives: the `Store` protocol and `ProcessStore`, a dict per worker.

A store keeps each key's state (see `tollgate.ratelimit.algorithms`) and decides on a request
in one atomic step: read the states of all the request's limits, decide with `decide_all`,
write the new states back only if every limit admits. Nothing between the read and the write
can see or change those keys, so two requests never both take the last unit.

`ProcessStore` is exact for one worker process: it is a plain dict, and the event loop runs
one `hit` at a time. With several workers each one counts on its own, so a node admits up to
`workers` times a limit. `tollgate.ratelimit.shm.SharedMemoryStore` is the node-wide store
(every worker of a node, through shared memory); a Redis store (every node) will follow with
the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any, Protocol

from tollgate.clock import Clock
from tollgate.ratelimit.algorithms import (
    DEFAULT_MAX_KEYS,
    CombinedDecision,
    Concurrency,
    Decision,
    RateAlgorithm,
    decide_all,
)

Limit = tuple[str, RateAlgorithm[Any]]
"""One limit of a request: the key its state is kept under, and the algorithm deciding."""


class Store(Protocol):
    """What the `rate-limit` policy (and later the admin API) needs from a store."""

    def hit(self, limits: Sequence[Limit], now: float, cost: int) -> CombinedDecision:
        """Decide on a request of `cost` at wall time `now` against every limit at once.

        Admitted only if every limit admits; then each limit's new state is kept. If any
        rejects, nothing is spent. The decision reported is `decide_all`'s.
        """
        ...

    def peek(self, key: str, algorithm: RateAlgorithm[Any], now: float) -> Decision:
        """What a request of cost 1 for `key` would be told at `now`; nothing is spent."""
        ...

    def reset(self, key: str) -> None:
        """Forget `key`: its next request starts afresh."""
        ...

    def release(self, key: str, cost: int) -> None:
        """A request admitted by the concurrency limit under `key` has ended."""
        ...


class ProcessStore:
    """States in a dict, for one worker process; outlives reloads (keys name the limits).

    At most `max_keys` keys. When a new key finds the table full, keys whose state has expired
    go first; if that leaves less than an eighth of the table free, the least recently admitted
    keys go until it does. An evicted key starts afresh (a concurrency key forgets what it has
    in flight): eviction errs on the side of admitting.
    """

    __slots__ = ("_entries", "_max_keys")

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys!r}")
        self._max_keys = max_keys
        # key -> (algorithm, state); least recently admitted first (an admitted key moves to
        # the end). The algorithm is kept to tell when the state expires.
        self._entries: dict[str, tuple[RateAlgorithm[Any], Any]] = {}

    def hit(self, limits: Sequence[Limit], now: float, cost: int) -> CombinedDecision:
        entries = self._entries
        if len(limits) == 1:
            key, algorithm = limits[0]
            entry = entries.get(key)
            state = None if entry is None else entry[1]
            decision, new_state = algorithm.decide(state, now, cost)
            if decision.allowed:
                self._keep(key, algorithm, new_state, now)
            return CombinedDecision(decision, 0, (new_state,))
        pairs = []
        for key, algorithm in limits:
            entry = entries.get(key)
            pairs.append((algorithm, None if entry is None else entry[1]))
        combined = decide_all(pairs, now, cost)
        if combined.decision.allowed:
            for (key, algorithm), state in zip(limits, combined.states, strict=True):
                self._keep(key, algorithm, state, now)
        return combined

    def _keep(self, key: str, algorithm: RateAlgorithm[Any], state: Any, now: float) -> None:
        """Store `key`'s new state as the most recently admitted (None: forget the key)."""
        entries = self._entries
        if entries.pop(key, None) is None and len(entries) >= self._max_keys:
            self._make_room(now)
        if state is not None:
            entries[key] = (algorithm, state)

    def peek(self, key: str, algorithm: RateAlgorithm[Any], now: float) -> Decision:
        entry = self._entries.get(key)
        decision, _ = algorithm.decide(None if entry is None else entry[1], now, 1)
        return decision

    def reset(self, key: str) -> None:
        self._entries.pop(key, None)

    def release(self, key: str, cost: int) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return  # evicted or reset meanwhile: nothing is counted to give back
        algorithm, state = entry
        if not isinstance(algorithm, Concurrency):
            raise TypeError(f"{key!r} is not a concurrency limit ({algorithm!r})")
        left = algorithm.release(state, cost)
        if left is None:
            del self._entries[key]
        else:
            self._entries[key] = (algorithm, left)

    def _make_room(self, now: float) -> None:
        entries = self._entries
        expired = [
            key for key, (algorithm, state) in entries.items() if algorithm.expires_at(state) <= now
        ]
        for key in expired:
            del entries[key]
        excess = len(entries) - (self._max_keys - max(1, self._max_keys // 8))
        if excess > 0:
            for key in list(islice(entries, excess)):
                del entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ProcessStore(keys={len(self._entries)}, max_keys={self._max_keys})"


# The ProcessStore of each clock in this process. A worker runs on one clock (the system's), so
# this is one store per worker, kept across reloads as counters must be. A gateway started
# with a clock of its own (a test's FakeClock) gets a store of its own: states stamped by one
# clock are never judged by another.
_PROCESS_STORES: dict[Clock, ProcessStore] = {}


def process_store(clock: Clock) -> ProcessStore:
    """This worker's ProcessStore for `clock`, made on first use."""
    store = _PROCESS_STORES.get(clock)
    if store is None:
        store = _PROCESS_STORES[clock] = ProcessStore()
    return store
