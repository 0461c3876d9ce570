"""Logging: the `tollgate` logger tree writes to stderr, as human lines or JSON lines.

Structured fields travel as `logger.info("...", extra={"fields": {...}})`. A filter on the
handler redacts credentials among them before any formatter sees them, so a log line never
carries an API key, a token or a cookie, whoever wrote the call.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = [
    "FORMATS",
    "LEVELS",
    "HumanFormatter",
    "JsonFormatter",
    "RedactFilter",
    "is_secret_name",
    "redact",
    "setup_logging",
]

LOGGER_NAME = "tollgate"
FORMATS = ("human", "json")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
REDACTED = "[redacted]"

# A name is a credential's when one of its words is one of these: `api_key`, `X-Api-Key`,
# `set-cookie`, `adminToken` are; `prompt_tokens` (a count) is not.
_SECRET_WORDS = frozenset(
    {
        "authorization",
        "token",
        "key",
        "keys",
        "apikey",
        "secret",
        "secrets",
        "password",
        "passwd",
        "cookie",
        "cookies",
    }
)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_HANDLER_NAME = "tollgate-stderr"
# Human values are quoted only when a reader could not tell where they end.
_NEEDS_QUOTES = re.compile(r'[\s="\\]')


def setup_logging(fmt: str = "human", level: str = "info") -> None:
    """Send the `tollgate` logger tree to stderr in `fmt` ("human" or "json") from `level`.

    Calling it again replaces the previous setup (the supervisor and each worker call it).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    numeric_level = LEVELS.get(level.lower())
    if numeric_level is None:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(RedactFilter())
    logger = logging.getLogger(LOGGER_NAME)
    for previous in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(previous)
        previous.close()
    logger.addHandler(handler)
    logger.setLevel(numeric_level)
    # Written once, here, even when an embedding application configured the root logger.
    logger.propagate = False


# -- redaction -----------------------------------------------------------------------------


def is_secret_name(name: str | bytes) -> bool:
    """Whether a field or header called `name` holds a credential."""
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    words = _NON_WORD.split(_CAMEL_BOUNDARY.sub("_", name).lower())
    return any(word in _SECRET_WORDS for word in words)


def redact(fields: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of `fields` with credentials replaced by "[redacted]", at any depth."""
    return {
        name: REDACTED
        if isinstance(name, str | bytes) and is_secret_name(name)
        else _redact_value(value)
        for name, value in fields.items()
    }


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        # Headers are often (name, value) pairs.
        if len(value) == 2 and isinstance(value[0], str | bytes) and is_secret_name(value[0]):
            return [value[0], REDACTED]
        return [_redact_value(item) for item in value]
    return value


class RedactFilter(logging.Filter):
    """Replaces credentials in a record's `fields` before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            record.fields = redact(fields)
        return True


# -- formats -------------------------------------------------------------------------------


def _timestamp(created: float) -> str:
    """`2026-11-22T10:00:00.123Z`: UTC with milliseconds."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> Mapping[Any, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class HumanFormatter(logging.Formatter):
    """`2026-11-22T10:00:00.123Z INFO tollgate.worker[4242]: message key=value`."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record.created)} {record.levelname} "
            f"{record.name}[{record.process}]: {record.getMessage()}"
        )
        pairs = " ".join(f"{name}={_human_value(value)}" for name, value in _fields(record).items())
        if pairs:
            line = f"{line} {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _human_value(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        value = _plain(value)
    if isinstance(value, str):
        return _json_text(value) if not value or _NEEDS_QUOTES.search(value) else value
    if isinstance(value, Mapping | list | tuple):
        return _json_text(value)
    return str(value)


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=_plain, option=orjson.OPT_NON_STR_KEYS).decode()


def _plain(value: Any) -> str:
    """What JSON cannot hold, as text: header bytes as they were sent, others via str()."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for name, value in _fields(record).items():
            entry.setdefault(str(name), value)  # a field cannot overwrite the five above
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _json_text(entry)
