"""One request/response exchange as policies and the proxy see it.

Header names are kept as received (for forwarding) and lower-cased once (for lookups):
`headers` is a list of (lower_name, name, value) and `header_map` maps lower_name to the
first value, all bytes, so a policy's lookup is one dict access with no decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollgate.http.responses import GatewayResponse
    from tollgate.observe.tracing import TraceContext
    from tollgate.runtime.context import ConsumerEntry
    from tollgate.runtime.entries import CompiledRoute


class Exchange:
    """State of one call, from the request head to the log phase.

    Scalars start as class attributes and become instance attributes only when set, so making
    an Exchange per request costs four container allocations, not forty assignments.
    Policies add headers with `add_upstream_headers` / `add_response_headers`.
    """

    method = ""
    method_raw = b""
    raw_path = b""
    path = ""
    query = b""
    version = b"1.1"
    host = ""
    client_ip = ""
    keep_alive = True
    request_id = ""
    route: CompiledRoute | None = None
    params: Any = None
    upstream_path = b""
    consumer: ConsumerEntry | None = None
    credential_id = ""
    upstream_remove: set[bytes] | None = None
    policy_notes: dict[str, Any] | None = None
    # What policies decided that the call record keeps, e.g. {"rate-limit": "per-minute"}.
    outcomes: dict[str, Any] | None = None
    # Receive-side state, kept here so that pipelined requests queue with their bodies.
    body_buffer: list[bytes] | None = None
    buffered = 0
    request_complete = False
    request_chunked = False
    expect_continue = False
    upgrade = False
    discard = False
    response_started = False
    preset_response: GatewayResponse | None = None
    # Outcome and timing (monotonic seconds), captured at one clock read each.
    status = 0
    source = "gateway"
    error_type = ""
    upstream_target = ""
    tries = 0
    body_bytes = 0
    bytes_out = 0
    t_start = 0.0
    t_upstream_start = 0.0
    t_connected = 0.0
    t_first_byte = 0.0
    t_end = 0.0
    # What policies ask for: headers to add upstream and downstream (tuples until first added).
    upstream_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    response_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    # Header lines already serialised (`Name: value\r\n` each), sent after response_headers:
    # a policy that renders its fields from a template adds them in one piece.
    response_block = b""
    # Call-record captures, for services that opt in (None otherwise): the first bytes of the
    # request and response bodies, and the response's header pairs.
    capture_in: bytearray | None = None
    capture_out: bytearray | None = None
    captured_response_headers: list[tuple[bytes, bytes]] | None = None
    capture_limit = 0  # bytes of each body kept at most
    # The call's trace context when tracing is on (see tollgate.observe.tracing); None when off.
    trace: TraceContext | None = None

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.header_map: dict[bytes, bytes] = {}

    def add_upstream_headers(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Headers to send upstream in addition to the client's."""
        self.upstream_headers = [*self.upstream_headers, *pairs]

    def add_response_headers(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """Headers to add to the response the client gets."""
        self.response_headers = [*self.response_headers, *pairs]

    def add_response_block(self, block: bytes) -> None:
        """Serialised header lines (each `Name: value\r\n`) to add to the client's response."""
        self.response_block += block

    def note_outcome(self, policy: str, outcome: Any) -> None:
        """Keep what `policy` decided in the call record (`policies`)."""
        if self.outcomes is None:
            self.outcomes = {policy: outcome}
        else:
            self.outcomes[policy] = outcome

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
