"""Whom a limit counts: the limit key of a request, and the client address behind proxies.

A key is built from one or more parts (`by` in the `rate-limit` policy):

| part | the request's | when absent |
|---|---|---|
| `consumer` | consumer name (set by an authentication policy) | the client address |
| `credential` | credential id (which API key) | the client address |
| `ip` | client address (see `TrustedProxies`) | - |
| `route`, `service` | route (service/route), service name | - |
| `header:NAME` | first value of header NAME | the client address |
| `path` | normalised path | - |
| `global` | nothing: one counter for every request | - |

Parts render as `kind=value` and a compound key joins them with `|`; the free-form values
(headers, paths) have `%` and `|` escaped, so two different requests never make the same key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollgate.http.exchange import Exchange

KEY_KINDS = ("consumer", "credential", "ip", "route", "service", "header", "path", "global")

# Addresses whose trust was looked up recently, so a busy proxy costs one dict lookup per
# request instead of an address parse and a scan of the networks. Cleared when full.
TRUST_CACHE_SIZE = 4096
# Consumers whose key part is kept ready, per key builder. Cleared when full.
NAME_CACHE_SIZE = 4096

_FORWARDED_FOR = b"x-forwarded-for"

# Characters of a header name (RFC 9110 token).
_TOKEN_CHARACTERS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

KeyPart = Callable[["Exchange"], str]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_key_spec(spec: str) -> str:
    """`spec` if it names a key part (`consumer`, `header:X-Tenant`...); ValueError if not."""
    kind, colon, argument = spec.partition(":")
    if kind == "header":
        if not colon or not argument:
            raise ValueError("header needs a name: header:NAME (e.g. header:X-Tenant)")
        if not set(argument) <= _TOKEN_CHARACTERS:
            raise ValueError(f"{argument!r} is not a header name")
        return spec
    if kind not in KEY_KINDS or colon:
        raise ValueError(
            f"{spec!r} is not a key part; use one of consumer, credential, ip, route, service, "
            "header:NAME, path, global"
        )
    return spec


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """Networks from CIDRs (`10.0.0.0/8`, `::1`); ValueError naming the first invalid one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an address or a CIDR (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in a peer name or an X-Forwarded-For hop (`1.2.3.4`, `1.2.3.4:80`,
    `[::1]:80`, `::ffff:1.2.3.4` read as IPv4), or None if there is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The client address of a request, believing X-Forwarded-For only from trusted proxies.

    The socket's peer is the client unless it is a trusted proxy. If it is, X-Forwarded-For (all
    its lines, in order) is walked from the right, the hops nearest the gateway first: each
    address a trusted hop reports is taken, until one that is not trusted, which is the client.
    A client cannot choose its address by sending X-Forwarded-For itself: its entries sit left
    of the first untrusted address and are never read. A hop that is not an address ends the
    walk at the last address a trusted hop reported.
    """

    __slots__ = ("_networks", "_trusted")

    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = parse_networks(cidrs)
        self._trusted: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        """Whether `address` (as the socket or a hop gives it) is a trusted proxy."""
        trusted = self._trusted.get(address)
        if trusted is None:
            parsed = _parse_address(address)
            trusted = parsed is not None and any(parsed in network for network in self._networks)
            if len(self._trusted) >= TRUST_CACHE_SIZE:
                self._trusted.clear()
            self._trusted[address] = trusted
        return trusted

    def client_ip(self, ex: Exchange) -> str:
        peer = ex.client_ip
        if not self._networks or not self.trusts(peer):
            return peer
        hops = [
            hop
            for lower_name, _, value in ex.headers
            if lower_name == _FORWARDED_FOR
            for hop in value.decode("latin-1").split(",")
        ]
        client = peer
        for hop in reversed(hops):
            address = _parse_address(hop)
            if address is None:
                break
            client = str(address)
            if not self.trusts(client):
                break
        return client

    def __repr__(self) -> str:
        return f"TrustedProxies({', '.join(str(n) for n in self._networks) or 'none'})"


def _escape(value: str) -> str:
    if "%" in value:
        value = value.replace("%", "%25")
    if "|" in value:
        value = value.replace("|", "%7C")
    return value


class KeyBuilder:
    """Builds a request's limit key from the parts of `by`, prepared once per policy."""

    __slots__ = ("_parts", "_spec", "proxies")

    def __init__(
        self, by: Sequence[str], *, service: str, route: str, proxies: TrustedProxies
    ) -> None:
        if not by:
            raise ValueError("a key needs at least one part")
        self._spec = tuple(check_key_spec(spec) for spec in by)
        self.proxies = proxies
        self._parts = tuple(self._part(spec, service, route) for spec in self._spec)

    def __call__(self, ex: Exchange) -> str:
        parts = self._parts
        if len(parts) == 1:
            return parts[0](ex)
        return "|".join([part(ex) for part in parts])

    def _ip(self, ex: Exchange) -> str:
        return "ip=" + self.proxies.client_ip(ex)

    def _part(self, spec: str, service: str, route: str) -> KeyPart:
        ip = self._ip
        if spec == "consumer":
            # Each consumer's key made once: the same string object (its hash kept) for every
            # request, where a concatenation per request made and hashed a new one.
            keys: dict[str, str] = {}

            def consumer(ex: Exchange) -> str:
                entry = ex.consumer
                if entry is None:
                    return ip(ex)
                name = entry.name
                key = keys.get(name)
                if key is None:
                    if len(keys) >= NAME_CACHE_SIZE:
                        keys.clear()
                    key = keys[name] = "consumer=" + name
                return key

            return consumer
        if spec == "credential":

            def credential(ex: Exchange) -> str:
                return "credential=" + ex.credential_id if ex.credential_id else ip(ex)

            return credential
        if spec == "ip":
            return ip
        if spec.startswith("header:"):
            name = spec.partition(":")[2]
            lower = name.lower().encode("ascii")
            prefix = f"header:{name.lower()}="

            def header(ex: Exchange) -> str:
                value = ex.header_map.get(lower)
                return ip(ex) if value is None else prefix + _escape(value.decode("latin-1"))

            return header
        if spec == "path":

            def path(ex: Exchange) -> str:
                return "path=" + _escape(ex.path)

            return path
        constant = {
            "route": f"route={service}/{route}",
            "service": f"service={service}",
            "global": "global",
        }[spec]

        def fixed(ex: Exchange) -> str:
            return constant

        return fixed

    def __repr__(self) -> str:
        return f"KeyBuilder(by={list(self._spec)}, {self.proxies!r})"
