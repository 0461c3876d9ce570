from __future__ import annotations

import orjson
import pytest

from tollgate.observe.redaction import (
    REDACTED,
    TRUNCATED_HEADERS,
    CapturePolicy,
    capture_body,
    compile_json_path,
    redact_headers,
    redact_json,
    redact_query,
)

# -- headers ---------------------------------------------------------------------------------


def test_credential_headers_lose_their_values_and_keep_their_names() -> None:
    headers = [
        (b"Authorization", b"Bearer abc"),
        (b"Proxy-Authorization", b"Basic xyz"),
        (b"Cookie", b"session=1"),
        (b"Set-Cookie", b"session=2; HttpOnly"),
        (b"X-Api-Key", b"k1"),
        (b"apikey", b"k2"),
        (b"X-Auth-Token", b"t"),
        (b"Accept", b"application/json"),
        (b"X-Request-Id", b"r1"),
    ]
    assert redact_headers(headers) == [
        ["Authorization", REDACTED],
        ["Proxy-Authorization", REDACTED],
        ["Cookie", REDACTED],
        ["Set-Cookie", REDACTED],
        ["X-Api-Key", REDACTED],
        ["apikey", REDACTED],
        ["X-Auth-Token", REDACTED],
        ["Accept", "application/json"],
        ["X-Request-Id", "r1"],
    ]


def test_configured_header_names_are_redacted_in_any_case() -> None:
    policy = CapturePolicy.build(redact_headers=["X-Tenant-Signature"])
    captured = redact_headers(
        [("x-tenant-signature", "sig"), ("X-Tenant", "t1")], extra=policy.redact_headers
    )
    assert captured == [["x-tenant-signature", REDACTED], ["X-Tenant", "t1"]]


def test_header_capture_stops_at_the_cap_and_says_how_many_were_left_out() -> None:
    headers = [(f"X-H{i}", "v" * 20) for i in range(10)]
    captured = redact_headers(headers, max_bytes=100)
    assert captured[:-1] == [[f"X-H{i}", "v" * 20] for i in range(3)]
    assert captured[-1] == [TRUNCATED_HEADERS, "7 headers"]


# -- query strings ---------------------------------------------------------------------------


def test_query_parameters_named_like_credentials_are_redacted() -> None:
    assert redact_query("page=2&api_key=s3cr3t&apikey=x&token=y&q=a+b") == (
        "page=2&api_key=%5Bredacted%5D&apikey=%5Bredacted%5D&token=%5Bredacted%5D&q=a+b"
    )
    assert redact_query(b"sig=abc", extra=frozenset({"sig"})) == "sig=%5Bredacted%5D"
    assert redact_query("flag&x=1") == "flag&x=1"
    assert redact_query("") == ""


# -- JSON paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("$.password", ((0, "password"),)),
        ("password", ((0, "password"),)),
        ("messages[*].content", ((0, "messages"), (2, "*"), (0, "content"))),
        ("$.user.keys[0]", ((0, "user"), (0, "keys"), (1, 0))),
        ("$['odd key'][\"x\"]", ((0, "odd key"), (0, "x"))),
        ("$..token", ((3, "token"),)),
        ("$.*.secret", ((2, "*"), (0, "secret"))),
    ],
)
def test_json_paths_compile(text: str, steps: tuple[tuple[int, object], ...]) -> None:
    assert compile_json_path(text) == steps


@pytest.mark.parametrize("text", ["$", "", "a..", "a[", "a[x]", "a b"])
def test_unreadable_json_paths_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="JSON path"):
        compile_json_path(text)


def test_redact_json_replaces_values_at_paths_and_leaves_the_input_alone() -> None:
    document = {
        "password": "p",
        "user": {"name": "a", "credentials": [{"token": "t1"}, {"token": "t2"}]},
        "messages": [{"role": "user", "content": "secret prompt"}, {"role": "system"}],
        "items": [1, 2, 3],
    }
    paths = [
        compile_json_path(text)
        for text in ("$.password", "messages[*].content", "items[-1]", "$..token", "$.missing.x")
    ]
    redacted = redact_json(document, paths)
    assert redacted == {
        "password": REDACTED,
        "user": {"name": "a", "credentials": [{"token": REDACTED}, {"token": REDACTED}]},
        "messages": [{"role": "user", "content": REDACTED}, {"role": "system"}],
        "items": [1, 2, REDACTED],
    }
    assert document["password"] == "p"
    assert document["messages"][0]["content"] == "secret prompt"  # type: ignore[index]


def test_wildcards_over_scalars_and_mismatched_types_change_nothing() -> None:
    paths = [compile_json_path(text) for text in ("a[*]", "b[0]", "c.d", "*.e")]
    document = {"a": 1, "b": {"0": "x"}, "c": [1], "f": 2}
    assert redact_json(document, paths) == document


# -- bodies ----------------------------------------------------------------------------------

PATHS = (compile_json_path("$.password"), compile_json_path("messages[*].content"))


def test_json_body_is_redacted_at_the_configured_paths() -> None:
    body = orjson.dumps({"user": "a", "password": "p", "messages": [{"content": "hi"}]})
    captured = capture_body(body, content_type="application/json", json_paths=PATHS)
    assert orjson.loads(captured) == {
        "user": "a",
        "password": REDACTED,
        "messages": [{"content": REDACTED}],
    }


def test_json_is_recognised_without_a_content_type_and_with_a_json_suffix() -> None:
    body = b' {"password": "p"}'
    assert REDACTED in capture_body(body, json_paths=PATHS)
    assert REDACTED in capture_body(body, content_type="application/problem+json", json_paths=PATHS)


def test_a_json_body_over_the_cap_is_not_kept_when_paths_must_be_redacted() -> None:
    body = orjson.dumps({"password": "p", "padding": "x" * 100})
    captured = capture_body(body, content_type="application/json", max_bytes=50, json_paths=PATHS)
    assert "password" not in captured and '"p"' not in captured
    assert captured.startswith(f"[{len(body)} bytes of JSON not kept")


def test_invalid_json_is_not_kept_when_paths_must_be_redacted() -> None:
    captured = capture_body(b'{"password": "p"', content_type="application/json", json_paths=PATHS)
    assert "password" not in captured


def test_a_text_body_is_cut_at_the_cap_with_a_note() -> None:
    assert capture_body(b"hello world", max_bytes=5) == "hello...[6 more bytes]"
    assert capture_body(b"hello", max_bytes=5) == "hello"
    assert capture_body(b"\xff\xfeok") == "\\xff\\xfeok"


def test_json_without_paths_is_kept_as_text() -> None:
    body = b'{"password": "p"}'
    assert capture_body(body, content_type="application/json") == body.decode()


def test_form_bodies_lose_credential_values() -> None:
    captured = capture_body(
        b"user=a&password=p", content_type="application/x-www-form-urlencoded; charset=utf-8"
    )
    assert captured == "user=a&password=%5Bredacted%5D"


def test_capture_policy_compiles_paths_and_lowercases_names() -> None:
    policy = CapturePolicy.build(
        request_body=True, redact_headers=["X-Secret-Thing"], redact_json_paths=["$.password"]
    )
    assert policy.captures_anything
    assert policy.redact_headers == frozenset({"x-secret-thing"})
    assert policy.json_paths == ((((0, "password"),)),)
    assert not CapturePolicy().captures_anything
    with pytest.raises(ValueError):
        CapturePolicy.build(max_body_bytes=-1)
