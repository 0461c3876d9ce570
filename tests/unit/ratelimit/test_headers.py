"""Client-facing rate-limit fields: valid structured fields, whole seconds rounded up."""

from __future__ import annotations

import math
from typing import Any

import http_sf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.ratelimit.algorithms import CombinedDecision, Decision, FixedWindow, TokenBucket
from tollgate.ratelimit.headers import (
    LimitHeaders,
    limit_fields,
    policy_field,
    retry_after_seconds,
    sf_string,
    whole_seconds,
)
from tollgate.ratelimit.limiter import CompiledLimits, LimitSpecView

PER_SECOND = LimitHeaders.render("per-second", 20, 2.0)
PER_HOUR = LimitHeaders.render("per-hour", 1000, 3600.0)


def parse_list(value: bytes) -> list[tuple[object, dict[str, object]]]:
    parsed: Any = http_sf.parse(value, tltype="list")
    assert isinstance(parsed, list)
    return [(item, dict(params)) for item, params in parsed]


def test_the_policy_field_lists_every_limit_as_a_structured_list() -> None:
    name, value = policy_field([PER_SECOND, PER_HOUR])
    assert name == b"RateLimit-Policy"
    assert value == b'"per-second";q=20;w=2, "per-hour";q=1000;w=3600'
    assert parse_list(value) == [
        ("per-second", {"q": 20, "w": 2}),
        ("per-hour", {"q": 1000, "w": 3600}),
    ]


def test_a_limit_without_a_window_has_no_w() -> None:
    _, value = policy_field([LimitHeaders.render("in-flight", 5, None)])
    assert parse_list(value) == [("in-flight", {"q": 5})]


def test_a_fractional_window_is_rounded_up_to_whole_seconds() -> None:
    _, value = policy_field([LimitHeaders.render("bucket", 3, 0.25)])
    assert parse_list(value) == [("bucket", {"q": 3, "w": 1})]


def test_the_ratelimit_field_names_the_limit_with_remaining_and_reset() -> None:
    policy = policy_field([PER_SECOND, PER_HOUR])
    fields = dict(limit_fields(policy, PER_HOUR, Decision(True, 1000, 42, 16.2, 0.0)))
    assert parse_list(fields[b"RateLimit"]) == [("per-hour", {"r": 42, "t": 17})]
    assert fields[b"RateLimit-Policy"] == policy[1]
    assert fields[b"X-RateLimit-Limit"] == b"1000"
    assert fields[b"X-RateLimit-Remaining"] == b"42"
    assert fields[b"X-RateLimit-Reset"] == b"17"


@given(
    remaining=st.integers(0, 10**9),
    reset=st.floats(0, 10**7, allow_nan=False),
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
)
def test_every_field_is_a_valid_structured_list(remaining: int, reset: float, name: str) -> None:
    limit = LimitHeaders.render(name, max(1, remaining), reset or None)
    fields = limit_fields(policy_field([limit]), limit, Decision(True, 1, remaining, reset, 0.0))
    values = dict(fields)
    [(item, params)] = parse_list(values[b"RateLimit"])
    assert item == name
    assert params == {"r": remaining, "t": whole_seconds(reset)}
    [(item, _)] = parse_list(values[b"RateLimit-Policy"])
    assert item == name


def test_names_are_escaped_as_structured_strings() -> None:
    parsed: Any = http_sf.parse(sf_string('a "b" \\c'), tltype="item")
    assert parsed[0] == 'a "b" \\c'


@pytest.mark.parametrize("text", ["caf\u00e9", "tab\there"])
def test_names_outside_printable_ascii_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        sf_string(text)


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [(0.0, 0), (-0.5, 0), (0.001, 1), (1.0, 1), (59.0, 59), (59.000001, 60)],
)
def test_reset_is_in_whole_seconds_rounded_up(seconds: float, whole: int) -> None:
    assert whole_seconds(seconds) == whole


@pytest.mark.parametrize(
    ("retry_after", "seconds"), [(0.0, 1), (0.001, 1), (1.0, 1), (1.2, 2), (40.0, 40)]
)
def test_retry_after_is_never_zero_and_rounded_up(retry_after: float, seconds: int) -> None:
    assert retry_after_seconds(retry_after, 60) == seconds


def test_a_cost_that_can_never_fit_is_told_to_retry_after_the_window() -> None:
    assert retry_after_seconds(math.inf, 3600) == 3600
    assert retry_after_seconds(math.inf, 0) == 1


@given(rate=st.floats(0.01, 1000), burst=st.integers(1, 50), cost=st.integers(1, 50))
def test_a_client_that_waits_retry_after_is_admitted(rate: float, burst: int, cost: int) -> None:
    bucket = TokenBucket(rate, burst)
    now = 1_700_000_000.0
    _, state = bucket.decide(None, now, burst)  # the bucket is empty
    decision, _ = bucket.decide(state, now, min(cost, burst))
    assert not decision.allowed
    wait = retry_after_seconds(decision.retry_after, 1)
    assert wait >= decision.retry_after
    assert bucket.decide(state, now + wait, min(cost, burst))[0].allowed


def test_a_fixed_window_refusal_is_told_the_rest_of_the_window() -> None:
    window = FixedWindow(6, 60.0)
    now = 1_700_000_000.0  # 20 s into a UTC minute
    state = None
    for _ in range(6):
        _, state = window.decide(state, now, 1)
    decision, _ = window.decide(state, now, 1)
    assert not decision.allowed
    assert retry_after_seconds(decision.retry_after, 60) == 40
    assert whole_seconds(decision.reset_after) == 40


@given(
    remaining=st.integers(min_value=0, max_value=10**12),
    reset=st.floats(min_value=-1.0, max_value=1e7, allow_nan=False),
    which=st.sampled_from([0, 1]),
)
def test_the_rendered_block_is_the_fields_serialised(
    remaining: int, reset: float, which: int
) -> None:
    limits = CompiledLimits(
        [
            LimitSpecView("per-second", "fixed-window", "f", FixedWindow(20, 2.0), 20, 2.0),
            LimitSpecView("per-50%", "token-bucket", "t", TokenBucket(10, 100), 100, 10.0),
        ],
        "scope",
    )
    combined = CombinedDecision(Decision(True, 20, remaining, reset, 0.0), which, (None, None))
    serialised = b"".join(name + b": " + value + b"\r\n" for name, value in limits.fields(combined))
    assert limits.block(combined) == serialised
