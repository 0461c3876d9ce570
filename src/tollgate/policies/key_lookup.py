"""key-auth's request path: find the key a request carries, and its credential.

`tollgate.policies.key_auth` validates the config and builds a `KeyLookup` once per route;
this module is all that runs per request, and it is compiled with the rest of the request
path (setup.py), which is why it holds no config models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, urlencode

from tollgate.http.responses import GatewayResponse, error_response
from tollgate.runtime.context import ConsumerEntry, Credential, hash_key

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

MISSING_KEY: Final = "No API key found in request"
INVALID_KEY: Final = "Invalid authentication credentials"
# Valid keys seen recently, so a known key costs one dict lookup instead of a SHA-256. The
# cache lives in the lookup: a reload (new keys, removed consumers) starts it afresh.
CACHE_SIZE: Final = 4096


class KeyLookup:
    """Identifies each request of a route by its API key, or refuses it with 401."""

    __slots__ = (
        "_anonymous",
        "_bearer",
        "_challenge",
        "_header_names",
        "_hide",
        "_keys",
        "_query_names",
        "_recent",
    )

    def __init__(
        self,
        keys: dict[bytes, Credential],
        header_names: tuple[bytes, ...],
        query_names: tuple[str, ...],
        *,
        bearer: bool,
        hide: bool,
        anonymous: ConsumerEntry | None,
        realm: str,
    ) -> None:
        self._keys = keys
        self._recent: dict[bytes, Credential] = {}
        self._header_names = header_names
        self._query_names = query_names
        self._bearer = bearer
        self._hide = hide
        self._anonymous = anonymous
        self._challenge = [(b"WWW-Authenticate", f'Key realm="{realm}"'.encode())]

    def access(self, ex: Exchange) -> GatewayResponse | None:
        key: bytes | None = None
        header_map = ex.header_map
        if self._bearer:
            auth = header_map.get(b"authorization")
            if auth is not None and auth[:7].lower() == b"bearer ":
                key = auth[7:].strip()
        if key is None:
            for name in self._header_names:
                key = header_map.get(name)
                if key is not None:
                    break
        if key is None and self._query_names and ex.query:
            key = self._from_query(ex)
        if not key:
            anonymous = self._anonymous
            if anonymous is not None:
                ex.consumer = anonymous
                ex.add_upstream_headers(anonymous.upstream_headers)
                return None
            return self._reject(ex, MISSING_KEY)
        credential = self._recent.get(key)
        if credential is None:
            credential = self._keys.get(hash_key(key))
            if credential is None:
                return self._reject(ex, INVALID_KEY)
            if len(self._recent) >= CACHE_SIZE:
                self._recent.clear()
            self._recent[key] = credential
        consumer = credential.consumer
        ex.consumer = consumer
        ex.credential_id = credential.credential_id
        if ex.upstream_headers:
            ex.add_upstream_headers(consumer.upstream_headers)
        else:
            ex.upstream_headers = consumer.upstream_headers
        return None

    def _from_query(self, ex: Exchange) -> bytes | None:
        pairs = parse_qsl(ex.query.decode("latin-1"), keep_blank_values=True)
        found: bytes | None = None
        for name, value in pairs:
            if name in self._query_names:
                found = value.encode("latin-1")
                break
        if found is not None and self._hide:
            kept = [(n, v) for n, v in pairs if n not in self._query_names]
            ex.query = urlencode(kept).encode("latin-1")
        return found

    def _reject(self, ex: Exchange, message: str) -> GatewayResponse:
        return error_response(401, "unauthorized", message, ex.request_id, list(self._challenge))

    def __repr__(self) -> str:
        return f"KeyLookup(keys={len(self._keys)}, headers={self._header_names!r})"
