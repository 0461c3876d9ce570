"""Durations and sizes as written in config files."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tollgate.config.units import Duration, Size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("1m30s500ms", 90.5),
        (" 10S ", 10.0),
        ("0s", 0.0),
    ],
)
def test_duration_text_is_read_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("number", "seconds"), [(0, 0.0), (15, 15.0), (0.5, 0.5)])
def test_a_bare_number_is_seconds(number: float, seconds: float) -> None:
    assert parse_duration(number) == seconds


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "abc", "5x", "s", "ms", "-5s", "1h 30m", "30s!", "5 s", "1e3s"],
)
def test_duration_text_that_is_not_a_duration_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [-1, -0.5, True, None, [], {}, math.nan, math.inf])
def test_duration_values_of_the_wrong_kind_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@given(hours=st.integers(0, 1000), minutes=st.integers(0, 59), seconds=st.integers(0, 59))
def test_duration_parts_add_up(hours: int, minutes: int, seconds: int) -> None:
    text = f"{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("512b", 512),
        ("16kb", 16 * 1024),
        ("16k", 16 * 1024),
        ("16KiB", 16 * 1024),
        ("1mb", 1024**2),
        ("1 MB", 1024**2),
        ("2gb", 2 * 1024**3),
        ("1.5k", 1536),
        ("0", 0),
    ],
)
def test_size_text_is_read_in_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1tb", "kb", "1 k b", "1e3"])
def test_size_text_that_is_not_a_size_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("bad", [-1, True, None, 1.5, []])
def test_size_values_of_the_wrong_kind_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@given(st.integers(0, 10**6))
def test_kilobytes_are_1024_bytes(count: int) -> None:
    assert parse_size(f"{count}kb") == count * 1024


class _Limits(BaseModel):
    timeout: Duration
    body: Size


def test_units_validate_inside_a_model() -> None:
    limits = _Limits.model_validate({"timeout": "1m", "body": "1mb"})
    assert limits.timeout == 60.0
    assert limits.body == 1024**2


def test_a_bad_unit_in_a_model_is_an_error_at_its_field() -> None:
    with pytest.raises(ValidationError) as info:
        _Limits.model_validate({"timeout": "soon", "body": "huge"})
    assert [error["loc"] for error in info.value.errors()] == [("timeout",), ("body",)]
