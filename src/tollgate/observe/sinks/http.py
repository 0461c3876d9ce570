"""Call records POSTed as a JSON array per batch, to a log collector or any HTTP endpoint.

The body is `[record, ...]` with `record_to_json`'s objects, `Content-Type: application/json`,
plus the headers the owner configures (a collector's token, say).

`http.client` from the standard library, on one kept-alive connection: the sink runs in the
pipeline's writer thread, which has no event loop, and a blocking client there is the whole
job. aiohttp would need a loop of its own in that thread for one request every 200 ms at
most. The connection is dropped and reopened after any error.

What the answer means: 2xx, written. 408, 429 and 5xx, or no answer (refused, reset,
timeout): `SinkError`, and the pipeline retries the batch with exponential backoff, honouring
a `Retry-After` given in seconds. Any other 4xx: `PermanentSinkError`, as the same payload
would be refused again. Retrying lives in the pipeline, not here, so that a sink never sleeps
in the thread the other sinks share.
"""

from __future__ import annotations

import http.client
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

import orjson

from tollgate.observe.records import RecordRow, record_to_dict
from tollgate.observe.sinks import PermanentSinkError, Sink, SinkError

__all__ = ["HttpSink"]

# Per request, connect and each read: a collector that takes longer is treated as down.
DEFAULT_TIMEOUT_S: Final = 10.0
_RETRYABLE: Final = frozenset({408, 429})


class HttpSink(Sink):
    name = "http"

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HTTP sink URL {url!r}: use http://host[:port]/path or https://")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._connection = kind(self._host, self._port, timeout=self._timeout)
        return self._connection

    def write(self, batch: Sequence[RecordRow]) -> None:
        body = orjson.dumps([record_to_dict(record) for record in batch])
        try:
            connection = self._connect()
            connection.request("POST", self._target, body=body, headers=self._headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise SinkError(f"POST {self.url}: {exc!r}") from exc
        status = response.status
        if response.will_close:
            self._drop_connection()
        if 200 <= status < 300:
            return
        message = f"POST {self.url}: {status} {response.reason}"
        if status in _RETRYABLE or status >= 500:
            raise SinkError(message, retry_after=_retry_after(response.getheader("Retry-After")))
        raise PermanentSinkError(message)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        self._drop_connection()

    def __repr__(self) -> str:
        return f"HttpSink({self.url!r})"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` of delta-seconds; None for a date or nonsense."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
