"""A mixed load of calls over raw sockets, and the check that a gateway made one record per call.

`drive(port, plan)` sends, over a few keep-alive connections, calls of these kinds and keeps
what the client saw of each (status and `X-Request-Id`); clients that disconnect send their
own request id, since they see no answer:

    ok            GET /ok                  200 from the upstream
    private       GET /private with a key  200, consumer identified
    unauthorized  GET /private, no key     401 from key-auth
    limited       GET /limited with a key  200 until the limit, then 429
    broken        GET /broken              502: the target refuses connections
    mid_request   POST /stream, closed after 10 of 1,000 body bytes   499
    mid_response  GET /stream, closed once the response head arrived   499

`mixed_config` is a gateway config with these routes; `check_records` compares the rows of a
sink with the calls, field by field.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from http_wire import RawClient, _read_head, read_response, request

KEY = "call-records-key-0123456789"
CONSUMER = "acme"
NODE = "node-under-test"
KEEP_ALIVE_KINDS = ("ok", "private", "unauthorized", "limited", "broken")
DISCONNECT_KINDS = ("mid_request", "mid_response")
MID_REQUEST_SENT = 10

# kind -> (service, route, consumer, source, error type) of its record
EXPECTED: dict[str, tuple[str, str, str | None, str, str | None]] = {
    "ok": ("open", "ok", None, "upstream", None),
    "private": ("private", "private", CONSUMER, "upstream", None),
    "unauthorized": ("private", "private", None, "gateway", "unauthorized"),
    "limited": ("limited", "limited", CONSUMER, "upstream", None),
    "broken": ("broken", "broken", None, "gateway", "upstream_connect_error"),
    "mid_request": ("stream", "stream", None, "gateway", "client_disconnected"),
    "mid_response": ("stream", "stream", None, "upstream", "client_disconnected"),
}


@dataclass(frozen=True)
class Call:
    kind: str
    request_id: str  # the X-Request-Id the client saw, or sent when it saw no answer
    status: int  # what the client saw; 499 where it left before the answer's end
    body_bytes: int  # of the answer the client read; -1 where it read none whole


def mixed_config(
    upstream_url: str, stream_url: str, dead_url: str, *, limit: int, **top: Any
) -> dict[str, Any]:
    """Routes for every kind above; `top` adds or replaces top-level sections."""

    def service(name: str, upstream: str, *policies: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "upstream": upstream,
            "routes": [{"name": name if name != "open" else "ok", "paths": [f"/{name}"]}],
            "policies": list(policies),
        }

    open_service = service("open", "backend")
    open_service["routes"][0]["paths"] = ["/ok"]
    config: dict[str, Any] = {
        "version": 1,
        "upstreams": [
            {"name": "backend", "targets": [{"url": upstream_url}]},
            {"name": "streaming", "targets": [{"url": stream_url}]},
            {"name": "dead", "targets": [{"url": dead_url}]},
        ],
        "services": [
            open_service,
            service("private", "backend", {"key-auth": {}}),
            service(
                "limited",
                "backend",
                {"key-auth": {}},
                {
                    "rate-limit": {
                        "limits": [
                            {
                                "name": "burst",
                                "algorithm": "token-bucket",
                                "rate": 0.001,
                                "burst": limit,
                            }
                        ],
                        "by": "consumer",
                        "store": "local",  # one count for every worker of the node
                    }
                },
            ),
            service("broken", "dead"),
            service("stream", "streaming"),
        ],
        "consumers": [{"name": CONSUMER, "keys": [KEY]}],
        "logs": {"node": NODE},
    }
    config.update(top)
    return config


def _request_for(kind: str) -> bytes:
    key = [("Authorization", f"Bearer {KEY}")]
    target = {"ok": "/ok", "private": "/private", "unauthorized": "/private"}.get(kind)
    if target is not None:
        return request("GET", target, key if kind == "private" else None)
    if kind == "limited":
        return request("GET", "/limited", key)
    return request("GET", "/broken")


async def _keep_alive_client(port: int, kinds: Sequence[str], calls: list[Call]) -> None:
    client = await RawClient.open(port)
    try:
        for kind in kinds:
            for attempt in itertools.count():
                try:
                    await client.send(_request_for(kind))
                    response = await read_response(client.reader)
                    break
                except TimeoutError:
                    raise AssertionError(f"no answer to a {kind!r} call within 5 s") from None
                except (ConnectionError, asyncio.IncompleteReadError):
                    # Never expected; a reconnect would hide nothing (the first try got no
                    # answer and so no id), but a second failure is a failure.
                    if attempt:
                        raise
                    await client.close()
                    client = await RawClient.open(port)
            request_id = response.header("x-request-id")
            assert request_id, response
            calls.append(Call(kind, request_id, response.status, len(response.body)))
            if response.closes:
                await client.close()
                client = await RawClient.open(port)
    finally:
        await client.close()


async def _disconnecting_client(port: int, kind: str, number: int, calls: list[Call]) -> None:
    request_id = f"{kind}-{number:06d}"
    client = await RawClient.open(port)
    try:
        if kind == "mid_request":
            # To an upstream that reads the whole body before it answers.
            head = request(
                "POST",
                "/stream",
                [("X-Request-Id", request_id), ("Content-Length", "1000")],
            )
            await client.send(head + b"x" * MID_REQUEST_SENT)
            await asyncio.sleep(0.01)  # let the gateway read the head and start proxying
        else:
            await client.send(request("GET", "/stream", [("X-Request-Id", request_id)]))
            response = await _read_head(client.reader)  # the answer has started; leave now
            assert response.status == 200, response
    finally:
        await client.close()
    calls.append(Call(kind, request_id, 499, -1))


async def drive(
    port: int, plan: Mapping[str, int], *, connections: int = 8, disconnect_batch: int = 50
) -> list[Call]:
    """Make the calls of `plan` (kind -> count); every call the client made, in no order."""
    calls: list[Call] = []
    kinds = [kind for kind in KEEP_ALIVE_KINDS for _ in range(plan.get(kind, 0))]
    # Interleaved, so that every connection sees every kind.
    lanes = [kinds[lane::connections] for lane in range(connections)]
    keep_alive = asyncio.gather(*(_keep_alive_client(port, lane, calls) for lane in lanes))
    disconnects = [
        (kind, number) for kind in DISCONNECT_KINDS for number in range(plan.get(kind, 0))
    ]

    async def disconnecting() -> None:
        for start in range(0, len(disconnects), disconnect_batch):
            await asyncio.gather(
                *(
                    _disconnecting_client(port, kind, number, calls)
                    for kind, number in disconnects[start : start + disconnect_batch]
                )
            )

    await asyncio.gather(keep_alive, disconnecting())
    return calls


def check_records(rows: Iterable[Mapping[str, Any]], calls: Sequence[Call]) -> Counter[str]:
    """Assert one record per call, with the fields the client's view implies; the statuses."""
    by_id: dict[str, Mapping[str, Any]] = {}
    duplicates = []
    for row in rows:
        if row["request_id"] in by_id:
            duplicates.append(row["request_id"])
        by_id[row["request_id"]] = row
    assert not duplicates, f"{len(duplicates)} request ids with several records: {duplicates[:5]}"
    missing = [call for call in calls if call.request_id not in by_id]
    assert not missing, f"{len(missing)} calls without a record, e.g. {missing[:3]}"
    extra = set(by_id) - {call.request_id for call in calls}
    assert not extra, f"{len(extra)} records of no call, e.g. {sorted(extra)[:3]}"
    statuses: Counter[str] = Counter()
    for call in calls:
        record = by_id[call.request_id]
        service, route, consumer, source, error_type = EXPECTED[call.kind]
        if call.kind == "limited" and call.status == 429:
            source, error_type = "gateway", "rate_limited"
        where = f"{call} -> {dict(record)}"
        assert record["status"] == call.status, where
        assert (record["service"], record["route"]) == (service, route), where
        assert record["consumer"] == consumer, where
        assert record["source"] == source, where
        assert record["error_type"] == error_type, where
        assert record["node"] == NODE and record["worker"] in (0, 1), where
        assert record["client_ip"] == "127.0.0.1", where
        assert record["total_ms"] >= 0 and record["gateway_ms"] >= 0, where
        assert record["total_ms"] >= record["gateway_ms"], where
        if call.body_bytes >= 0:
            assert record["bytes_out"] == call.body_bytes, where
        if call.kind == "mid_request":
            assert record["method"] == "POST" and 0 <= record["bytes_in"] <= MID_REQUEST_SENT
        else:
            assert record["method"] == "GET" and record["bytes_in"] == 0, where
        proxied = source == "upstream" or call.kind in ("broken",)
        if proxied:
            assert record["tries"] == 1 and record["upstream_target"], where
            assert record["upstream_ms"] is not None and record["upstream_ms"] >= 0, where
        elif call.kind != "mid_request":  # that one may or may not have reached the upstream
            assert record["tries"] == 0 and record["upstream_ms"] is None, where
        if call.kind == "private" or (call.kind == "limited"):
            assert record["credential_id"] and record["credential_id"].startswith("key-"), where
        statuses[f"{call.kind} {call.status}"] += 1
    return statuses
