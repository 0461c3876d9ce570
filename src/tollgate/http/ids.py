"""Request ids: a random 64-bit prefix per process and a counter.

Unique across workers, restarts and nodes with overwhelming probability, and far cheaper than
uuid4 (no system call per request): 16 hex digits then the counter in decimal.
"""

from __future__ import annotations

import os
import re
from typing import Final

_ACCEPTABLE_ID: Final = re.compile(rb"[\x21-\x7e]{1,200}")


class RequestIds:
    """The id source of one process; `reseed` after a fork so ids never repeat."""

    def __init__(self) -> None:
        self.prefix = ""
        self.counter = 0
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = 0

    def next(self) -> str:
        self.counter += 1
        return self.prefix + str(self.counter)

    def __repr__(self) -> str:
        return f"RequestIds(prefix={self.prefix}, counter={self.counter})"


REQUEST_IDS: Final = RequestIds()


def reseed() -> None:
    """Call in a freshly started worker so ids never repeat across processes."""
    REQUEST_IDS.reseed()


def next_request_id() -> str:
    return REQUEST_IDS.next()


def acceptable_incoming_id(value: bytes) -> bool:
    """A client-sent id is kept only if short and printable: safe in logs and headers."""
    return _ACCEPTABLE_ID.fullmatch(value) is not None
