"""key-auth: identify the caller by an API key.

The key is read from `Authorization: Bearer <key>` (OpenAI-style clients send it so), from the
configured headers, or from the query string; it is hashed with SHA-256 and looked up by
digest, so keys are never held in clear after load and the lookup is one dict access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from pydantic import Field

from tollgate.config.base import Model
from tollgate.http.responses import GatewayResponse, error_response
from tollgate.policies.base import Policy, register
from tollgate.runtime.context import CompileContext, Credential, hash_key

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

MISSING_KEY = "No API key found in request"
# Valid keys seen recently, so a known key costs one dict lookup instead of a SHA-256. The
# cache lives in the policy instance: a reload (new keys, removed consumers) starts it afresh.
CACHE_SIZE = 4096
INVALID_KEY = "Invalid authentication credentials"


class KeyAuthConfig(Model):
    key_names: list[str] = Field(
        default_factory=lambda: ["apikey", "x-api-key"],
        description="Header (and query parameter) names that may carry the key.",
    )
    bearer: bool = Field(True, description="Also accept `Authorization: Bearer <key>`.")
    key_in_header: bool = True
    key_in_query: bool = True
    hide_credentials: bool = Field(False, description="Do not forward the key upstream.")
    anonymous: str | None = Field(
        None, description="Consumer to use when no key is sent (invalid keys are still refused)."
    )
    realm: str = "tollgate"


@register
class KeyAuth(Policy):
    name = "key-auth"
    priority = 1250  # authentication runs before everything that needs a consumer
    Config = KeyAuthConfig
    # Client-sent identity headers are never trusted on an authenticated route.
    drops_request_headers = frozenset(
        {b"x-consumer-id", b"x-consumer-username", b"x-credential-identifier"}
    )

    def __init__(self, config: KeyAuthConfig, context: CompileContext) -> None:
        super().__init__(config, context)
        self._keys = context.consumers.by_key_digest
        self._recent: dict[bytes, Credential] = {}
        self._header_names = (
            tuple(n.lower().encode() for n in config.key_names) if config.key_in_header else ()
        )
        self._query_names = tuple(config.key_names) if config.key_in_query else ()
        self._bearer = config.bearer
        self._hide = config.hide_credentials
        if self._hide:
            hidden = set(self._header_names)
            if self._bearer:
                hidden.add(b"authorization")
            self.drops_request_headers = self.drops_request_headers | hidden
        self._anonymous = None
        if config.anonymous is not None:
            anonymous = context.consumers.by_name.get(config.anonymous)
            if anonymous is None:
                raise ValueError(f"anonymous consumer {config.anonymous!r} does not exist")
            self._anonymous = anonymous
        challenge = f'Key realm="{config.realm}"'.encode()
        self._challenge = [(b"WWW-Authenticate", challenge)]

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
            if self._anonymous is not None:
                ex.consumer = self._anonymous
                ex.add_upstream_headers(self._anonymous.upstream_headers)
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
        ex.consumer = credential.consumer
        ex.credential_id = credential.credential_id
        if ex.upstream_headers:
            ex.add_upstream_headers(credential.consumer.upstream_headers)
        else:
            ex.upstream_headers = credential.consumer.upstream_headers
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
