"""The router: path syntax, precedence, 404 vs 405, strip_path, header conditions, bad specs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.errors import TollgateError
from tollgate.routing import NO_PARAMS, RouteMatch, Router, RouterError, RouteSpec

NO_HEADERS: dict[bytes, bytes] = {}


def route(
    name: str,
    *paths: str,
    hosts: tuple[str, ...] = (),
    methods: tuple[str, ...] = (),
    headers: Mapping[str, tuple[str, ...]] | None = None,
    strip_path: bool = False,
) -> RouteSpec:
    """A spec whose payload is its name, so a match says which route won."""
    conditions = tuple((key, frozenset(values)) for key, values in (headers or {}).items())
    return RouteSpec(
        payload=name,
        hosts=hosts,
        paths=paths,
        methods=frozenset(methods),
        headers=conditions,
        strip_path=strip_path,
        name=name,
    )


def match(
    router: Router,
    path: str,
    *,
    method: str = "GET",
    host: str = "api.example.com",
    headers: Mapping[bytes, bytes] = NO_HEADERS,
) -> RouteMatch | int:
    return router.match(method, host, path, headers)


def winner(
    router: Router,
    path: str,
    *,
    method: str = "GET",
    host: str = "api.example.com",
    headers: Mapping[bytes, bytes] = NO_HEADERS,
) -> object:
    """The payload of the matching route, or the status when none matches."""
    found = match(router, path, method=method, host=host, headers=headers)
    return found.payload if isinstance(found, RouteMatch) else found


# -- path syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/orders", "/orders/", "/orders/42", "/orders/42/items"])
def test_prefix_matches_itself_and_every_path_below_it(path: str) -> None:
    router = Router([route("orders", "/orders")])
    assert winner(router, path) == "orders"


@pytest.mark.parametrize("path", ["/ordersX", "/orders-old/1", "/order", "/"])
def test_prefix_matches_only_at_a_segment_boundary(path: str) -> None:
    router = Router([route("orders", "/orders")])
    assert winner(router, path) == 404


def test_prefix_ending_in_a_slash_matches_paths_starting_with_it() -> None:
    router = Router([route("api", "/api/")])
    assert winner(router, "/api/") == "api"
    assert winner(router, "/api/v1/users") == "api"
    assert winner(router, "/api") == 404
    assert winner(router, "/apis") == 404


@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c", "//"])
def test_root_prefix_matches_every_path(path: str) -> None:
    assert winner(Router([route("root", "/")]), path) == "root"


def test_exact_path_matches_only_itself() -> None:
    router = Router([route("orders", "=/orders")])
    assert winner(router, "/orders") == "orders"
    assert winner(router, "/orders/") == 404
    assert winner(router, "/orders/42") == 404


def test_exact_root_matches_only_the_root() -> None:
    router = Router([route("home", "=/")])
    assert winner(router, "/") == "home"
    assert winner(router, "/index.html") == 404


def test_template_parameter_captures_one_segment() -> None:
    found = match(Router([route("order", "/orders/{id}")]), "/orders/42")
    assert found == RouteMatch("order", "/orders/42", {"id": "42"})


@pytest.mark.parametrize("path", ["/orders", "/orders/", "/orders/42/items", "/orders//"])
def test_template_matches_the_whole_path_with_non_empty_segments(path: str) -> None:
    assert winner(Router([route("order", "/orders/{id}")]), path) == 404


def test_template_returns_every_parameter() -> None:
    router = Router([route("post", "/users/{user}/posts/{post}")])
    found = match(router, "/users/ada/posts/7")
    assert isinstance(found, RouteMatch)
    assert found.params == {"user": "ada", "post": "7"}


def test_template_literal_trailing_slash_is_part_of_the_template() -> None:
    router = Router([route("order", "/orders/{id}/")])
    assert winner(router, "/orders/42/") == "order"
    assert winner(router, "/orders/42") == 404


@pytest.mark.parametrize(
    ("path", "rest"),
    [("/files/a", "a"), ("/files/a/b/c", "a/b/c"), ("/files/a/", "a/")],
)
def test_rest_parameter_captures_one_or_more_remaining_segments(path: str, rest: str) -> None:
    found = match(Router([route("files", "/files/{rest...}")]), path)
    assert isinstance(found, RouteMatch)
    assert found.params == {"rest": rest}


@pytest.mark.parametrize("path", ["/files", "/files/", "/filesX/a"])
def test_rest_parameter_needs_at_least_one_segment(path: str) -> None:
    assert winner(Router([route("files", "/files/{rest...}")]), path) == 404


def test_rest_parameter_follows_other_parameters() -> None:
    found = match(Router([route("blob", "/repos/{repo}/{path...}")]), "/repos/tollgate/src/a.py")
    assert isinstance(found, RouteMatch)
    assert found.params == {"repo": "tollgate", "path": "src/a.py"}


def test_regex_matches_from_the_start_without_implying_the_end() -> None:
    router = Router([route("versioned", r"~/v\d+")])
    assert winner(router, "/v2") == "versioned"
    assert winner(router, "/v2/anything") == "versioned"
    assert winner(router, "/api/v2") == 404


def test_regex_honours_the_anchors_written() -> None:
    router = Router([route("items", r"~^/v(?P<version>\d+)/items$")])
    assert winner(router, "/v1/items") == "items"
    assert winner(router, "/v1/items/3") == 404


def test_regex_named_groups_are_params() -> None:
    found = match(Router([route("items", r"~^/v(?P<version>\d+)/items$")]), "/v12/items")
    assert found == RouteMatch("items", "/v12/items", {"version": "12"})


def test_regex_group_that_took_no_part_is_left_out_of_params() -> None:
    router = Router([route("items", r"~^/items(/(?P<id>\d+))?$")])
    found = match(router, "/items")
    assert isinstance(found, RouteMatch)
    assert found.params == {}


def test_route_without_paths_matches_any_path() -> None:
    router = Router([route("anything")])
    assert winner(router, "/") == "anything"
    assert winner(router, "/a/b") == "anything"


def test_prefix_and_exact_matches_have_no_params() -> None:
    router = Router([route("orders", "/orders"), route("home", "=/")])
    for path in ("/orders/1", "/"):
        found = match(router, path)
        assert isinstance(found, RouteMatch)
        assert found.params is NO_PARAMS
        assert found.params == {}


def test_a_route_with_several_paths_matches_any_of_them() -> None:
    router = Router([route("shop", "=/cart", "/orders", "/items/{id}", r"~^/v\d+/")])
    for path in ("/cart", "/orders/1", "/items/3", "/v2/x"):
        assert winner(router, path) == "shop"
    assert winner(router, "/cart/1") == 404


def test_match_returns_the_payload_unchanged() -> None:
    payload = object()
    found = match(Router([RouteSpec(payload, paths=("/",))]), "/x")
    assert isinstance(found, RouteMatch)
    assert found.payload is payload


# -- precedence: host ----------------------------------------------------------------------


def test_exact_host_beats_wildcard_host() -> None:
    router = Router(
        [
            route("wildcard", "/", hosts=("*.example.com",)),
            route("exact", "/", hosts=("api.example.com",)),
        ]
    )
    assert winner(router, "/", host="api.example.com") == "exact"
    assert winner(router, "/", host="www.example.com") == "wildcard"


def test_longer_wildcard_suffix_beats_shorter() -> None:
    router = Router(
        [
            route("short", "/", hosts=("*.example.com",)),
            route("long", "/", hosts=("*.eu.example.com",)),
        ]
    )
    assert winner(router, "/", host="api.eu.example.com") == "long"
    assert winner(router, "/", host="api.us.example.com") == "short"


def test_wildcard_host_beats_route_without_hosts() -> None:
    router = Router([route("any", "/orders"), route("tenant", "/", hosts=("*.example.com",))])
    assert winner(router, "/orders", host="acme.example.com") == "tenant"
    assert winner(router, "/orders", host="example.org") == "any"


def test_wildcard_host_matches_any_depth_but_not_the_bare_domain() -> None:
    router = Router([route("tenant", "/", hosts=("*.example.com",))])
    assert winner(router, "/", host="a.example.com") == "tenant"
    assert winner(router, "/", host="a.b.example.com") == "tenant"
    assert winner(router, "/", host="example.com") == 404
    assert winner(router, "/", host=".example.com") == 404
    assert winner(router, "/", host="notexample.com") == 404


def test_host_route_serves_only_its_hosts() -> None:
    router = Router([route("api", "/", hosts=("api.example.com", "api.example.org"))])
    assert winner(router, "/", host="api.example.com") == "api"
    assert winner(router, "/", host="api.example.org") == "api"
    assert winner(router, "/", host="www.example.com") == 404


def test_hosts_in_specs_are_compared_lower_case() -> None:
    router = Router(
        [
            route("exact", "/", hosts=("API.Example.com",)),
            route("wildcard", "/", hosts=("*.Example.ORG",)),
        ]
    )
    assert winner(router, "/", host="api.example.com") == "exact"
    assert winner(router, "/", host="www.example.org") == "wildcard"


def test_path_unmatched_for_the_exact_host_falls_through_to_wildcard_then_any_host() -> None:
    router = Router(
        [
            route("exact", "/orders", hosts=("api.example.com",)),
            route("wildcard", "/users", hosts=("*.example.com",)),
            route("any", "/"),
        ]
    )
    assert winner(router, "/orders/1") == "exact"
    assert winner(router, "/users/1") == "wildcard"
    assert winner(router, "/items") == "any"


def test_host_class_beats_a_better_path_in_a_later_class() -> None:
    router = Router([route("any", "=/orders/1"), route("exact", "/", hosts=("api.example.com",))])
    assert winner(router, "/orders/1") == "exact"


# -- precedence: path ----------------------------------------------------------------------


def test_exact_path_beats_prefix_of_the_same_length() -> None:
    router = Router([route("prefix", "/orders"), route("exact", "=/orders")])
    assert winner(router, "/orders") == "exact"
    assert winner(router, "/orders/1") == "prefix"


def test_exact_path_beats_template() -> None:
    router = Router([route("template", "/orders/{id}"), route("exact", "=/orders/new")])
    assert winner(router, "/orders/new") == "exact"
    assert winner(router, "/orders/7") == "template"


def test_template_beats_longer_prefix() -> None:
    router = Router([route("prefix", "/orders/42/"), route("template", "/orders/{id}/{part...}")])
    assert winner(router, "/orders/42/items") == "template"


def test_template_with_more_literal_segments_wins() -> None:
    router = Router(
        [
            route("one-literal", "/orders/{id}/{part}"),
            route("two-literals", "/orders/{id}/items"),
            route("literal-first", "/{kind}/{id}/items"),
        ]
    )
    assert winner(router, "/orders/1/items") == "two-literals"
    assert winner(router, "/orders/1/notes") == "one-literal"
    assert winner(router, "/users/1/items") == "literal-first"


def test_more_literal_segments_win_wherever_they_sit() -> None:
    router = Router([route("early", "/a/{x}/{y}"), route("late", "/{x}/b/c")])
    assert winner(router, "/a/b/c") == "late"


def test_template_with_more_segments_wins_between_equal_literal_counts() -> None:
    router = Router([route("rest", "/orders/{rest...}"), route("two", "/orders/{id}/{part}")])
    assert winner(router, "/orders/1/items") == "two"
    assert winner(router, "/orders/1/items/3") == "rest"


def test_fixed_template_beats_rest_template_of_the_same_shape() -> None:
    router = Router([route("rest", "/orders/{rest...}"), route("fixed", "/orders/{id}")])
    assert winner(router, "/orders/1") == "fixed"
    assert winner(router, "/orders/1/2") == "rest"


def test_longest_prefix_wins_regardless_of_config_order() -> None:
    router = Router([route("short", "/a"), route("long", "/a/b/c"), route("middle", "/a/b")])
    assert winner(router, "/a/b/c/d") == "long"
    assert winner(router, "/a/b/x") == "middle"
    assert winner(router, "/a/x") == "short"


def test_prefix_with_a_trailing_slash_beats_the_same_prefix_without() -> None:
    router = Router([route("bare", "/api"), route("slash", "/api/")])
    assert winner(router, "/api/x") == "slash"
    assert winner(router, "/api") == "bare"


def test_prefix_beats_regex() -> None:
    router = Router([route("regex", r"~^/orders"), route("prefix", "/")])
    assert winner(router, "/orders") == "prefix"


def test_regexes_are_tried_in_config_order() -> None:
    router = Router([route("first", r"~^/v\d"), route("second", r"~^/v1")])
    assert winner(router, "/v1") == "first"


def test_regex_beats_route_without_paths() -> None:
    router = Router([route("anything"), route("regex", r"~^/v\d")])
    assert winner(router, "/v1") == "regex"
    assert winner(router, "/x") == "anything"


# -- precedence: headers and config order --------------------------------------------------


def test_route_with_header_conditions_beats_the_same_path_without() -> None:
    router = Router(
        [route("plain", "/orders"), route("beta", "/orders", headers={"x-beta": ("1",)})]
    )
    assert winner(router, "/orders", headers={b"x-beta": b"1"}) == "beta"
    assert winner(router, "/orders", headers={b"x-beta": b"0"}) == "plain"
    assert winner(router, "/orders") == "plain"


def test_route_with_more_header_conditions_goes_first() -> None:
    router = Router(
        [
            route("one", "=/x", headers={"x-a": ("1",)}),
            route("two", "=/x", headers={"x-a": ("1",), "x-b": ("1",)}),
        ]
    )
    assert winner(router, "/x", headers={b"x-a": b"1", b"x-b": b"1"}) == "two"
    assert winner(router, "/x", headers={b"x-a": b"1"}) == "one"


@pytest.mark.parametrize("paths", [("/x",), ("=/x",), ("/{id}",), (r"~^/x",)])
def test_header_conditions_order_routes_of_every_path_kind(paths: tuple[str, ...]) -> None:
    router = Router([route("plain", *paths), route("beta", *paths, headers={"x-beta": ("1",)})])
    assert winner(router, "/x", headers={b"x-beta": b"1"}) == "beta"
    assert winner(router, "/x") == "plain"


def test_header_conditions_do_not_beat_a_longer_prefix() -> None:
    router = Router([route("long", "/a/b"), route("beta", "/a", headers={"x-beta": ("1",)})])
    assert winner(router, "/a/b", headers={b"x-beta": b"1"}) == "long"


def test_config_order_breaks_remaining_ties() -> None:
    router = Router([route("first", "/orders"), route("second", "/orders")])
    assert winner(router, "/orders") == "first"


def test_every_header_condition_must_hold() -> None:
    router = Router([route("both", "/", headers={"x-a": ("1",), "x-b": ("2", "3")})])
    assert winner(router, "/", headers={b"x-a": b"1", b"x-b": b"3"}) == "both"
    assert winner(router, "/", headers={b"x-a": b"1"}) == 404
    assert winner(router, "/", headers={b"x-a": b"1", b"x-b": b"4"}) == 404


def test_header_values_are_compared_case_sensitively() -> None:
    router = Router([route("beta", "/", headers={"x-channel": ("Beta",)})])
    assert winner(router, "/", headers={b"x-channel": b"Beta"}) == "beta"
    assert winner(router, "/", headers={b"x-channel": b"beta"}) == 404


def test_header_names_in_specs_are_compared_lower_case() -> None:
    router = Router([route("beta", "/", headers={"X-Channel": ("beta",)})])
    assert winner(router, "/", headers={b"x-channel": b"beta"}) == "beta"


def test_header_values_are_latin1() -> None:
    router = Router([route("cafe", "/", headers={"x-shop": ("café",)})])
    assert winner(router, "/", headers={b"x-shop": "café".encode("latin-1")}) == "cafe"


def test_header_mismatch_falls_through_to_a_shorter_prefix() -> None:
    router = Router([route("short", "/a"), route("beta", "/a/b", headers={"x-beta": ("1",)})])
    assert winner(router, "/a/b") == "short"


# -- method, 404 and 405 -------------------------------------------------------------------


def test_route_without_methods_accepts_every_method() -> None:
    router = Router([route("any", "/")])
    for method in ("GET", "POST", "DELETE", "PURGE"):
        assert winner(router, "/", method=method) == "any"


def test_method_mismatch_skips_to_the_next_route_in_precedence() -> None:
    router = Router([route("prefix", "/orders"), route("read", "/orders/{id}", methods=("GET",))])
    assert winner(router, "/orders/1", method="GET") == "read"
    assert winner(router, "/orders/1", method="DELETE") == "prefix"


def test_method_mismatch_falls_through_host_classes() -> None:
    router = Router(
        [route("any", "/"), route("host", "/", hosts=("api.example.com",), methods=("GET",))]
    )
    assert winner(router, "/", method="POST") == "any"


def test_methods_in_specs_are_compared_upper_case() -> None:
    assert winner(Router([route("read", "/", methods=("get",))]), "/", method="GET") == "read"


def test_only_method_mismatches_answer_405() -> None:
    router = Router([route("read", "/orders", methods=("GET", "HEAD"))])
    assert winner(router, "/orders", method="POST") == 405


def test_nothing_matching_host_path_and_headers_answers_404() -> None:
    router = Router(
        [
            route("read", "/orders", methods=("GET",)),
            route("beta", "/beta", methods=("GET",), headers={"x-beta": ("1",)}),
            route("host", "/", hosts=("api.example.org",), methods=("GET",)),
        ]
    )
    assert winner(router, "/users", method="POST") == 404
    assert winner(router, "/beta", method="POST") == 404
    assert winner(router, "/", method="POST", host="api.example.com") == 404


def test_405_when_only_a_host_route_fails_on_the_method() -> None:
    router = Router([route("host", "/", hosts=("*.example.com",), methods=("GET",))])
    assert winner(router, "/", method="POST") == 405


@pytest.mark.parametrize("paths", [("=/x",), ("/x",), ("/{id}",), (r"~^/x$",), ()])
def test_every_path_kind_answers_405_on_a_method_mismatch(paths: tuple[str, ...]) -> None:
    router = Router([route("read", *paths, methods=("GET",))])
    assert winner(router, "/x", method="POST") == 405


def test_allowed_methods_unites_the_routes_that_failed_only_on_the_method() -> None:
    router = Router(
        [
            route("read", "/orders", methods=("GET", "HEAD")),
            route("write", "/orders/{id}", methods=("PUT",)),
            route("beta", "/orders", methods=("PATCH",), headers={"x-beta": ("1",)}),
            route("other", "/users", methods=("POST",)),
            route("elsewhere", "/", hosts=("api.example.org",), methods=("DELETE",)),
            route("tenant", "/", hosts=("*.example.com",), methods=("OPTIONS",)),
        ]
    )
    path = "/orders/1"
    assert winner(router, path, method="POST") == 405
    allowed = router.allowed_methods("api.example.com", path, NO_HEADERS)
    assert allowed == {"GET", "HEAD", "PUT", "OPTIONS"}
    with_beta = router.allowed_methods("api.example.com", path, {b"x-beta": b"1"})
    assert with_beta == {"GET", "HEAD", "PUT", "OPTIONS", "PATCH"}


def test_allowed_methods_is_empty_when_no_route_matches() -> None:
    router = Router([route("read", "/orders", methods=("GET",))])
    assert router.allowed_methods("api.example.com", "/users", NO_HEADERS) == frozenset()


# -- strip_path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "sent"),
    [
        ("/orders", "/orders/42", "/42"),
        ("/orders", "/orders", "/"),
        ("/orders", "/orders/", "/"),
        ("/api/", "/api/x", "/x"),
        ("/api/", "/api/", "/"),
        ("/", "/orders/42", "/orders/42"),
    ],
)
def test_strip_path_removes_the_matched_prefix(prefix: str, path: str, sent: str) -> None:
    found = match(Router([route("r", prefix, strip_path=True)]), path)
    assert isinstance(found, RouteMatch)
    assert found.path == sent


@pytest.mark.parametrize(
    ("written", "path"),
    [("=/orders", "/orders"), ("/orders/{id}", "/orders/1"), ("/f/{rest...}", "/f/a/b")],
)
def test_strip_path_removes_the_whole_exact_or_template_match(written: str, path: str) -> None:
    found = match(Router([route("r", written, strip_path=True)]), path)
    assert isinstance(found, RouteMatch)
    assert found.path == "/"


@pytest.mark.parametrize(
    ("regex", "path", "sent"),
    [
        (r"~^/v\d+/items$", "/v1/items", "/"),
        (r"~^/v\d+", "/v1/items/3", "/items/3"),
        (r"~^/v", "/v1/items", "/1/items"),
    ],
)
def test_strip_path_removes_the_regex_match_and_keeps_a_leading_slash(
    regex: str, path: str, sent: str
) -> None:
    found = match(Router([route("r", regex, strip_path=True)]), path)
    assert isinstance(found, RouteMatch)
    assert found.path == sent


@pytest.mark.parametrize("written", ["/orders", "=/orders/1", "/orders/{id}", r"~^/orders/\d"])
def test_without_strip_path_the_request_path_is_sent(written: str) -> None:
    found = match(Router([route("r", written)]), "/orders/1")
    assert isinstance(found, RouteMatch)
    assert found.path == "/orders/1"


def test_strip_path_of_a_route_without_paths_sends_the_path_unchanged() -> None:
    found = match(Router([route("r", strip_path=True)]), "/orders/1")
    assert isinstance(found, RouteMatch)
    assert found.path == "/orders/1"


# -- invalid specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        (route("bad-path", "orders"), "must start with /"),
        (route("bad-exact", "=orders"), "must start with /"),
        (route("bad-regex", "~(unclosed"), "is not a regex"),
        (route("mixed-segment", "/v{version}/items"), "fills a whole segment"),
        (route("unclosed-brace", "/orders/{id"), "fills a whole segment"),
        (route("bad-name", "/orders/{1d}"), "fills a whole segment"),
        (route("repeated", "/a/{id}/b/{id}"), "repeats {id}"),
        (route("rest-early", "/a/{rest...}/b"), "must be the last segment"),
        (route("star", "/", hosts=("*",)), "is not a name or *.suffix"),
        (route("middle-star", "/", hosts=("api.*.com",)), "is not a name or *.suffix"),
        (route("empty-host", "/", hosts=("",)), "is not a name or *.suffix"),
        (route("no-values", "/", headers={"x-a": ()}), "needs a name and values"),
        (route("not-latin1", "/", headers={"x-a": ("€",)}), "is not latin-1"),
        (route("no-method", "/", methods=("",)), "is not an HTTP method"),
        (route("with-port", "/", hosts=("api.example.com:8080",)), "without the port"),
    ],
)
def test_invalid_spec_raises_router_error_naming_the_route(spec: RouteSpec, complaint: str) -> None:
    with pytest.raises(RouterError) as raised:
        Router([route("fine", "/"), spec])
    assert f"route {spec.name!r}" in str(raised.value)
    assert complaint in str(raised.value)


def test_invalid_unnamed_spec_is_named_by_position() -> None:
    with pytest.raises(RouterError, match=r"route #2"):
        Router([RouteSpec("a", paths=("/",)), RouteSpec("b", paths=("nope",))])


def test_router_error_is_a_value_error_and_a_tollgate_error() -> None:
    assert issubclass(RouterError, ValueError)
    assert issubclass(RouterError, TollgateError)


def test_empty_router_answers_404() -> None:
    assert winner(Router([]), "/") == 404


def test_router_repr_shows_its_size() -> None:
    router = Router([route("a", "/"), route("b", "/", hosts=("x.example.com", "*.example.org"))])
    assert repr(router) == "Router(routes=2, exact_hosts=1, wildcard_hosts=1, any_host_routes=1)"


# -- property: prefixes against a brute-force reference ------------------------------------

SEGMENTS = st.sampled_from(["", "a", "b", "ab"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))


def reference_prefix_match(prefixes: list[str], path: str) -> tuple[int, str] | None:
    """(index of the winning prefix, path sent with strip_path) by trying every prefix."""
    best: tuple[int, str] | None = None
    for index, prefix in enumerate(prefixes):
        at_boundary = path.startswith(prefix) and (
            prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"
        )
        if at_boundary and (best is None or len(prefix) > len(prefixes[best[0]])):
            # A prefix written with a trailing slash leaves that slash in the path sent.
            cut = len(prefix) - 1 if prefix.endswith("/") else len(prefix)
            best = (index, path[cut:] or "/")
    return best


@settings(max_examples=500)
@given(prefixes=st.lists(PATHS, min_size=1, max_size=12), path=PATHS)
def test_prefix_routes_agree_with_brute_force_longest_prefix(
    prefixes: list[str], path: str
) -> None:
    router = Router(
        [
            RouteSpec(index, paths=(prefix,), strip_path=True)
            for index, prefix in enumerate(prefixes)
        ]
    )
    expected = reference_prefix_match(prefixes, path)
    found = router.match("GET", "api.example.com", path, NO_HEADERS)
    if expected is None:
        assert found == 404
    else:
        assert isinstance(found, RouteMatch)
        assert (found.payload, found.path) == expected
