"""The `tollgate` command, called through `main([...])`."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tollgate import __version__
from tollgate.cli import main
from tollgate.config.schema import Config

EXAMPLE = resources.files("tollgate.config").joinpath("example.yaml").read_text("utf-8")

BROKEN = """\
upstreams:
  - name: httpbin
    targets: [{url: "http://127.0.0.1:9000"}]
services:
  - name: demo
    upstream: httpbn
    routes:
      - name: all
        pathz: ["/"]
"""


@pytest.fixture(autouse=True)
def _no_example_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEMO_KEY", raising=False)
    monkeypatch.delenv("TOLLGATE_ADMIN_TOKEN", raising=False)


@pytest.fixture
def tollgate_logger() -> Iterator[logging.Logger]:
    """`serve` sets up logging; put the `tollgate` logger back as it was afterwards."""
    logger = logging.getLogger("tollgate")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# -- check ---------------------------------------------------------------------------------


def test_check_counts_what_a_valid_config_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tollgate.yaml"
    path.write_text(EXAMPLE)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == f"{path}: ok (1 services, 1 routes, 1 upstreams, 1 consumers)\n"


def test_check_lists_every_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:9: services[0].routes[0].pathz: unknown key; did you mean 'paths'?",
        f"{path}: 1 problem",
    ]


def test_check_reports_cross_check_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN.replace("pathz", "paths"))
    assert main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:6: services[0].upstream: no upstream named 'httpbn'; did you mean 'httpbin'?",
        f"{path}: 1 problem",
    ]


def test_check_of_a_missing_file_says_so_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["check", "-c", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: no such file (`tollgate init` writes an example config)",
        f"{path}: 1 problem",
    ]


def test_check_reads_tollgate_yaml_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tollgate.yaml").write_text(EXAMPLE)
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith("tollgate.yaml: ok (")


# -- init ----------------------------------------------------------------------------------


def test_init_writes_the_example_and_prints_the_next_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    assert (tmp_path / "tollgate.yaml").read_text() == EXAMPLE
    out = capsys.readouterr().out
    assert out.startswith("wrote tollgate.yaml\n")
    assert "python3 -m http.server 9000" in out
    assert "tollgate serve\n" in out
    assert "curl -H 'apikey: demo-key-change-me' http://127.0.0.1:8080/" in out


def test_init_then_check_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.yaml"
    assert main(["init", "-o", str(path)]) == 0
    assert f"tollgate serve -c {path}" in capsys.readouterr().out
    assert main(["check", "-c", str(path)]) == 0


def test_init_refuses_to_overwrite_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tollgate.yaml"
    path.write_text("mine\n")
    assert main(["init", "-o", str(path)]) == 1
    assert path.read_text() == "mine\n"
    assert capsys.readouterr().err == f"{path} already exists; use --force to overwrite it\n"


def test_init_overwrites_with_force(tmp_path: Path) -> None:
    path = tmp_path / "tollgate.yaml"
    path.write_text("mine\n")
    assert main(["init", "-o", str(path), "--force"]) == 0
    assert path.read_text() == EXAMPLE


def test_init_into_a_missing_directory_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no" / "such" / "dir.yaml"
    assert main(["init", "-o", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}: cannot write: ")


# -- serve ---------------------------------------------------------------------------------


def test_serve_with_a_bad_config_prints_the_problems_to_stderr_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["serve", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}:9: services[0].routes[0].pathz: unknown key; did you mean 'paths'?"
    ]


def test_serve_hands_the_loaded_config_to_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tollgate_logger: logging.Logger
) -> None:
    calls: list[tuple[Any, ...]] = []

    def serve(
        path: str, config: Config, data: dict[str, Any], *, log_format: str, log_level: str
    ) -> int:
        calls.append((path, config, data, log_format, log_level))
        return 7

    supervisor = types.ModuleType("tollgate.runtime.supervisor")
    supervisor.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tollgate.runtime.supervisor", supervisor)
    path = tmp_path / "tollgate.yaml"
    path.write_text(EXAMPLE)

    assert main(["serve", "-c", str(path), "--log-format", "json", "--log-level", "debug"]) == 7
    [(given_path, config, data, log_format, log_level)] = calls
    assert (given_path, log_format, log_level) == (str(path), "json", "debug")
    assert config.services[0].name == "demo"
    assert data["consumers"] == [{"name": "demo", "keys": ["demo-key-change-me"]}]
    assert tollgate_logger.level == logging.DEBUG


def test_serve_refuses_an_unknown_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--log-format", "xml"]) == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err


# -- version and help ----------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["version"], ["--version"]])
def test_version_prints_the_package_version(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    assert capsys.readouterr().out == f"tollgate {__version__}\n"


def test_help_lists_every_command_with_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    described = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in _indented(out)}
    assert described["serve"] == "Run the gateway."
    assert described["check"] == "Validate a config file."
    assert described["init"] == "Write an example config file."
    assert described["version"] == "Print the version."


def _indented(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.startswith("    ") and " " in line.strip()
    ]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("serve", ["--config FILE", "--log-format", "--log-level"]),
        ("check", ["--config FILE"]),
        ("init", ["--output FILE", "--force"]),
        ("version", []),
    ],
)
def test_every_command_has_help(
    command: str, options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tollgate {command}")
    for option in options:
        assert option in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: tollgate" in capsys.readouterr().err


def test_check_reports_a_route_the_router_cannot_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "template.yaml"
    path.write_text(
        BROKEN.replace("httpbn", "httpbin").replace('pathz: ["/"]', 'paths: ["/o/{id}x"]')
    )
    assert main(["check", "-c", str(path)]) == 1
    first, summary = capsys.readouterr().out.splitlines()
    assert first.startswith(f"{path}: route 'services[0].routes[0] (demo/all)': path '/o/{{id}}x'")
    assert summary == f"{path}: 1 problem"


def test_a_storage_urls_password_is_never_printed() -> None:
    from tollgate.cli import _without_password

    assert (
        _without_password("postgresql://app:s3cret@db:5432/gw") == "postgresql://app:***@db:5432/gw"
    )
    assert _without_password("sqlite:///./tollgate.db") == "sqlite:///./tollgate.db"
