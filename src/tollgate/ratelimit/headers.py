"""What clients are told about their limits, as response header fields.

Per draft-ietf-httpapi-ratelimit-headers-10, two Structured Field Lists:

- ``RateLimit-Policy: "per-second";q=20;w=2, "per-hour";q=1000;w=3600``: every limit that
  applies (constant per set of limits, so rendered once, at compile time);
- ``RateLimit: "per-hour";r=42;t=17``: the most restrictive limit right now (the one
  `decide_all` reports): `r` units remaining, `t` seconds until it is fully available again.

And the conventional ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``
about that same limit. Seconds are whole and rounded up, so a client that waits what it is told
is never early.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tollgate.ratelimit.algorithms import Decision

RATELIMIT = b"RateLimit"
RATELIMIT_POLICY = b"RateLimit-Policy"
X_LIMIT = b"X-RateLimit-Limit"
X_REMAINING = b"X-RateLimit-Remaining"
X_RESET = b"X-RateLimit-Reset"


def sf_string(text: str) -> bytes:
    """`text` as a Structured Field String (RFC 9651 §4.1.6): quoted, `\\` and `"` escaped."""
    if not text.isascii() or not text.isprintable():
        raise ValueError(f"{text!r} cannot be a structured field string (printable ASCII only)")
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


# The most seconds a reset is told as: a limit that refills so slowly that it is never fully
# available again (a rate near zero: an infinite reset) is told 68 years, not an error.
LONGEST_RESET = 2**31 - 1


def whole_seconds(seconds: float) -> int:
    """Seconds rounded up to a whole number, never negative, at most `LONGEST_RESET`: `t` and
    `X-RateLimit-Reset`."""
    if seconds >= LONGEST_RESET:
        return LONGEST_RESET
    return math.ceil(seconds) if seconds > 0 else 0


def retry_after_seconds(retry_after: float, never: int) -> int:
    """`Retry-After` for a rejected request: rounded up, at least 1.

    A request whose cost no limit can ever admit has an infinite `retry_after`; it is told to
    come back after `never` seconds (the longest window of its limits), not never.
    """
    if math.isinf(retry_after):
        return max(1, never)
    return max(1, math.ceil(retry_after))


@dataclass(frozen=True, slots=True)
class LimitHeaders:
    """One limit's part of the fields, rendered once: its name and its policy item."""

    name_item: bytes  # `"per-hour"`
    policy_item: bytes  # `"per-hour";q=1000;w=3600`
    limit: bytes  # X-RateLimit-Limit: what the limit admits at once

    @classmethod
    def render(cls, name: str, quota: int, window: float | None) -> LimitHeaders:
        """`window` in seconds (rounded up), or None for a limit without one (concurrency)."""
        name_item = sf_string(name)
        policy_item = name_item + b";q=%d" % quota
        if window is not None:
            policy_item += b";w=%d" % max(1, math.ceil(window))
        return cls(name_item, policy_item, b"%d" % quota)


def policy_field(limits: Sequence[LimitHeaders]) -> tuple[bytes, bytes]:
    """The `RateLimit-Policy` field naming every limit of a set, in config order."""
    return RATELIMIT_POLICY, b", ".join(limit.policy_item for limit in limits)


def fields_pieces(policy: tuple[bytes, bytes], limit: LimitHeaders) -> tuple[bytes, ...]:
    """Every field's line of a response about `limit`, in the five pieces that go around the
    four numbers (remaining, reset, remaining, reset): the same fields as `limit_fields`, for
    a renderer that joins them (the shared-memory store's C `hit` does, for admitted requests)."""
    return (
        policy[0] + b": " + policy[1] + b"\r\n" + RATELIMIT + b": " + limit.name_item + b";r=",
        b";t=",
        b"\r\n" + X_LIMIT + b": " + limit.limit + b"\r\n" + X_REMAINING + b": ",
        b"\r\n" + X_RESET + b": ",
        b"\r\n",
    )


def fields_template(policy: tuple[bytes, bytes], limit: LimitHeaders) -> bytes:
    """`fields_pieces` as a `%`-template of the four numbers: one formatting per request
    renders them all."""
    return b"%d".join(piece.replace(b"%", b"%%") for piece in fields_pieces(policy, limit))


def limit_fields(
    policy: tuple[bytes, bytes], limit: LimitHeaders, decision: Decision
) -> list[tuple[bytes, bytes]]:
    """Every field for a response: `policy` (from `policy_field`), then `RateLimit` and the
    X-RateLimit-* trio about `limit`, the one `decision` is about."""
    remaining = b"%d" % decision.remaining
    reset = b"%d" % whole_seconds(decision.reset_after)
    return [
        policy,
        (RATELIMIT, limit.name_item + b";r=" + remaining + b";t=" + reset),
        (X_LIMIT, limit.limit),
        (X_REMAINING, remaining),
        (X_RESET, reset),
    ]
