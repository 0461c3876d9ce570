"""The `tollgate` command: serve, check, init, stats, version."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from tollgate import __version__
from tollgate.config.loader import read_config
from tollgate.config.schema import Config
from tollgate.errors import ConfigError
from tollgate.logging import FORMATS, LEVELS, setup_logging

DEFAULT_CONFIG = "tollgate.yaml"

# Exit codes: 1 = the command found a problem (check, init); 2 = it could not start (usage,
# or serve with an invalid config), as argparse does for usage errors.
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_CANNOT_START = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_CANNOT_START
    command: Callable[[argparse.Namespace], int] = args.run
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate", description="Tollgate: an API gateway and AI gateway."
    )
    parser.add_argument(
        "--version", action="version", version=f"tollgate {__version__}", help="Print the version."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="Run the gateway.", description="Run the gateway with a config file."
    )
    _config_option(serve)
    serve.add_argument(
        "--log-format",
        choices=FORMATS,
        default="human",
        help="Log lines for people or as JSON (default: human).",
    )
    serve.add_argument(
        "--log-level",
        choices=tuple(LEVELS),
        default="info",
        help="Least severe level logged (default: info).",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check",
        help="Validate a config file.",
        description="Validate a config file and list every problem in it.",
    )
    _config_option(check)
    check.set_defaults(run=_check)

    init = commands.add_parser(
        "init",
        help="Write an example config file.",
        description="Write a commented example config that works as is.",
    )
    init.add_argument(
        "-o", "--output", default=DEFAULT_CONFIG, metavar="FILE", help="Where to write it."
    )
    init.add_argument("--force", action="store_true", help="Overwrite FILE if it exists.")
    init.set_defaults(run=_init)

    stats = commands.add_parser(
        "stats",
        help="Print traffic, errors and latency percentiles.",
        description="Print calls, throughput, error rates, latency percentiles and top routes "
        "and consumers over a time range, from the analytics rollups in the config's storage "
        "(the gateway need not be running).",
    )
    _config_option(stats)
    stats.add_argument(
        "--since",
        default="1h",
        metavar="WHEN",
        help="Start: a duration back from now (15m, 24h, 30d), Unix seconds or ISO 8601 "
        "(default: 1h).",
    )
    stats.add_argument("--until", default="now", metavar="WHEN", help="End (default: now).")
    stats.add_argument("--service", help="Only this service.")
    stats.add_argument("--route", help="Only this route.")
    stats.add_argument("--consumer", help="Only this consumer.")
    stats.add_argument(
        "--latency",
        choices=("total", "gateway", "upstream"),
        default="total",
        help="Which latency the percentiles are of (default: total).",
    )
    stats.add_argument("--json", action="store_true", help="Print the report as JSON.")
    stats.set_defaults(run=_stats)

    version = commands.add_parser(
        "version", help="Print the version.", description="Print the version."
    )
    version.set_defaults(run=_version)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"Config file (default: {DEFAULT_CONFIG}).",
    )


def _load(path: str) -> tuple[Config, dict[str, Any]]:
    """Read and validate a config, and check that it compiles; raises ConfigError."""
    from tollgate.runtime.runtime import check_compiles

    config, data = read_config(path)
    check_compiles(config, path)
    return config, data


def _serve(args: argparse.Namespace) -> int:
    try:
        config, data = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CANNOT_START
    setup_logging(args.log_format, args.log_level)
    # Imported here: `check`, `init` and `version` need none of the runtime.
    from tollgate.runtime.supervisor import serve

    return serve(args.config, config, data, log_format=args.log_format, log_level=args.log_level)


def _stats(args: argparse.Namespace) -> int:
    try:
        config, _ = read_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CANNOT_START
    import json

    from tollgate.observe.reports import BadQuery, Reports, render_text

    params = {"start": args.since, "end": args.until, "latency": args.latency}
    for name in ("service", "route", "consumer"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    try:
        report = Reports(config.storage).analytics(params)
    except BadQuery as exc:
        print(f"tollgate stats: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except Exception as exc:  # the storage cannot be read: say which and why
        where = _without_password(config.storage)
        print(f"tollgate stats: cannot read {where}: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(json.dumps(report.to_dict(), indent=2) if args.json else render_text(report))
    return EXIT_OK


def _without_password(url: str) -> str:
    """`url` with any password replaced: a storage URL may carry one."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _check(args: argparse.Namespace) -> int:
    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        count = len(exc.problems)
        print(f"{args.config}: {count} problem{'' if count == 1 else 's'}")
        return EXIT_PROBLEM
    routes = sum(len(service.routes) for service in config.services)
    print(
        f"{args.config}: ok ({len(config.services)} services, {routes} routes, "
        f"{len(config.upstreams)} upstreams, {len(config.consumers)} consumers)"
    )
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    example = resources.files("tollgate.config").joinpath("example.yaml").read_text("utf-8")
    target = Path(args.output)
    try:
        # "x" refuses an existing file without a check-then-write race.
        with target.open("w" if args.force else "x", encoding="utf-8") as file:
            file.write(example)
    except FileExistsError:
        print(f"{target} already exists; use --force to overwrite it", file=sys.stderr)
        return EXIT_PROBLEM
    except OSError as exc:
        print(f"{target}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEM
    option = "" if args.output == DEFAULT_CONFIG else f" -c {shlex.quote(args.output)}"
    print(
        f"wrote {target}\n"
        "next:\n"
        "  python3 -m http.server 9000 --bind 127.0.0.1    # a demo upstream, in another terminal\n"
        f"  tollgate check{option}\n"
        f"  tollgate serve{option}\n"
        "  curl -H 'apikey: demo-key-change-me' http://127.0.0.1:8080/"
    )
    return EXIT_OK


def _version(args: argparse.Namespace) -> int:
    print(f"tollgate {__version__}")
    return EXIT_OK
