"""Durations (`30s`, `5m`, `250ms`, `1h30m`) and sizes (`16kb`, `1mb`, `512`) in config."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|kb|k|kib|mb|m|mib|gb|g|gib)?")
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `5m`, `250ms`, `1h30m` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    text = value.strip().lower()
    if not text:
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 250ms, 1h30m)")
    return total


def parse_size(value: object) -> int:
    """Bytes from `16kb`, `1mb`, `2gb` (powers of 1024) or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16kb or 1mb")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 16kb or 1mb")
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(f"{value!r} is not a size (use e.g. 512, 16kb, 1mb)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
