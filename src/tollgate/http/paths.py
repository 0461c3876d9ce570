"""Request-target normalisation (RFC 3986 §6.2.2), so routing sees one spelling of a path.

Percent-encoded unreserved characters are decoded, dot segments removed and repeated slashes
merged; encoded `/`, `?`, `%` and other reserved characters stay encoded. The normalised path
is also what is sent upstream, so the route that matched is the resource the upstream serves.
"""

from __future__ import annotations

import re
from typing import Final

_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_PERCENT: Final = re.compile(r"%([0-9A-Fa-f]{2})")


class InvalidPath(ValueError):
    pass


def _decode_unreserved(match: re.Match[str]) -> str:
    value = int(match.group(1), 16)
    if value in _UNRESERVED:
        return chr(value)
    return "%" + match.group(1).upper()


def normalize_path(path: str) -> str:
    """The normalised form of an origin-form path; raises InvalidPath for what cannot be a path."""
    if not path.startswith("/"):
        raise InvalidPath("the request target must start with /")
    if "%" in path:
        if re.search(r"%(?![0-9A-Fa-f]{2})", path):
            raise InvalidPath("invalid percent-encoding in the path")
        path = _PERCENT.sub(_decode_unreserved, path)
    if "/." not in path and "//" not in path:
        return path
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        elif segment == "" and not last:
            continue  # merge repeated slashes
        else:
            output.append(segment)
    return "/" + "/".join(output)
