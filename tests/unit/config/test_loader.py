"""The config loader: located problems, environment interpolation, cross checks."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.config import loader
from tollgate.config.loader import parse_config_data, read_config, read_config_text
from tollgate.config.schema import Config
from tollgate.errors import ConfigError

# A valid config; tests append to it or replace parts of it.
BASE = """\
upstreams:
  - name: httpbin
    targets:
      - url: http://127.0.0.1:9000
services:
  - name: demo
    upstream: httpbin
    routes:
      - name: all
        paths: ["/"]
consumers:
  - name: alice
    keys: ["sk-alice"]
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[tuple[int | None, str, str]]:
    """(line, path, message) of every problem in `text`, which must not load."""
    with pytest.raises(ConfigError) as info:
        read_config_text(dedent(text), "t.yaml", env or {})
    assert all(problem.file == "t.yaml" for problem in info.value.problems)
    return [(problem.line, problem.path, problem.message) for problem in info.value.problems]


def load(text: str, env: dict[str, str] | None = None) -> tuple[Config, dict[str, Any]]:
    return read_config_text(dedent(text), "t.yaml", env or {})


# -- a valid file --------------------------------------------------------------------------


def test_a_valid_file_gives_the_config_and_the_data_it_was_built_from(tmp_path: Path) -> None:
    path = tmp_path / "tollgate.yaml"
    path.write_text(BASE)
    config, data = read_config(path, env={})
    assert [service.name for service in config.services] == ["demo"]
    assert config.consumers[0].keys[0].get_secret_value() == "sk-alice"
    assert data["services"] == [
        {"name": "demo", "upstream": "httpbin", "routes": [{"name": "all", "paths": ["/"]}]}
    ]


def test_the_data_is_json_serialisable_and_dates_stay_strings() -> None:
    _, data = load(BASE + "    tags: [2024-01-01, team]\n")
    assert data["consumers"] == [
        {"name": "alice", "keys": ["sk-alice"], "tags": ["2024-01-01", "team"]}
    ]
    assert json.loads(json.dumps(data)) == data


def test_the_data_validates_again_the_same_way_in_a_worker() -> None:
    config, data = load(BASE)
    assert parse_config_data(data) == config


def test_the_example_config_validates_as_written() -> None:
    text = resources.files("tollgate.config").joinpath("example.yaml").read_text("utf-8")
    config, _ = read_config_text(text, "example.yaml", env={})
    assert config.gateway.listen == "127.0.0.1:8080"
    assert config.admin.listen == "127.0.0.1:8001"
    assert config.admin.token is None  # empty token: the admin API stays closed
    assert config.upstreams[0].targets[0].url == "http://127.0.0.1:9000"
    assert config.services[0].upstream == "httpbin"
    assert config.services[0].policies[0].spec()[0] == "key-auth"
    assert config.consumers[0].keys[0].get_secret_value() == "demo-key-change-me"


def test_the_example_config_takes_its_secrets_from_the_environment() -> None:
    text = resources.files("tollgate.config").joinpath("example.yaml").read_text("utf-8")
    env = {"TOLLGATE_ADMIN_TOKEN": "admin-secret", "DEMO_KEY": "sk-demo"}
    config, _ = read_config_text(text, "example.yaml", env=env)
    assert config.admin.token is not None
    assert config.admin.token.get_secret_value() == "admin-secret"
    assert config.consumers[0].keys[0].get_secret_value() == "sk-demo"


# -- environment interpolation -------------------------------------------------------------


def test_a_variable_is_replaced_by_its_value() -> None:
    config, data = load(BASE.replace("sk-alice", "${ALICE_KEY}"), {"ALICE_KEY": "sk-env"})
    assert config.consumers[0].keys[0].get_secret_value() == "sk-env"
    assert data["consumers"] == [{"name": "alice", "keys": ["sk-env"]}]


def test_a_variable_inside_a_longer_string_is_replaced() -> None:
    text = BASE.replace("http://127.0.0.1:9000", "http://${UP_HOST}:${UP_PORT}")
    config, _ = load(text, {"UP_HOST": "10.0.0.7", "UP_PORT": "8081"})
    assert config.upstreams[0].targets[0].url == "http://10.0.0.7:8081"


def test_the_default_is_used_when_the_variable_is_unset_or_empty() -> None:
    text = BASE + "gateway:\n  listen: ${LISTEN:-0.0.0.0:80}\n"
    assert load(text)[0].gateway.listen == "0.0.0.0:80"
    assert load(text, {"LISTEN": ""})[0].gateway.listen == "0.0.0.0:80"
    assert load(text, {"LISTEN": "[::1]:81"})[0].gateway.listen == "[::1]:81"


def test_double_dollar_is_a_literal_reference() -> None:
    _, data = load(BASE + "    tags: ['$${NOT_A_VAR}', 'cost: $5', '$$']\n")
    assert data["consumers"][0]["tags"] == ["${NOT_A_VAR}", "cost: $5", "$$"]


def test_a_variable_that_looks_like_a_number_stays_a_string_until_validated() -> None:
    config, data = load(BASE + "gateway:\n  workers: ${WORKERS}\n", {"WORKERS": "4"})
    assert data["gateway"] == {"workers": "4"}
    assert config.gateway.workers == 4


def test_a_variable_cannot_inject_yaml() -> None:
    env = {"ALICE_KEY": "x\nconsumers: []\nadmin: {token: t}"}
    config, _ = load(BASE.replace("sk-alice", "${ALICE_KEY}"), env)
    assert config.consumers[0].keys[0].get_secret_value() == env["ALICE_KEY"]
    assert config.admin.token is None


@given(st.text(st.characters(exclude_categories=("Cs",))))
def test_any_variable_value_arrives_unchanged(value: str) -> None:
    config, _ = load(BASE + "    plan: ${PLAN}\n", {"PLAN": value})
    assert config.consumers[0].plan == value


def test_keys_are_not_interpolated() -> None:
    assert problems(BASE + "${SECTION}: 1\n", {"SECTION": "gateway"})[0][1] == "${SECTION}"


def test_an_unset_variable_is_a_located_problem() -> None:
    assert problems(BASE.replace("sk-alice", "${OPENAI_KEY}")) == [
        (13, "consumers[0].keys[0]", "environment variable OPENAI_KEY is not set")
    ]


def test_an_unset_variable_is_reported_once_not_again_by_the_schema() -> None:
    text = BASE.replace("http://127.0.0.1:9000", "${UPSTREAM_URL}")
    assert problems(text) == [
        (4, "upstreams[0].targets[0].url", "environment variable UPSTREAM_URL is not set")
    ]


@pytest.mark.parametrize("reference", ["${}", "${1X}", "${NAME", "${A:-${B}}", "${A-b}"])
def test_a_malformed_reference_is_a_located_problem(reference: str) -> None:
    text = BASE + f"    plan: '{reference}'\n"
    assert problems(text, {"A": "a", "B": "b", "NAME": "n"}) == [
        (14, "consumers[0].plan", "malformed ${...}: use ${VAR} or ${VAR:-default}")
    ]


# -- YAML problems -------------------------------------------------------------------------


def test_a_yaml_syntax_error_is_one_problem_at_its_line() -> None:
    [(line, path, message)] = problems(BASE + "gateway:\n  listen: [127.0.0.1:8080\n")
    assert (line, path) == (16, "")  # where the unclosed list was found unclosed
    assert message.startswith("invalid YAML: ")


def test_a_tab_indent_is_a_syntax_error_at_its_line() -> None:
    [(line, _, message)] = problems("gateway:\n\tlisten: x\n")
    assert line == 2
    assert "invalid YAML" in message


def test_a_duplicate_key_is_a_located_problem() -> None:
    text = BASE + "    name: bob\n"
    assert problems(text) == [(14, "consumers[0].name", "duplicate key (first at line 12)")]


def test_duplicate_keys_at_the_top_are_found_too() -> None:
    text = BASE + "consumers: []\n"
    assert problems(text) == [(14, "consumers", "duplicate key (first at line 11)")]


def test_a_merge_key_fills_in_without_counting_as_duplicates() -> None:
    text = BASE + (
        "  - name: bob\n"
        "    <<: &defaults {plan: free, tags: [a]}\n"
        "    plan: pro\n"
        "  - name: carol\n"
        "    <<: *defaults\n"
    )
    config, _ = load(text)
    assert [(c.plan, c.tags) for c in config.consumers[1:]] == [("pro", ["a"]), ("free", ["a"])]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_a_problem(text: str) -> None:
    assert problems(text) == [(None, "", "the file is empty")]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_a_top_level_that_is_not_a_mapping_is_a_problem(text: str) -> None:
    [(line, path, message)] = problems(text)
    assert (line, path) == (1, "")
    assert message.startswith("the top level must be a mapping of sections (version, gateway")


def test_several_documents_are_a_problem() -> None:
    [(line, _, message)] = problems(BASE + "---\nversion: 1\n")
    assert line == 14
    assert "single document" in message


@pytest.mark.parametrize("tag", ["!!binary aGVsbG8=", "!custom x", "!!timestamp 2024-01-01"])
def test_an_unsupported_tag_is_a_located_problem(tag: str) -> None:
    [(line, path, message)] = problems(BASE + f"    plan: {tag}\n")
    assert (line, path) == (14, "consumers[0].plan")
    assert message.startswith("unsupported YAML tag")


def test_a_tagged_value_that_does_not_parse_is_a_located_problem() -> None:
    assert problems(BASE + "gateway:\n  workers: !!int many\n") == [
        (15, "gateway.workers", "not a valid int (tagged !!int)")
    ]


def test_an_alias_inside_itself_is_a_problem_not_a_crash() -> None:
    [(line, path, message)] = problems(BASE + "    tags: &loop [*loop]\n")
    assert (line, path, message) == (
        14,
        "consumers[0].tags[0]",
        "an alias refers to a value that contains it",
    )


def test_aliases_that_expand_too_far_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_EXPANDED_NODES", 50)
    text = BASE + "    tags: &a [x, x, x, x, x, x, x, x]\n    plan: [*a, *a, *a, *a, *a, *a, *a]\n"
    [(_, _, message)] = problems(text)
    assert message == "aliases expand to more than 50 values"


def test_a_missing_file_is_a_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        read_config(path)
    [problem] = info.value.problems
    assert problem.file == str(path)
    assert problem.message == "no such file (`tollgate init` writes an example config)"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        read_config(tmp_path)


def test_a_file_that_is_not_utf8_is_a_problem_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nstorage: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert [(p.line, p.message) for p in info.value.problems] == [(2, "is not UTF-8 text")]


# -- schema problems -----------------------------------------------------------------------


def test_an_unknown_key_suggests_the_closest_valid_one() -> None:
    text = BASE.replace('paths: ["/"]', 'pathz: ["/"]')
    assert problems(text) == [
        (10, "services[0].routes[0].pathz", "unknown key; did you mean 'paths'?")
    ]


def test_an_unknown_key_far_from_any_lists_the_valid_ones() -> None:
    [(line, path, message)] = problems(BASE + "zebra: 1\n")
    assert (line, path) == (14, "zebra")
    assert message == (
        "unknown key (valid here: version, gateway, admin, storage, cluster, logs, metrics, "
        "tracing, upstreams, services, consumers, plans, policies)"
    )


def test_an_unknown_policy_suggests_a_registered_one() -> None:
    text = BASE.replace("    routes:\n", "    policies:\n      - ky-auth: {}\n    routes:\n")
    assert problems(text) == [
        (9, "services[0].policies[0].ky-auth", "unknown policy 'ky-auth'; did you mean 'key-auth'?")
    ]


def test_an_unknown_policy_far_from_any_lists_the_registered_ones() -> None:
    [(_, path, message)] = problems(BASE + "policies:\n  - zzz: {}\n")
    assert path == "policies[0].zzz"
    assert message.startswith("unknown policy 'zzz' (known policies: ")
    assert "key-auth" in message


def test_an_unknown_key_inside_a_policy_suggests_from_its_options() -> None:
    text = BASE + "policies:\n  - key-auth:\n      key_nams: [apikey]\n"
    assert problems(text) == [
        (16, "policies[0].key-auth.key_nams", "unknown key; did you mean 'key_names'?")
    ]


def test_a_policy_entry_must_be_one_mapping() -> None:
    assert problems(BASE + "policies:\n  - key-auth\n") == [
        (15, "policies[0]", "each policy is one mapping {policy-name: {options}}")
    ]


def test_a_missing_required_key_is_located_at_its_mapping() -> None:
    text = BASE.replace("    upstream: httpbin\n", "")
    assert problems(text) == [(6, "services[0].upstream", "required key is missing")]


def test_a_wrong_choice_names_the_choices_and_suggests_one() -> None:
    text = BASE.replace(
        "      - url: http://127.0.0.1:9000\n",
        "      - url: http://127.0.0.1:9000\n    balance: roundrobin\n",
    )
    [(line, path, message)] = problems(text)
    assert (line, path) == (5, "upstreams[0].balance")
    assert message.startswith("Input should be 'round-robin', 'least-connections'")
    assert message.endswith("; did you mean 'round-robin'?")


def test_each_failed_member_of_a_union_is_one_problem() -> None:
    assert problems(BASE + "gateway:\n  workers: many\n") == [
        (
            15,
            "gateway.workers",
            "Input should be a valid integer, unable to parse string as an integer; "
            "or Input should be 'auto'",
        )
    ]


def test_a_validator_message_loses_its_prefix() -> None:
    assert problems(BASE.replace('paths: ["/"]', 'paths: ["/", "api"]')) == [
        (10, "services[0].routes[0].paths", "'api': a path starts with /, =/ (exact) or ~ (regex)")
    ]


def test_an_unquoted_yaml_boolean_key_keeps_its_name() -> None:
    assert problems(BASE + "on: push\n")[0][1] == "on"


def test_every_problem_is_reported_together_in_line_order() -> None:
    text = dedent("""\
        gateway:
          listen: nowhere
        upstreams:
          - name: httpbin
            targets: []
        services:
          - name: demo
            upstream: httpbin
            routes:
              - name: all
                pathz: ["/"]
        consumers:
          - name: alice
            keys: ["${ALICE_KEY}"]
            name: alice2
        """)
    assert [(line, path) for line, path, _ in problems(text)] == [
        (2, "gateway.listen"),
        (5, "upstreams[0].targets"),
        (11, "services[0].routes[0].pathz"),
        (14, "consumers[0].keys[0]"),
        (15, "consumers[0].name"),
    ]


# -- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        '{"sk-live-4242": 1}',  # a mapping instead of a list
        '"sk-live-4242"',  # a string instead of a list
        '[["sk-live-4242"]]',  # a list inside the list
        '["${KEY}"]',  # a fine key, but the same secret also lands in an int field
    ],
)
def test_a_bad_key_value_is_never_printed_back(keys: str) -> None:
    text = BASE.replace('["sk-alice"]', keys) + "gateway:\n  workers: ${KEY}\n"
    with pytest.raises(ConfigError) as info:
        read_config_text(text, "t.yaml", {"KEY": "sk-live-4242"})
    assert "4242" not in str(info.value)
    assert all("4242" not in repr(problem) for problem in info.value.problems)


def test_an_admin_token_of_the_wrong_kind_is_not_printed_back() -> None:
    with pytest.raises(ConfigError) as info:
        read_config_text(BASE + "admin:\n  token: [tok-123456]\n", "t.yaml", {})
    assert "123456" not in str(info.value)


def test_an_empty_key_is_refused() -> None:
    text = BASE.replace('["sk-alice"]', '["${ALICE_KEY:-}"]')
    assert problems(text) == [(13, "consumers[0].keys[0]", "an API key cannot be empty")]


# -- cross checks --------------------------------------------------------------------------


def test_a_service_must_name_an_existing_upstream() -> None:
    assert problems(BASE.replace("upstream: httpbin", "upstream: httpbn")) == [
        (7, "services[0].upstream", "no upstream named 'httpbn'; did you mean 'httpbin'?")
    ]


def test_an_unknown_upstream_far_from_any_lists_the_defined_ones() -> None:
    assert problems(BASE.replace("upstream: httpbin", "upstream: zzz")) == [
        (7, "services[0].upstream", "no upstream named 'zzz' (defined: httpbin)")
    ]


def test_names_are_unique_among_upstreams_services_and_consumers() -> None:
    text = dedent("""\
        upstreams:
          - {name: a, targets: [{url: "http://127.0.0.1:1"}]}
          - {name: a, targets: [{url: "http://127.0.0.1:2"}]}
        services:
          - {name: s, upstream: a, routes: [{name: r}]}
          - {name: s, upstream: a, routes: [{name: r}]}
        consumers:
          - {name: c}
          - {name: d}
          - {name: c}
        """)
    assert problems(text) == [
        (3, "upstreams[1].name", "upstream name 'a' is already used by upstreams[0]"),
        (6, "services[1].name", "service name 's' is already used by services[0]"),
        (10, "consumers[2].name", "consumer name 'c' is already used by consumers[0]"),
    ]


def test_route_names_are_unique_within_their_service_only() -> None:
    text = dedent("""\
        upstreams:
          - {name: a, targets: [{url: "http://127.0.0.1:1"}]}
        services:
          - name: first
            upstream: a
            routes:
              - name: all
              - name: other
              - name: all
          - name: second
            upstream: a
            routes:
              - name: all
        """)
    assert problems(text) == [
        (
            9,
            "services[0].routes[2].name",
            "route name 'all' is already used by services[0].routes[0]",
        )
    ]


def test_an_api_key_belongs_to_one_consumer_only() -> None:
    text = BASE + "  - name: bob\n    keys: [sk-bob, sk-alice]\n"
    [(line, path, message)] = problems(text)
    assert (line, path) == (15, "consumers[1].keys[1]")
    assert message == (
        "consumers 'alice' and 'bob' have the same API key; a key may belong to one consumer only"
    )
    assert "sk-alice" not in message


def test_cross_check_problems_are_all_reported() -> None:
    text = BASE.replace("upstream: httpbin", "upstream: nope") + "  - name: alice\n"
    assert [path for _, path, _ in problems(text)] == ["services[0].upstream", "consumers[1].name"]


# -- data from a supervisor ----------------------------------------------------------------


def test_data_problems_have_paths_but_no_lines() -> None:
    data = {
        "services": [
            {"name": "demo", "upstream": "httpbin", "routes": [{"name": "r", "pathz": []}]}
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config_data(data, source="admin")
    assert [(p.file, p.line, p.path, p.message) for p in info.value.problems] == [
        ("admin", None, "services[0].routes[0].pathz", "unknown key; did you mean 'paths'?"),
    ]


def test_data_cross_checks_run_too() -> None:
    data = {"services": [{"name": "demo", "upstream": "httpbin", "routes": [{"name": "r"}]}]}
    with pytest.raises(ConfigError) as info:
        parse_config_data(data)
    assert [(p.file, p.path, p.message) for p in info.value.problems] == [
        (
            "<config>",
            "services[0].upstream",
            "no upstream named 'httpbin' (no upstreams are defined)",
        )
    ]


def test_data_that_is_not_a_mapping_is_a_problem() -> None:
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        parse_config_data([])  # type: ignore[arg-type]
