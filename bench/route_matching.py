"""Route matching cost: does `Router.match` stay flat from 50 to 5,000 routes?

    python bench/route_matching.py [--calls N]

Builds a config of prefixes, exact paths, templates, GET-only prefixes, a few wildcard-host
routes and 20 regex routes spread through it, and prints the mean time of one `match` (best of 5
runs of N calls) for the first, middle and last prefix route in config order, one route of each
other kind, and a 404. Both sizes keep the same 20 regex routes, because a 404 scans every one
of them. A last column times 5,000 host-less prefix routes without header conditions: the common
case.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from functools import partial

from tollgate.routing import RouteMatch, Router, RouteSpec

REGEX_ROUTES = 20
WILDCARD_HOSTS = 5
REPEATS = 5

Request = tuple[str, str, str, dict[bytes, bytes]]
Case = tuple[object, Request]  # the expected payload (or 404), the request
HEADERS: dict[bytes, bytes] = {b"user-agent": b"bench", b"accept": b"*/*"}
NOT_FOUND: Case = (404, ("GET", "api.example.com", "/nothing/here", HEADERS))


def mixed_routes(count: int) -> list[RouteSpec]:
    """`count` routes, each named after its kind: of every 10, 5 prefixes, 2 exact paths,
    2 templates, 1 GET-only prefix; then the wildcard hosts and the regexes."""
    plain = count - REGEX_ROUTES - WILDCARD_HOSTS
    specs: list[RouteSpec] = []
    for index in range(plain):
        kind = index % 10
        if kind < 5:
            specs.append(spec(f"prefix-{index}", paths=(f"/svc{index}",)))
        elif kind < 7:
            specs.append(spec(f"exact-{index}", paths=(f"=/exact/{index}",)))
        elif kind < 9:
            specs.append(spec(f"template-{index}", paths=(f"/t{index}/items/{{id}}",)))
        else:
            specs.append(spec(f"get-{index}", paths=(f"/svc{index}",), methods=frozenset({"GET"})))
    for index in range(WILDCARD_HOSTS):
        specs.append(spec(f"wildcard-{index}", hosts=(f"*.tenant{index}.example.com",)))
    # Spread through the config, not all at its end.
    step = len(specs) // REGEX_ROUTES
    for index in range(REGEX_ROUTES):
        regex = rf"~^/re{index}/(?P<version>v\d+)/items$"
        specs.insert(index * step + step // 2, spec(f"regex-{index}", paths=(regex,)))
    return specs


def spec(
    name: str,
    paths: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
    methods: frozenset[str] = frozenset(),
) -> RouteSpec:
    return RouteSpec(name, hosts=hosts, paths=paths, methods=methods, name=name)


def prefix_routes(count: int) -> list[RouteSpec]:
    return [spec(f"prefix-{index}", paths=(f"/svc{index}",)) for index in range(count)]


def request_for(spec: RouteSpec) -> Case:
    """A request that `spec` serves."""
    host = spec.hosts[0].replace("*", "a") if spec.hosts else "api.example.com"
    path = spec.paths[0] if spec.paths else "/anything"
    if path.startswith("~"):
        path = "/" + path.split("/")[1] + "/v2/items"
    elif path.startswith("="):
        path = path[1:]
    elif "{" in path:
        path = path.replace("{id}", "42")
    else:
        path += "/orders/42"
    return spec.payload, ("GET", host, path, HEADERS)


def cases(specs: list[RouteSpec]) -> dict[str, Case]:
    """Requests by label: the first, middle and last prefix route, one of each other kind, 404."""

    def of_kind(kind: str) -> list[RouteSpec]:
        return [spec for spec in specs if spec.name.startswith(kind + "-")]

    prefixes, regexes = of_kind("prefix"), of_kind("regex")
    return {
        "first prefix": request_for(prefixes[0]),
        "middle prefix": request_for(prefixes[len(prefixes) // 2]),
        "last prefix": request_for(prefixes[-1]),
        "exact path": request_for(of_kind("exact")[-1]),
        "template": request_for(of_kind("template")[-1]),
        "GET-only": request_for(of_kind("get")[-1]),
        "wildcard host": request_for(of_kind("wildcard")[-1]),
        "first regex": request_for(regexes[0]),
        "last regex": request_for(regexes[-1]),
        "404": NOT_FOUND,
    }


def mean_microseconds(call: Callable[[], object], calls: int) -> float:
    best = min(timeit.repeat(call, number=calls, repeat=REPEATS))
    return best / calls * 1e6


def time_router(router: Router, cases: dict[str, Case], calls: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for label, (expected, request) in cases.items():
        answer = router.match(*request)
        if (answer.payload if isinstance(answer, RouteMatch) else answer) != expected:
            raise SystemExit(f"{label}: {request} answered {answer!r}, not {expected!r}")
        results[label] = mean_microseconds(partial(router.match, *request), calls)
    return results


def empty_call(method: str, host: str, path: str, headers: dict[bytes, bytes]) -> None:
    """What calling any Python function with match's arguments costs on this machine."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="match calls per run")
    calls = parser.parse_args().calls

    columns: dict[str, dict[str, float]] = {}
    for count in (50, 5_000):
        specs = mixed_routes(count)
        started = timeit.default_timer()
        router = Router(specs)
        compile_ms = (timeit.default_timer() - started) * 1e3
        print(f"{count:>5} mixed routes: compiled in {compile_ms:.1f} ms: {router!r}")
        columns[f"{count} mixed"] = time_router(router, cases(specs), calls)

    specs = prefix_routes(5_000)
    router = Router(specs)
    common = {
        "first prefix": request_for(specs[0]),
        "middle prefix": request_for(specs[len(specs) // 2]),
        "last prefix": request_for(specs[-1]),
        "404": NOT_FOUND,
    }
    columns["5000 prefix-only"] = time_router(router, common, calls)

    labels = list(next(iter(columns.values())))
    print(f"\nmean match time, microseconds (best of {REPEATS} runs of {calls:,} calls)")
    baseline = mean_microseconds(partial(empty_call, *NOT_FOUND[1]), calls)
    print(f"for scale, an empty function with the same arguments: {baseline:.2f}")
    print(f"{'':<15}" + "".join(f"{name:>18}" for name in columns))
    for label in labels:
        cells = "".join(
            f"{column[label]:>18.2f}" if label in column else f"{'':>18}"
            for column in columns.values()
        )
        print(f"{label:<15}{cells}")


if __name__ == "__main__":
    main()
