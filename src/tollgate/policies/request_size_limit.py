"""request-size-limit: refuse request bodies larger than a route allows (413).

A declared `Content-Length` over the limit is refused before anything is read; a chunked body
is counted as it streams, and the listener stops it (413, connection closed) at the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from tollgate.config.base import Model
from tollgate.config.units import Size
from tollgate.http.responses import GatewayResponse, error_response
from tollgate.policies.base import Policy, register
from tollgate.runtime.context import CompileContext

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange


class RequestSizeLimitConfig(Model):
    max_body_size: Size = Field(description="Largest request body accepted, e.g. 1mb.")
    require_content_length: bool = Field(
        False, description="Refuse bodies without a Content-Length (411)."
    )


@register
class RequestSizeLimit(Policy):
    name = "request-size-limit"
    priority = 951
    Config = RequestSizeLimitConfig

    def __init__(self, config: RequestSizeLimitConfig, context: CompileContext) -> None:
        super().__init__(config, context)
        self.max_body_size = config.max_body_size
        self._message = f"Request body is larger than {config.max_body_size} bytes"

    def access(self, ex: Exchange) -> GatewayResponse | None:
        declared = ex.header_map.get(b"content-length")
        if declared is not None:
            if int(declared) > self.max_body_size:
                return error_response(413, "request_body_too_large", self._message, ex.request_id)
        elif self.config.require_content_length and b"transfer-encoding" in ex.header_map:
            return error_response(
                411, "length_required", "A Content-Length header is required", ex.request_id
            )
        return None
