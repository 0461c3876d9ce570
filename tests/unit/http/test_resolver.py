"""Resolver: a target's name is looked up once per TTL, not once per connection."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tollgate.clock import FakeClock
from tollgate.http.upstream import Resolver

TTL = 30.0


class CountingLookup:
    """Stands in for `loop.getaddrinfo`: answers 127.0.0.1 and counts the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.answer_empty = False

    async def __call__(self, host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append((host, port))
        if self.answer_empty:
            return []
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def lookups(monkeypatch: pytest.MonkeyPatch) -> CountingLookup:
    lookup = CountingLookup()
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", lookup)
    return lookup


async def test_resolver_looks_a_name_up_once_within_its_ttl(clock, lookups):
    resolver = Resolver(TTL, clock)
    for _ in range(3):
        infos = await resolver.resolve("backend.internal", 8080)
        clock.advance(TTL / 4)
    assert infos[0][4] == ("127.0.0.1", 8080)
    assert lookups.calls == [("backend.internal", 8080)]


async def test_resolver_looks_the_name_up_again_once_the_ttl_passed(clock, lookups):
    resolver = Resolver(TTL, clock)
    await resolver.resolve("backend.internal", 8080)
    clock.advance(TTL + 0.001)
    await resolver.resolve("backend.internal", 8080)
    assert len(lookups.calls) == 2


async def test_resolver_caches_each_name_and_port_apart(clock, lookups):
    resolver = Resolver(TTL, clock)
    for host, port in [("a.internal", 80), ("a.internal", 81), ("b.internal", 80)] * 2:
        await resolver.resolve(host, port)
    assert lookups.calls == [("a.internal", 80), ("a.internal", 81), ("b.internal", 80)]


async def test_resolver_with_ttl_zero_looks_up_every_time(clock, lookups):
    resolver = Resolver(0)
    await resolver.resolve("backend.internal", 8080)
    await resolver.resolve("backend.internal", 8080)
    assert len(lookups.calls) == 2


async def test_resolver_raises_oserror_for_a_name_without_addresses(clock, lookups):
    lookups.answer_empty = True
    with pytest.raises(OSError, match=r"no address for nowhere\.internal"):
        await Resolver(TTL, clock).resolve("nowhere.internal", 80)
