"""One request/response exchange as policies and the proxy see it.

Header names are kept as received (for forwarding) and lower-cased once (for lookups):
`headers` is a list of (lower_name, name, value) and `header_map` maps lower_name to the
first value, all bytes, so a policy's lookup is one dict access with no decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollgate.http.responses import GatewayResponse
    from tollgate.runtime.runtime import CompiledRoute, ConsumerEntry


class Exchange:
    """State of one call, from the request head to the log phase."""

    __slots__ = (
        "body_buffer",
        "body_bytes",
        "buffered",
        "bytes_out",
        "client_ip",
        "consumer",
        "credential_id",
        "discard",
        "error_type",
        "expect_continue",
        "header_map",
        "headers",
        "host",
        "keep_alive",
        "method",
        "method_raw",
        "params",
        "path",
        "policy_notes",
        "preset_response",
        "query",
        "raw_path",
        "request_chunked",
        "request_complete",
        "request_id",
        "response_headers",
        "response_started",
        "route",
        "source",
        "status",
        "t_connected",
        "t_end",
        "t_first_byte",
        "t_start",
        "t_upstream_start",
        "tries",
        "upgrade",
        "upstream_headers",
        "upstream_path",
        "upstream_remove",
        "upstream_target",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.method_raw = b""
        # Receive-side state, kept here so that pipelined requests queue with their bodies.
        self.body_buffer: list[bytes] | None = None
        self.buffered = 0
        self.request_complete = False
        self.request_chunked = False
        self.expect_continue = False
        self.upgrade = False
        self.discard = False
        self.response_started = False
        self.preset_response: GatewayResponse | None = None
        self.raw_path = b""
        self.path = ""
        self.query = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.header_map: dict[bytes, bytes] = {}
        self.host = ""
        self.client_ip = ""
        self.keep_alive = True
        self.request_id = ""
        self.route: CompiledRoute | None = None
        self.params: Any = None
        self.upstream_path = b""
        self.consumer: ConsumerEntry | None = None
        self.credential_id = ""
        # What policies ask for: headers to add / remove upstream, headers to add downstream.
        self.upstream_headers: list[tuple[bytes, bytes]] = []
        self.upstream_remove: set[bytes] | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.policy_notes: dict[str, Any] | None = None
        # Outcome and timing (monotonic seconds), captured at one clock read each.
        self.status = 0
        self.source = "gateway"
        self.error_type = ""
        self.upstream_target = ""
        self.tries = 0
        self.body_bytes = 0
        self.bytes_out = 0
        self.t_start = 0.0
        self.t_upstream_start = 0.0
        self.t_connected = 0.0
        self.t_first_byte = 0.0
        self.t_end = 0.0

    def header(self, lower_name: bytes) -> bytes | None:
        """The first value of a header (name given lower-case), or None."""
        return self.header_map.get(lower_name)

    def remove_upstream_header(self, lower_name: bytes) -> None:
        """Do not forward this request header upstream (e.g. a credential)."""
        if self.upstream_remove is None:
            self.upstream_remove = {lower_name}
        else:
            self.upstream_remove.add(lower_name)

    def __repr__(self) -> str:
        return (
            f"Exchange({self.method} {self.raw_path!r} id={self.request_id} "
            f"status={self.status} source={self.source})"
        )
