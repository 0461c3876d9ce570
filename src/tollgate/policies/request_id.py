"""request-id: how the request id is named, made and echoed.

Without this policy every call still gets an id: the client's `X-Request-Id` if it sent one,
otherwise a fresh one, sent upstream and back (DESIGN §4). This policy changes the header name,
makes ids UUID4 instead of the default 128-bit process-unique counter ids, can distrust
client-sent ids, and can stop echoing the id to the client.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tollgate.config.base import Model
from tollgate.http.ids import acceptable_incoming_id, next_request_id
from tollgate.policies.base import Policy, register
from tollgate.runtime.context import CompileContext

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange


class RequestIdConfig(Model):
    header_name: str = Field("X-Request-Id", description="Header carrying the id both ways.")
    generator: Literal["uuid4", "counter"] = Field(
        "uuid4", description="uuid4, or counter (a random process prefix + a counter; cheaper)."
    )
    trust_incoming: bool = Field(True, description="Keep an id the client sent.")
    echo_downstream: bool = Field(True, description="Send the id back to the client.")


@register
class RequestId(Policy):
    name = "request-id"
    priority = 100000  # first: every later policy and error already carries the id
    Config = RequestIdConfig

    def __init__(self, config: RequestIdConfig, context: CompileContext) -> None:
        super().__init__(config, context)
        self._lower = config.header_name.lower().encode()
        self.header_name = config.header_name.encode()
        self.drops_request_headers = frozenset({self._lower, b"x-request-id"})
        self.echo = config.echo_downstream

    def access(self, ex: Exchange) -> None:
        incoming = ex.header_map.get(self._lower) if self.config.trust_incoming else None
        if incoming is not None and acceptable_incoming_id(incoming):
            ex.request_id = incoming.decode("ascii")
        elif self.config.generator == "uuid4":
            ex.request_id = str(uuid.uuid4())
        else:
            ex.request_id = next_request_id()
        return None
