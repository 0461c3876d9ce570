"""Header rules of a proxy (RFC 9110 §7.6): what is hop-by-hop, what the gateway rewrites."""

from __future__ import annotations

from typing import Final

# Hop-by-hop: meaningful only for one connection, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Request headers the gateway always writes itself, so the client's copies are dropped.
REWRITTEN_REQUEST: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-request-id",
        b"via",
    }
)

REQUEST_DROP: Final = HOP_BY_HOP | REWRITTEN_REQUEST

# Response headers dropped before the client gets them; framing is re-decided per client.
RESPONSE_DROP: Final = HOP_BY_HOP

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a `Connection` header (they are hop-by-hop too)."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


# Tokens of `Connection` that name no header and need no extra work.
PLAIN_CONNECTION_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})

# Whole `Connection` values that list no other header (the common ones), checked before parsing.
PLAIN_CONNECTION_VALUES: Final = frozenset(
    {b"keep-alive", b"close", b"upgrade", b"keep-alive, upgrade"}
)
