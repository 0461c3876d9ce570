"""What the request path reads of a route, its upstream group and its targets, compiled.

Built by `tollgate.runtime.runtime` when a config is compiled, and read by the listener on
every request. These classes live apart from the compiler so that they can be compiled with
the request path (setup.py): a compiled listener then reads their fields as native struct
members, where an interpreted class costs a generic attribute look-up (a type-dict search
and a slot read) for each of the dozen fields a proxied request reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tollgate.http.upstream import Pool
from tollgate.observe.redaction import CapturePolicy
from tollgate.policies.base import Policy
from tollgate.upstream.balancers import Balancer

__all__ = ["CompiledRoute", "TargetEntry", "UpstreamGroup"]


@dataclass(slots=True)
class TargetEntry:
    url: str
    scheme: str
    host: str
    port: int
    host_header: bytes  # what `Host` carries upstream unless the route preserves the client's
    weight: int
    pool: Pool

    def __repr__(self) -> str:
        return f"TargetEntry({self.url}, weight={self.weight})"


@dataclass(slots=True)
class UpstreamGroup:
    name: str
    targets: tuple[TargetEntry, ...]
    balancer: Balancer
    hash_on: str
    retries: int
    needs_key: bool  # only consistent hashing looks at a per-request key

    def __repr__(self) -> str:
        return f"UpstreamGroup({self.name}, {len(self.targets)} targets, {self.balancer!r})"


@dataclass(slots=True, eq=False)
class CompiledRoute:
    """Everything the request path needs for one route, computed once."""

    name: str
    service: str
    upstream: UpstreamGroup
    access: tuple[Callable[..., Any], ...]
    upstream_response: tuple[Callable[..., Any], ...]
    body: tuple[Callable[..., Any], ...]
    log: tuple[Callable[..., Any], ...]
    policies: tuple[Policy, ...]
    drop_request_headers: frozenset[bytes]  # never forwarded (hop-by-hop, rewritten, credentials)
    preserve_host: bool
    service_path: bytes
    max_body_size: int
    request_id_header: bytes
    echo_request_id: bool
    # The id header's lower-case name when a request-id policy renamed it, else b"": the
    # upstream's copy of that header is then replaced, and its X-Request-Id passed on.
    custom_request_id: bytes = b""
    # What the service's call records capture; None: nothing beyond the defaults.
    capture: CapturePolicy | None = None

    def __repr__(self) -> str:
        return f"CompiledRoute({self.service}/{self.name} -> {self.upstream.name})"
