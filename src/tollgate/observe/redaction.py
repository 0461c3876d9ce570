"""What of a call's headers, query and bodies a record may keep: opt-in captures, capped, redacted.

Captures are off unless a service turns them on (`CapturePolicy`), and every capture passes
through here first, so that a credential never reaches a sink:

- headers: the value of `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie` and of
  every header whose name reads as a credential's (`X-Api-Key`, `apikey`, `X-Auth-Token`...,
  by the same test as the log lines' `tollgate.logging.is_secret_name`) becomes "[redacted]",
  as do the values of the extra names a service lists. Names are kept, so a reader sees that
  a credential was sent. The whole capture is capped in bytes;
- query strings and form bodies: parameters named like a credential (`api_key=...`) keep
  their name and lose their value;
- JSON bodies: values at configured JSON paths become "[redacted]". Paths are a small part of
  JSONPath: `$.password`, `password` (the `$.` is implied), `user.credentials[0]`,
  `messages[*].content`, `$['odd key']`, `*` for every member, and `..token` for a member of
  that name at any depth. A JSON body too large to parse within the cap is not kept at all
  when paths are configured: a truncated document cannot be redacted with certainty.

Every function is pure (input in, new value out) and runs only for services that opted in.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote_plus

import orjson

from tollgate.logging import REDACTED, is_secret_name

__all__ = [
    "ALWAYS_REDACTED_HEADERS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "REDACTED",
    "CapturePolicy",
    "JsonPath",
    "capture_body",
    "compile_json_path",
    "query_for_record",
    "redact_headers",
    "redact_json",
    "redact_query",
]

# A body capture is for reading a call in the logs explorer, not for archiving payloads.
DEFAULT_MAX_BODY_BYTES: Final = 8192
# Headers beyond this are left out: a normal request's headers take well under 2 KiB.
DEFAULT_MAX_HEADER_BYTES: Final = 8192

ALWAYS_REDACTED_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "apikey"}
)

TRUNCATED_HEADERS = "[truncated]"

_KEY, _INDEX, _EVERY, _DESCEND = range(4)
JsonStep = tuple[int, str | int]
JsonPath = tuple[JsonStep, ...]

_PATH_TOKEN = re.compile(
    r"""
      \.\.(?P<descend>[A-Za-z0-9_\-$@]+)        # ..name
    | \.?(?P<key>[A-Za-z0-9_\-$@]+)             # .name (the dot is optional at the start)
    | \.?\*                                     # .* or *
      (?P<every>)
    | \[\s*\*\s*\]                              # [*]
      (?P<every_bracket>)
    | \[\s*(?P<index>-?\d+)\s*\]                # [3]
    | \[\s*'(?P<single>[^']*)'\s*\]             # ['name']
    | \[\s*"(?P<double>[^"]*)"\s*\]             # ["name"]
    """,
    re.VERBOSE,
)


def compile_json_path(text: str) -> JsonPath:
    """`messages[*].content` as steps; `ValueError` for what the syntax above does not cover."""
    source = text.strip()
    if source.startswith("$"):
        source = source[1:]
    if not source:
        raise ValueError(f"JSON path {text!r}: it names no member (redacting `$` keeps nothing)")
    steps: list[JsonStep] = []
    position = 0
    while position < len(source):
        match = _PATH_TOKEN.match(source, position)
        if match is None or match.end() == position:
            raise ValueError(f"JSON path {text!r}: cannot read it from {source[position:]!r}")
        if match.group("descend") is not None:
            steps.append((_DESCEND, match.group("descend")))
        elif match.group("key") is not None:
            steps.append((_KEY, match.group("key")))
        elif match.group("index") is not None:
            steps.append((_INDEX, int(match.group("index"))))
        elif match.group("single") is not None:
            steps.append((_KEY, match.group("single")))
        elif match.group("double") is not None:
            steps.append((_KEY, match.group("double")))
        else:
            steps.append((_EVERY, "*"))
        position = match.end()
    return tuple(steps)


@dataclass(frozen=True, slots=True)
class CapturePolicy:
    """A service's capture settings, compiled once at config load."""

    request_headers: bool = False
    response_headers: bool = False
    request_body: bool = False
    response_body: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    redact_headers: frozenset[str] = frozenset()  # lower-case names, beyond the built-in ones
    json_paths: tuple[JsonPath, ...] = ()
    query: bool = True  # keep the query string (credential-like parameters redacted)
    redact_query: frozenset[str] = frozenset()  # lower-case parameter names, beyond those

    @classmethod
    def build(
        cls,
        *,
        request_headers: bool = False,
        response_headers: bool = False,
        request_body: bool = False,
        response_body: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        redact_headers: Iterable[str] = (),
        redact_json_paths: Iterable[str] = (),
        query: bool = True,
        redact_query: Iterable[str] = (),
    ) -> CapturePolicy:
        """From config values: header names in any case, JSON paths as text."""
        if max_body_bytes < 0 or max_header_bytes < 0:
            raise ValueError("capture caps must not be negative")
        return cls(
            request_headers=request_headers,
            response_headers=response_headers,
            request_body=request_body,
            response_body=response_body,
            max_body_bytes=max_body_bytes,
            max_header_bytes=max_header_bytes,
            redact_headers=frozenset(name.lower() for name in redact_headers),
            json_paths=tuple(compile_json_path(path) for path in redact_json_paths),
            query=query,
            redact_query=frozenset(name.lower() for name in redact_query),
        )

    @property
    def captures_anything(self) -> bool:
        return (
            self.request_headers or self.response_headers or self.request_body or self.response_body
        )


# -- headers ---------------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def header_is_secret(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether a header's value must not be kept (`name` in any case)."""
    lower = name.lower()
    return lower in ALWAYS_REDACTED_HEADERS or lower in extra or is_secret_name(lower)


def redact_headers(
    headers: Iterable[tuple[str | bytes, str | bytes]],
    *,
    extra: frozenset[str] = frozenset(),
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> list[list[str]]:
    """[[name, value], ...] in order, credentials' values redacted, capped at `max_bytes`.

    When the cap cuts the list, a last pair `["[truncated]", "<n> headers"]` says how many
    were left out.
    """
    captured: list[list[str]] = []
    size = 0
    left_out = 0
    for raw_name, raw_value in headers:
        name = _text(raw_name)
        value = REDACTED if header_is_secret(name, extra) else _text(raw_value)
        size += len(name) + len(value) + 4  # ": " and CRLF, as on the wire
        if size > max_bytes:
            left_out += 1
            continue
        captured.append([name, value])
    if left_out:
        captured.append([TRUNCATED_HEADERS, f"{left_out} headers"])
    return captured


# -- query strings and forms -----------------------------------------------------------------


def redact_query(query: str | bytes, *, extra: frozenset[str] = frozenset()) -> str:
    """`a=1&api_key=s3cr3t` as `a=1&api_key=[redacted]`; the rest is kept byte for byte."""
    text = _text(query)
    if not text:
        return text
    parts = text.split("&")
    for position, part in enumerate(parts):
        name, equals, _value = part.partition("=")
        if not equals:
            continue
        decoded = unquote_plus(name)
        if decoded.lower() in extra or is_secret_name(decoded):
            parts[position] = f"{name}={quote(REDACTED)}"
    return "&".join(parts)


# Every credential-like name (see `is_secret_name`) holds one of these, lower-cased: a query
# without any of them, nor a `%` that could hide one, has nothing to redact.
_QUERY_SECRET_HINTS: Final = (b"key", b"token", b"secret", b"passw", b"authorization", b"cookie")


def query_for_record(query: bytes, *, extra: frozenset[str] = frozenset()) -> str:
    """A raw query string as a record keeps it: `redact_query`'s result, computed only when a
    parameter could need it (the common query costs a decode and a few byte searches)."""
    # `find`, not `in`: `bytes in bytes` first tries the operand as an int, and formats the
    # TypeError it gets.
    text = query.decode("latin-1")
    if extra or query.find(b"%") >= 0:
        return redact_query(text, extra=extra)
    lower = query.lower()
    for hint in _QUERY_SECRET_HINTS:
        if lower.find(hint) >= 0:
            return redact_query(text)
    return text


# -- JSON ------------------------------------------------------------------------------------


def redact_json(document: Any, paths: Sequence[JsonPath]) -> Any:
    """A copy of a parsed JSON document with the values at `paths` replaced by "[redacted]"."""
    copied = copy.deepcopy(document)
    for path in paths:
        _redact_in_place(copied, path, 0)
    return copied


def _redact_in_place(node: Any, path: JsonPath, position: int) -> None:
    kind, argument = path[position]
    last = position == len(path) - 1
    if kind == _KEY:
        if isinstance(node, dict) and argument in node:
            _redact_child(node, argument, path, position, last)
    elif kind == _INDEX:
        if (
            isinstance(node, list)
            and isinstance(argument, int)
            and -len(node) <= argument < len(node)
        ):
            _redact_child(node, argument, path, position, last)
    elif kind == _EVERY:
        if isinstance(node, dict | list):
            keys = list(node) if isinstance(node, dict) else range(len(node))
            for key in keys:
                _redact_child(node, key, path, position, last)
    else:  # _DESCEND: this name here, and at every depth below
        if isinstance(node, dict):
            if argument in node:
                _redact_child(node, argument, path, position, last)
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return
        for child in children:
            if child is not REDACTED:
                _redact_in_place(child, path, position)


def _redact_child(container: Any, key: Any, path: JsonPath, position: int, last: bool) -> None:
    if last:
        container[key] = REDACTED
    else:
        _redact_in_place(container[key], path, position + 1)


# -- bodies ----------------------------------------------------------------------------------


def _is_json(content_type: str | None, body: bytes) -> bool:
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        return media == "application/json" or media.endswith("+json")
    head = body.lstrip()[:1]
    return head in (b"{", b"[")


def _is_form(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded"


def capture_body(
    body: bytes,
    *,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    json_paths: Sequence[JsonPath] = (),
    total: int | None = None,
) -> str:
    """A body as text for a record: redacted, and cut at `max_bytes` with a note of the rest.

    JSON bodies with `json_paths` are parsed, redacted and re-serialised (compact); when such a
    body is longer than `max_bytes` or is not valid JSON, it is replaced by a note, since what
    cannot be parsed cannot be redacted. Form bodies lose credentials' values like a query.
    Bytes that are not UTF-8 are kept as backslash escapes. `total`: the body's whole size
    when `body` holds only its first bytes (at least `max_bytes` of them, or all).
    """
    size = len(body) if total is None else max(total, len(body))
    if json_paths and _is_json(content_type, body):
        if size > max_bytes:
            return f"[{size} bytes of JSON not kept: over the {max_bytes}-byte capture cap]"
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return f"[{size} bytes not kept: not valid JSON, so not redactable]"
        for path in json_paths:
            _redact_in_place(document, path, 0)
        text = orjson.dumps(document).decode()
        return text if len(text) <= max_bytes else text[:max_bytes] + f"...[{size} bytes]"
    kept = body[:max_bytes].decode("utf-8", "backslashreplace")
    if _is_form(content_type):
        kept = redact_query(kept)
    if size > max_bytes:
        kept += f"...[{size - max_bytes} more bytes]"
    return kept
