"""key-auth: identify the caller by an API key.

The key is read from `Authorization: Bearer <key>` (OpenAI-style clients send it so), from the
configured headers, or from the query string; it is hashed with SHA-256 and looked up by
digest, so keys are never held in clear after load and the lookup is one dict access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import Field

from tollgate.config.base import Model
from tollgate.http.responses import GatewayResponse
from tollgate.policies.base import Policy, register
from tollgate.policies.key_lookup import KeyLookup
from tollgate.runtime.context import CompileContext

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange


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
        header_names = (
            tuple(n.lower().encode() for n in config.key_names) if config.key_in_header else ()
        )
        if config.hide_credentials:
            hidden = set(header_names)
            if config.bearer:
                hidden.add(b"authorization")
            self.drops_request_headers = self.drops_request_headers | hidden
        anonymous = None
        if config.anonymous is not None:
            anonymous = context.consumers.by_name.get(config.anonymous)
            if anonymous is None:
                raise ValueError(f"anonymous consumer {config.anonymous!r} does not exist")
        self.lookup = KeyLookup(
            context.consumers.by_key_digest,
            header_names,
            tuple(config.key_names) if config.key_in_query else (),
            bearer=config.bearer,
            hide=config.hide_credentials,
            anonymous=anonymous,
            realm=config.realm,
        )

    def handler(self, phase: str) -> Callable[..., Any]:
        if phase == "access":
            return self.lookup.access  # compiled: no interpreted call on the request path
        return super().handler(phase)

    def access(self, ex: Exchange) -> GatewayResponse | None:
        return self.lookup.access(ex)
