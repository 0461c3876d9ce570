"""The one clock abstraction: monotonic seconds for durations, wall seconds for windows and records.

Everything that decides on time takes a `Clock`; tests pass a `FakeClock` and advance it by hand.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clock. `monotonic` never goes back; `wall` is Unix time."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to."""

    __slots__ = ("_monotonic", "_wall")

    def __init__(self, wall: float = 1_700_000_000.0, monotonic: float = 1000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def monotonic(self) -> float:
        return self._monotonic

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._monotonic += seconds
        self._wall += seconds

    def __repr__(self) -> str:
        return f"FakeClock(wall={self._wall}, monotonic={self._monotonic})"


SYSTEM_CLOCK = SystemClock()
