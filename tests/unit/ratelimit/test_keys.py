"""Limit keys: the parts of `by`, and the client address behind trusted proxies."""

from __future__ import annotations

import re

import pytest

from tollgate.http.exchange import Exchange
from tollgate.ratelimit.keys import KeyBuilder, TrustedProxies, check_key_spec, parse_networks
from tollgate.runtime.context import ConsumerEntry

NO_PROXIES = TrustedProxies([])
PROXIES = TrustedProxies(["10.0.0.0/8", "fd00::/8"])


def exchange(
    peer: str = "203.0.113.7",
    headers: list[tuple[str, str]] | None = None,
    *,
    path: str = "/orders",
    consumer: str | None = None,
    credential_id: str = "",
) -> Exchange:
    ex = Exchange()
    ex.client_ip = peer
    ex.path = path
    for name, value in headers or []:
        lower = name.lower().encode()
        ex.headers.append((lower, name.encode(), value.encode("latin-1")))
        ex.header_map.setdefault(lower, value.encode("latin-1"))
    if consumer is not None:
        ex.consumer = ConsumerEntry(consumer, consumer, None, (), ())
    ex.credential_id = credential_id
    return ex


def key(by: list[str], ex: Exchange, proxies: TrustedProxies = NO_PROXIES) -> str:
    return KeyBuilder(by, service="api", route="main", proxies=proxies)(ex)


# -- the client address --------------------------------------------------------------------


def test_without_trusted_proxies_the_client_is_the_socket_peer_whatever_it_forwards() -> None:
    ex = exchange("203.0.113.7", [("X-Forwarded-For", "198.51.100.1")])
    assert NO_PROXIES.client_ip(ex) == "203.0.113.7"


def test_a_spoofed_forwarded_for_from_an_untrusted_client_is_ignored() -> None:
    ex = exchange("203.0.113.7", [("X-Forwarded-For", "10.1.1.1, 198.51.100.1")])
    assert PROXIES.client_ip(ex) == "203.0.113.7"


def test_behind_a_trusted_proxy_the_client_is_the_address_it_reports() -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "198.51.100.1")])
    assert PROXIES.client_ip(ex) == "198.51.100.1"


def test_the_walk_goes_from_the_right_and_skips_every_trusted_hop() -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "198.51.100.1, 10.9.9.9, 10.0.0.3")])
    assert PROXIES.client_ip(ex) == "198.51.100.1"


def test_what_a_client_wrote_itself_before_the_proxy_appended_is_never_read() -> None:
    # The client sent `X-Forwarded-For: 192.0.2.66`; the proxy appended the real address.
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "192.0.2.66, 198.51.100.1")])
    assert PROXIES.client_ip(ex) == "198.51.100.1"


def test_when_every_hop_is_trusted_the_client_is_the_leftmost() -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "10.5.5.5, 10.0.0.3")])
    assert PROXIES.client_ip(ex) == "10.5.5.5"


def test_several_forwarded_for_lines_are_read_as_one_list_in_order() -> None:
    headers = [("X-Forwarded-For", "192.0.2.66"), ("x-forwarded-for", "198.51.100.1, 10.0.0.3")]
    assert PROXIES.client_ip(exchange("10.0.0.2", headers)) == "198.51.100.1"


def test_a_hop_that_is_not_an_address_ends_the_walk_at_the_last_trusted_report() -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "198.51.100.1, unknown, 10.0.0.3")])
    assert PROXIES.client_ip(ex) == "10.0.0.3"


def test_a_trusted_peer_without_forwarded_for_is_the_client() -> None:
    assert PROXIES.client_ip(exchange("10.0.0.2")) == "10.0.0.2"


@pytest.mark.parametrize(
    ("hop", "client"),
    [
        ("198.51.100.1:4711", "198.51.100.1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),
    ],
)
def test_hops_with_ports_brackets_or_other_spellings_are_normalised(hop: str, client: str) -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", hop)])
    assert PROXIES.client_ip(ex) == client


def test_an_ipv4_mapped_peer_is_matched_against_ipv4_networks() -> None:
    ex = exchange("::ffff:10.0.0.2", [("X-Forwarded-For", "198.51.100.1")])
    assert PROXIES.client_ip(ex) == "198.51.100.1"


def test_ipv6_proxies_are_trusted_by_their_network() -> None:
    ex = exchange("fd00::5", [("X-Forwarded-For", "2001:db8::7")])
    assert PROXIES.client_ip(ex) == "2001:db8::7"


def test_invalid_networks_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33' is not an address or a CIDR")):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


def test_a_bare_address_is_a_network_of_one() -> None:
    proxies = TrustedProxies(["192.0.2.1"])
    assert proxies.trusts("192.0.2.1")
    assert not proxies.trusts("192.0.2.2")


# -- key parts -----------------------------------------------------------------------------


def test_consumer_keys_name_the_consumer() -> None:
    assert key(["consumer"], exchange(consumer="acme")) == "consumer=acme"


def test_an_anonymous_request_falls_back_to_the_client_address() -> None:
    assert key(["consumer"], exchange("203.0.113.7")) == "ip=203.0.113.7"


def test_credential_keys_name_the_credential_or_fall_back_to_the_address() -> None:
    assert key(["credential"], exchange(credential_id="key-0a1b2c")) == "credential=key-0a1b2c"
    assert key(["credential"], exchange("203.0.113.7")) == "ip=203.0.113.7"


def test_ip_keys_use_the_trusted_proxy_walk() -> None:
    ex = exchange("10.0.0.2", [("X-Forwarded-For", "198.51.100.1")])
    assert key(["ip"], ex, PROXIES) == "ip=198.51.100.1"
    assert key(["ip"], ex) == "ip=10.0.0.2"


def test_header_keys_use_the_first_value_and_a_missing_header_falls_back_to_the_address() -> None:
    ex = exchange(headers=[("X-Tenant", "blue"), ("X-Tenant", "red")])
    assert key(["header:X-Tenant"], ex) == "header:x-tenant=blue"
    assert key(["header:X-Tenant"], exchange("203.0.113.7")) == "ip=203.0.113.7"


def test_route_service_global_and_path_keys() -> None:
    ex = exchange(path="/orders/42")
    assert key(["route"], ex) == "route=api/main"
    assert key(["service"], ex) == "service=api"
    assert key(["global"], ex) == "global"
    assert key(["path"], ex) == "path=/orders/42"


def test_a_compound_key_joins_its_parts_in_order() -> None:
    ex = exchange("203.0.113.7", [("X-Tenant", "blue")], consumer="acme")
    assert key(["consumer", "header:x-tenant"], ex) == "consumer=acme|header:x-tenant=blue"


def test_free_form_values_cannot_forge_another_compound_key() -> None:
    # Without escaping, both would read `header:x-a=1|header:x-b=2|header:x-b=3`.
    first = exchange(headers=[("X-A", "1|header:x-b=2"), ("X-B", "3")])
    second = exchange(headers=[("X-A", "1"), ("X-B", "2|header:x-b=3")])
    by = ["header:X-A", "header:X-B"]
    assert key(by, first) != key(by, second)


def test_escaping_keeps_different_paths_apart() -> None:
    assert key(["path"], exchange(path="/a|b")) != key(["path"], exchange(path="/a%7Cb"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("header", "header needs a name"),
        ("header:", "header needs a name"),
        ("header:X Tenant", "is not a header name"),
        ("consumers", "is not a key part"),
        ("ip:1", "is not a key part"),
    ],
)
def test_key_specs_are_checked(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_key_spec(spec)
