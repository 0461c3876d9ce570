"""What a policy may see while it is compiled: the consumers, the clock, where it sits, and
the node's shared store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tollgate.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from tollgate.config.schema import Consumer, Plan
    from tollgate.ratelimit.redis_store import RedisStore
    from tollgate.ratelimit.store import Store


@dataclass(frozen=True, slots=True)
class ConsumerEntry:
    """A consumer as the request path needs it: names pre-encoded for headers."""

    name: str
    id: str
    plan: str | None
    tags: tuple[str, ...]
    upstream_headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def from_config(cls, consumer: Consumer) -> ConsumerEntry:
        consumer_id = consumer.id or consumer.name
        return cls(
            name=consumer.name,
            id=consumer_id,
            plan=consumer.plan,
            tags=tuple(consumer.tags),
            upstream_headers=(
                (b"X-Consumer-Id", consumer_id.encode()),
                (b"X-Consumer-Username", consumer.name.encode()),
            ),
        )


def hash_key(key: bytes) -> bytes:
    """API keys are kept and compared only as SHA-256 digests."""
    return hashlib.sha256(key).digest()


@dataclass(frozen=True, slots=True)
class Credential:
    consumer: ConsumerEntry
    credential_id: str


@dataclass(slots=True)
class ConsumerIndex:
    """Consumers by name and API keys by digest; built once per runtime."""

    by_name: dict[str, ConsumerEntry] = field(default_factory=dict)
    by_key_digest: dict[bytes, Credential] = field(default_factory=dict)

    @classmethod
    def build(cls, consumers: list[Consumer]) -> ConsumerIndex:
        index = cls()
        for consumer in consumers:
            entry = ConsumerEntry.from_config(consumer)
            index.by_name[entry.name] = entry
            for secret in consumer.keys:
                digest = hash_key(secret.get_secret_value().encode())
                # The credential id names a key in logs without revealing it.
                index.by_key_digest[digest] = Credential(entry, "key-" + digest[:6].hex())
        return index

    def __repr__(self) -> str:
        return f"ConsumerIndex({len(self.by_name)} consumers, {len(self.by_key_digest)} keys)"


@dataclass(frozen=True, slots=True)
class CompileContext:
    consumers: ConsumerIndex
    clock: Clock = SYSTEM_CLOCK
    service: str = ""
    route: str = ""
    plans: Mapping[str, Plan] = field(default_factory=dict)
    # The store every worker of the node shares (`store: local`), opened on first call; None
    # where nothing provides one.
    shared_store: Callable[[], Store] | None = None
    # This worker's connection to the cluster's Redis (`store: redis`), made on first call;
    # None when `cluster.redis` is not set.
    redis_store: Callable[[], RedisStore] | None = None
