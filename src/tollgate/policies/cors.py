"""cors: answer CORS preflights at the gateway and add CORS headers to actual responses.

Origins are `*`, exact (`https://app.example.com`) or a regex prefixed with `~`. A preflight
(`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered 204 by the gateway
and never reaches the upstream, unless `preflight_continue` is set.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from tollgate.config.base import Model
from tollgate.config.units import Duration
from tollgate.http.responses import GatewayResponse
from tollgate.policies.base import Policy, register
from tollgate.runtime.context import CompileContext

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange


class CorsConfig(Model):
    origins: list[str] = Field(
        default_factory=lambda: ["*"], description="Allowed origins: *, exact, or ~regex."
    )
    methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"]
    )
    headers: list[str] | None = Field(
        None, description="Allowed request headers; default: those the preflight asks for."
    )
    exposed_headers: list[str] = Field(default_factory=list)
    credentials: bool = Field(False, description="Send Access-Control-Allow-Credentials: true.")
    max_age: Duration | None = Field(3600.0, description="How long a preflight may be cached.")
    preflight_continue: bool = Field(False, description="Proxy preflights to the upstream.")

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin.startswith("~"):
                try:
                    re.compile(origin[1:])
                except re.error as exc:
                    raise ValueError(f"{origin!r}: invalid regex: {exc}") from None
        return value


@register
class Cors(Policy):
    name = "cors"
    priority = 2000  # before authentication: a preflight carries no credentials
    Config = CorsConfig

    def __init__(self, config: CorsConfig, context: CompileContext) -> None:
        super().__init__(config, context)
        self._any = "*" in config.origins
        self._exact = frozenset(o.encode() for o in config.origins if not o.startswith("~"))
        self._patterns = tuple(re.compile(o[1:]) for o in config.origins if o.startswith("~"))
        self._methods = ", ".join(m.upper() for m in config.methods).encode()
        self._headers = ", ".join(config.headers).encode() if config.headers is not None else None
        self._exposed = ", ".join(config.exposed_headers).encode()
        self._max_age = str(int(config.max_age)).encode() if config.max_age is not None else None

    def _allow_origin(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for this origin, or None if not allowed."""
        if self._any and not self.config.credentials:
            return b"*"
        if self._any or origin in self._exact:
            return origin
        text = origin.decode("latin-1")
        for pattern in self._patterns:
            if pattern.fullmatch(text):
                return origin
        return None

    def access(self, ex: Exchange) -> GatewayResponse | None:
        origin = ex.header_map.get(b"origin")
        if origin is None:
            return None
        allowed = self._allow_origin(origin)
        headers: list[tuple[bytes, bytes]] = []
        if allowed is not None:
            headers.append((b"Access-Control-Allow-Origin", allowed))
            if self.config.credentials:
                headers.append((b"Access-Control-Allow-Credentials", b"true"))
        if allowed != b"*":
            headers.append((b"Vary", b"Origin"))
        preflight = ex.method == "OPTIONS" and b"access-control-request-method" in ex.header_map
        if preflight and not self.config.preflight_continue:
            if allowed is not None:
                headers.append((b"Access-Control-Allow-Methods", self._methods))
                requested = ex.header_map.get(b"access-control-request-headers")
                allow_headers = self._headers if self._headers is not None else requested
                if allow_headers:
                    headers.append((b"Access-Control-Allow-Headers", allow_headers))
                if self._max_age is not None:
                    headers.append((b"Access-Control-Max-Age", self._max_age))
            return GatewayResponse(204, b"", headers, content_type=None)
        if allowed is not None and self._exposed:
            headers.append((b"Access-Control-Expose-Headers", self._exposed))
        ex.add_response_headers(headers)
        return None
