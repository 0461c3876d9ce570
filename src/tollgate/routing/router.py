"""Route matching: which route serves a request. Pure, no I/O.

A `Router` is compiled once per config version from `RouteSpec`s and then answers `match` for
every request with a `RouteMatch`, 404 (nothing matches host, path and headers) or 405 (something
matches all but the method).

Path syntax
-----------
``/orders``
    Prefix at a segment boundary: matches ``/orders``, ``/orders/`` and ``/orders/42``, not
    ``/ordersX``. A prefix ending in ``/`` (``/api/``) matches every path starting with it;
    ``/`` matches every path.
``=/orders``
    Exact: matches ``/orders`` only.
``/orders/{id}``, ``/users/{user}/posts/{post}``
    Template: ``{name}`` matches one non-empty segment and the template matches the whole path.
    A last segment ``{name...}`` (e.g. ``/files/{rest...}``) matches one or more remaining
    segments. A parameter fills a whole segment (for ``/v{n}`` use a regex). Values land in
    `RouteMatch.params`.
``~^/v(?P<version>\\d+)/items$``
    Regex (Python `re`), matched from the start of the path (`re.match`): only the anchors
    written are honoured, so ``~/v\\d+`` also matches ``/v2/anything``. Named groups that took
    part in the match land in `RouteMatch.params`.

No paths at all means any path. Hosts and header names are compared lower-case, methods
upper-case (GET does not imply HEAD), header values exactly, as latin-1 text.

Precedence
----------
1. Host: routes for the exact host, then wildcard hosts (``*.example.com`` matches any name
   ending in ``.example.com``; the longest suffix first), then routes without hosts. A request
   that no route of one class serves falls through to the next class.
2. Path, within one host class: exact, then templates (more literal segments first, then more
   segments, then a fixed template before one ending in ``{name...}``), then prefixes (longest
   first), then regexes (config order), then routes without paths.
3. Among routes equal on host and path: more header conditions first, then config order.
4. Method: a route that does not allow the request's method is skipped. When nothing serves the
   request but some route matched all except the method, the answer is 405.

In short, candidates are tried in one total order and the first whose headers and method fit
wins.

`strip_path` removes the matched prefix: ``/orders/42`` with ``/orders`` is sent as ``/42``,
``/orders`` as ``/``, and ``/api/x`` with ``/api/`` as ``/x``. For exact, template and regex
paths it removes the whole matched part (what a regex leaves gets a leading ``/``).

Cost
----
Exact paths and hosts are dict lookups; wildcard hosts one lookup per label of the request
host; prefixes one lookup per segment of the request path; templates walk a segment trie. None of
these grows with the number of routes. Only regex routes are scanned one by one, so keep them
few.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar

from tollgate.errors import TollgateError

NO_PARAMS: Final[Mapping[str, str]] = MappingProxyType({})

# Passed as the request method to walk every route that matches all but the method:
# no route's method set contains it.
_NO_METHOD: Final = ""

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}")


class RouterError(TollgateError, ValueError):
    """A route spec the router cannot compile. The message names the route."""

    error_type = "config_error"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as the router sees it; `payload` comes back on a match."""

    payload: Any
    hosts: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    methods: frozenset[str] = frozenset()
    headers: tuple[tuple[str, frozenset[str]], ...] = ()
    strip_path: bool = False
    name: str = ""


class RouteMatch(NamedTuple):
    """The route that serves a request and the path to send upstream (always starts with /).

    A NamedTuple rather than a frozen dataclass: one is built per request, and building a
    frozen dataclass costs three times as much."""

    payload: Any
    path: str
    params: Mapping[str, str]


# RouteMatch's generated __new__ is Python code; tuple.__new__ builds the same tuple faster.
_new_match: Final = tuple.__new__


# -- compiled routes -----------------------------------------------------------------------


HeaderConditions = tuple[tuple[bytes, frozenset[bytes]], ...]


class _Conditions(NamedTuple):
    """What a spec asks of a request besides host and path, compiled once for all its paths."""

    order: int  # position in the config: the last tie-breaker
    methods: frozenset[str] | None
    headers: HeaderConditions | None


class _Route:
    """One path of one spec, compiled: the conditions checked on every request."""

    __slots__ = (
        "header_count",
        "headers",
        "methods",
        "name",
        "order",
        "payload",
        "strip",
        "unconditional",
    )

    def __init__(self, spec: RouteSpec, conditions: _Conditions) -> None:
        self.payload = spec.payload
        self.name = spec.name
        self.order = conditions.order
        self.methods = conditions.methods
        self.headers = conditions.headers
        self.header_count = len(self.headers) if self.headers else 0
        self.strip = spec.strip_path
        self.unconditional = self.headers is None and self.methods is None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, order={self.order})"


class _ExactRoute(_Route):
    __slots__ = ("result",)

    def __init__(self, spec: RouteSpec, conditions: _Conditions, path: str) -> None:
        super().__init__(spec, conditions)
        self.result = RouteMatch(spec.payload, "/" if spec.strip_path else path, NO_PARAMS)


class _PrefixRoute(_Route):
    __slots__ = ("cut",)

    def __init__(self, spec: RouteSpec, conditions: _Conditions, key: str) -> None:
        super().__init__(spec, conditions)
        # Removing only the key keeps the slash of a prefix written with one: /api/ on /api/x
        # leaves /x. Without strip_path nothing is removed.
        self.cut = len(key) if spec.strip_path else 0


class _TemplateRoute(_Route):
    __slots__ = ("params_at", "rank", "rest_at", "rest_name")

    def __init__(self, spec: RouteSpec, conditions: _Conditions, segments: list[str]) -> None:
        super().__init__(spec, conditions)
        params_at: list[tuple[str, int]] = []
        self.rest_name = ""
        self.rest_at = -1
        literal_count = 0
        for index, segment in enumerate(segments):
            parameter = _PARAMETER.fullmatch(segment)
            if parameter is None:
                literal_count += 1
            elif parameter.group(2):
                self.rest_name, self.rest_at = parameter.group(1), index
            else:
                params_at.append((parameter.group(1), index))
        self.params_at = tuple(params_at)
        rest = 1 if self.rest_at >= 0 else 0
        self.rank = (-literal_count, -len(segments), rest, -self.header_count, self.order)

    def params(self, segments: list[str]) -> dict[str, str]:
        params = {name: segments[index] for name, index in self.params_at}
        if self.rest_at >= 0:
            params[self.rest_name] = "/".join(segments[self.rest_at :])
        return params


class _RegexRoute(_Route):
    __slots__ = ("has_groups", "pattern")

    def __init__(self, spec: RouteSpec, conditions: _Conditions, pattern: re.Pattern[str]) -> None:
        super().__init__(spec, conditions)
        self.pattern = pattern
        self.has_groups = bool(pattern.groupindex)

    def params(self, matched: re.Match[str]) -> Mapping[str, str]:
        if not self.has_groups:
            return NO_PARAMS
        groups = matched.groupdict()
        return {name: value for name, value in groups.items() if value is not None}


R = TypeVar("R", bound=_Route)


def _headers_match(conditions: HeaderConditions, headers: Mapping[bytes, bytes]) -> bool:
    # A plain loop: all() over a generator costs a frame per request.
    for name, accepted in conditions:  # noqa: SIM110
        if headers.get(name) not in accepted:
            return False
    return True


def _select(
    routes: Sequence[R], method: str, headers: Mapping[bytes, bytes], allowed: set[str] | None
) -> R | int:
    """The first route whose headers and method fit; else 405 if one failed on the method only,
    else 0. `allowed` collects the methods of the routes that failed on the method only."""
    status = 0
    for route in routes:
        if route.headers is not None and not _headers_match(route.headers, headers):
            continue
        if route.methods is None or method in route.methods:
            return route
        status = 405
        if allowed is not None:
            allowed.update(route.methods)
    return status


def _sorted(routes: list[R]) -> tuple[R, ...]:
    return tuple(sorted(routes, key=lambda route: (-route.header_count, route.order)))


# -- one host class ------------------------------------------------------------------------


class _TemplateNode:
    """A node of the template trie; an edge is one path segment."""

    __slots__ = ("any_first_segment", "ends", "literals", "parameter", "rests")

    def __init__(self) -> None:
        self.literals: dict[str, _TemplateNode] = {}
        self.parameter: _TemplateNode | None = None
        self.ends: list[_TemplateRoute] = []  # templates that end here
        self.rests: list[_TemplateRoute] = []  # templates whose {name...} starts here
        # Set on the root when sealed: whether a path whose first segment is not in `literals`
        # can still match (through a parameter).
        self.any_first_segment = True

    def add(self, segments: list[str], route: _TemplateRoute) -> None:
        node = self
        for segment in segments:
            if _PARAMETER.fullmatch(segment) is None:
                node = node.literals.setdefault(segment, _TemplateNode())
            elif segment.endswith("...}"):
                node.rests.append(route)
                return
            else:
                if node.parameter is None:
                    node.parameter = _TemplateNode()
                node = node.parameter
        node.ends.append(route)

    def collect(self, segments: list[str], index: int, found: list[_TemplateRoute]) -> None:
        """Add to `found` every template matching `segments[index:]` from this node."""
        if index == len(segments):
            found.extend(self.ends)
            return
        segment = segments[index]
        if self.rests and (segment or index + 1 < len(segments)):
            found.extend(self.rests)
        child = self.literals.get(segment)
        if child is not None:
            child.collect(segments, index + 1, found)
        if self.parameter is not None and segment:
            self.parameter.collect(segments, index + 1, found)


_template_rank = attrgetter("rank")


class _PathTable:
    """Every route of one host class, indexed by path kind."""

    __slots__ = (
        "any_path",
        "exact",
        "prefix_at_end",
        "prefix_at_slash",
        "regexes",
        "route_count",
        "templates",
    )

    def __init__(
        self,
        exact: dict[str, tuple[_ExactRoute, ...]],
        templates: _TemplateNode | None,
        prefix_at_end: dict[str, tuple[_PrefixRoute, ...]],
        prefix_at_slash: dict[str, tuple[_PrefixRoute, ...]],
        regexes: tuple[_RegexRoute, ...],
        any_path: tuple[_PrefixRoute, ...],
        route_count: int,
    ) -> None:
        self.exact = exact
        self.templates = templates
        # A prefix is keyed without its trailing slash. `prefix_at_end` answers a request path
        # equal to the key; `prefix_at_slash` one that continues with a slash after the key.
        self.prefix_at_end = prefix_at_end
        self.prefix_at_slash = prefix_at_slash
        self.regexes = regexes
        self.any_path = any_path
        self.route_count = route_count

    def __repr__(self) -> str:
        prefixes = {id(route) for routes in self.prefix_at_slash.values() for route in routes}
        return (
            f"_PathTable(routes={self.route_count}, exact={len(self.exact)}, "
            f"templates={self.templates is not None}, prefixes={len(prefixes)}, "
            f"regexes={len(self.regexes)}, any_path={len(self.any_path)})"
        )

    def find(
        self, method: str, path: str, headers: Mapping[bytes, bytes], allowed: set[str] | None
    ) -> RouteMatch | int:
        """The match in this host class, else 405 if a route failed only on the method, else 0."""
        status = 0
        routes = self.exact.get(path)
        if routes is not None:
            exact = _select(routes, method, headers, allowed)
            if isinstance(exact, _Route):
                return exact.result
            status = exact

        templates = self.templates
        if templates is not None and (
            templates.any_first_segment or path[1:].partition("/")[0] in templates.literals
        ):
            segments = path[1:].split("/")
            found: list[_TemplateRoute] = []
            templates.collect(segments, 0, found)
            if found:
                if len(found) > 1:
                    found.sort(key=_template_rank)
                template = _select(found, method, headers, allowed)
                if isinstance(template, _Route):
                    sent = "/" if template.strip else path
                    return _new_match(
                        RouteMatch, (template.payload, sent, template.params(segments))
                    )
                status = status or template

        # Longest prefix first: the whole path, then the part before each slash, right to left.
        prefixes = self.prefix_at_end.get(path)
        key = path
        while True:
            if prefixes is not None:
                # Without a call in the common case: the first route takes any header and method.
                first = prefixes[0]
                prefix = (
                    first if first.unconditional else _select(prefixes, method, headers, allowed)
                )
                if isinstance(prefix, _Route):
                    sent = (path[prefix.cut :] or "/") if prefix.cut else path
                    return _new_match(RouteMatch, (prefix.payload, sent, NO_PARAMS))
                status = status or prefix
            if not key:
                break
            key = key.rpartition("/")[0]  # cheaper than rfind with bounds, then a slice
            prefixes = self.prefix_at_slash.get(key)

        for route in self.regexes:
            matched = route.pattern.match(path)
            if matched is None:
                continue
            regex = _select((route,), method, headers, allowed)
            if isinstance(regex, _Route):
                sent = path
                if regex.strip:
                    rest = path[matched.end() :]
                    sent = rest if rest[:1] == "/" else "/" + rest
                return _new_match(RouteMatch, (regex.payload, sent, regex.params(matched)))
            status = status or regex

        if self.any_path:
            anywhere = _select(self.any_path, method, headers, allowed)
            if isinstance(anywhere, _Route):
                return _new_match(RouteMatch, (anywhere.payload, path, NO_PARAMS))
            status = status or anywhere
        return status


class _TableBuilder:
    """Collects the routes of one host class, then seals them into a `_PathTable`."""

    def __init__(self) -> None:
        self.exact: dict[str, list[_ExactRoute]] = {}
        self.templates: _TemplateNode | None = None
        self.prefix_at_end: dict[str, list[_PrefixRoute]] = {}
        self.prefix_at_slash: dict[str, list[tuple[int, _PrefixRoute]]] = {}
        self.regexes: list[_RegexRoute] = []
        self.any_path: list[_PrefixRoute] = []
        self.route_count = 0

    def add(self, spec: RouteSpec, conditions: _Conditions, where: str) -> None:
        self.route_count += 1
        if not spec.paths:
            self.any_path.append(_PrefixRoute(spec, conditions, ""))
        for path in spec.paths:
            self._add_path(spec, conditions, where, path)

    def _add_path(self, spec: RouteSpec, conditions: _Conditions, where: str, path: str) -> None:
        if path.startswith("~"):
            self.regexes.append(_RegexRoute(spec, conditions, _compile_regex(where, path)))
        elif path.startswith("="):
            exact = path[1:]
            _check_starts_with_slash(where, path, exact)
            self.exact.setdefault(exact, []).append(_ExactRoute(spec, conditions, exact))
        elif "{" in path or "}" in path:
            _check_starts_with_slash(where, path, path)
            segments = _template_segments(where, path)
            if self.templates is None:
                self.templates = _TemplateNode()
            self.templates.add(segments, _TemplateRoute(spec, conditions, segments))
        else:
            _check_starts_with_slash(where, path, path)
            if path.endswith("/"):
                key = path[:-1]
                route = _PrefixRoute(spec, conditions, key)
                self.prefix_at_slash.setdefault(key, []).append((0, route))
            else:
                route = _PrefixRoute(spec, conditions, path)
                self.prefix_at_end.setdefault(path, []).append(route)
                # Written with a trailing slash, the prefix is one character longer: it goes first.
                self.prefix_at_slash.setdefault(path, []).append((1, route))

    def seal(self) -> _PathTable:
        if self.templates is not None:
            _sort_template_node(self.templates)
            root = self.templates
            root.any_first_segment = bool(root.parameter or root.rests)
        prefix_at_slash = {
            key: tuple(
                route
                for _, route in sorted(
                    ranked, key=lambda item: (item[0], -item[1].header_count, item[1].order)
                )
            )
            for key, ranked in self.prefix_at_slash.items()
        }
        # Routes with the same regex text are equal on path: header conditions go first there.
        first_seen: dict[str, int] = {}
        for route in self.regexes:
            first_seen.setdefault(route.pattern.pattern, route.order)
        regexes = sorted(
            self.regexes, key=lambda route: (first_seen[route.pattern.pattern], -route.header_count)
        )
        return _PathTable(
            exact={path: _sorted(routes) for path, routes in self.exact.items()},
            templates=self.templates,
            prefix_at_end={key: _sorted(routes) for key, routes in self.prefix_at_end.items()},
            prefix_at_slash=prefix_at_slash,
            regexes=tuple(regexes),
            any_path=_sorted(self.any_path),
            route_count=self.route_count,
        )


def _sort_template_node(node: _TemplateNode) -> None:
    node.ends.sort(key=_template_rank)
    node.rests.sort(key=_template_rank)
    for child in node.literals.values():
        _sort_template_node(child)
    if node.parameter is not None:
        _sort_template_node(node.parameter)


# -- compiling specs -----------------------------------------------------------------------


def _check_starts_with_slash(where: str, written: str, path: str) -> None:
    if not path.startswith("/"):
        raise RouterError(f"{where}: path {written!r} must start with /, =/ (exact) or ~ (regex)")


def _compile_regex(where: str, written: str) -> re.Pattern[str]:
    try:
        return re.compile(written[1:])
    except re.error as exc:
        raise RouterError(f"{where}: path {written!r} is not a regex: {exc}") from None


def _template_segments(where: str, path: str) -> list[str]:
    segments = path[1:].split("/")
    seen: set[str] = set()
    for index, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            continue
        parameter = _PARAMETER.fullmatch(segment)
        if parameter is None:
            raise RouterError(
                f"{where}: path {path!r}: {segment!r} is not {{name}} or "
                f"{{name...}}; a parameter fills a whole segment (use ~regex otherwise)"
            )
        name = parameter.group(1)
        if name in seen:
            raise RouterError(f"{where}: path {path!r} repeats {{{name}}}")
        seen.add(name)
        if parameter.group(2) and index != len(segments) - 1:
            raise RouterError(f"{where}: path {path!r}: {{{name}...}} must be the last segment")
    return segments


def _host_key(where: str, host: str) -> tuple[bool, str]:
    """(is a wildcard, the exact host or the wildcard's suffix after `*.`)."""
    host = host.lower()
    if host.startswith("*.") and len(host) > 2 and "*" not in host[2:]:
        return True, host[2:]
    if not host or "*" in host:
        raise RouterError(
            f"{where}: host {host!r} is not a name or *.suffix (no hosts means any host)"
        )
    if ":" in host and not host.startswith("["):
        raise RouterError(f"{where}: host {host!r}: hosts are matched without the port")
    return False, host


def _conditions(where: str, order: int, spec: RouteSpec) -> _Conditions:
    for method in spec.methods:
        if not method or not method.isascii() or " " in method:
            raise RouterError(f"{where}: {method!r} is not an HTTP method")
    methods = frozenset(method.upper() for method in spec.methods) or None
    headers = []
    for name, values in spec.headers:
        if not name or not values:
            raise RouterError(f"{where}: header condition {name!r} needs a name and values")
        try:
            accepted = frozenset(value.encode("latin-1") for value in values)
            headers.append((name.lower().encode("latin-1"), accepted))
        except UnicodeEncodeError:
            raise RouterError(f"{where}: header condition {name!r} is not latin-1 text") from None
    return _Conditions(order, methods, tuple(headers) or None)


# -- the router ----------------------------------------------------------------------------


class Router:
    """Matches requests against routes compiled once; immutable after construction."""

    __slots__ = (
        "_any_host",
        "_exact_hosts",
        "_has_hosts",
        "_route_count",
        "_wildcard_hosts",
    )

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        any_host = _TableBuilder()
        exact_hosts: dict[str, _TableBuilder] = {}
        wildcard_hosts: dict[str, _TableBuilder] = {}
        for order, spec in enumerate(specs):
            where = f"route {spec.name!r}" if spec.name else f"route #{order + 1}"
            conditions = _conditions(where, order, spec)
            if not spec.hosts:
                any_host.add(spec, conditions, where)
            for host in spec.hosts:
                is_wildcard, key = _host_key(where, host)
                builders = wildcard_hosts if is_wildcard else exact_hosts
                if key not in builders:
                    builders[key] = _TableBuilder()
                builders[key].add(spec, conditions, where)
        self._any_host = any_host.seal()
        self._exact_hosts = {host: builder.seal() for host, builder in exact_hosts.items()}
        self._wildcard_hosts = {host: builder.seal() for host, builder in wildcard_hosts.items()}
        self._has_hosts = bool(exact_hosts or wildcard_hosts)
        self._route_count = len(specs)

    def match(
        self, method: str, host: str, path: str, headers: Mapping[bytes, bytes]
    ) -> RouteMatch | int:
        """The route serving the request, else 405 (a route matched all but the method) or 404.

        `host` is lower-case without port, `path` normalised without query, `headers` maps
        lower-case names to the first value."""
        if self._has_hosts:
            return self._find(method, host, path, headers, None) or 404
        return self._any_host.find(method, path, headers, None) or 404

    def allowed_methods(
        self, host: str, path: str, headers: Mapping[bytes, bytes]
    ) -> frozenset[str]:
        """For the Allow header of a 405: the methods of the routes matching all but the method."""
        allowed: set[str] = set()
        self._find(_NO_METHOD, host, path, headers, allowed)
        return frozenset(allowed)

    def _find(
        self,
        method: str,
        host: str,
        path: str,
        headers: Mapping[bytes, bytes],
        allowed: set[str] | None,
    ) -> RouteMatch | int:
        status = 0
        table = self._exact_hosts.get(host)
        if table is not None:
            found = table.find(method, path, headers, allowed)
            if isinstance(found, RouteMatch):
                return found
            status = found
        if self._wildcard_hosts and host[:1] != ".":
            # Longest suffix first: the host without its first label, then without two, ...
            suffix = host.partition(".")[2]
            while suffix:
                table = self._wildcard_hosts.get(suffix)
                if table is not None:
                    found = table.find(method, path, headers, allowed)
                    if isinstance(found, RouteMatch):
                        return found
                    status = status or found
                suffix = suffix.partition(".")[2]
        found = self._any_host.find(method, path, headers, allowed)
        if isinstance(found, RouteMatch):
            return found
        return status or found

    def __repr__(self) -> str:
        return (
            f"Router(routes={self._route_count}, exact_hosts={len(self._exact_hosts)}, "
            f"wildcard_hosts={len(self._wildcard_hosts)}, "
            f"any_host_routes={self._any_host.route_count})"
        )
