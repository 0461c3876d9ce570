"""The one config loader: YAML text -> interpolated plain data -> validated `Config`.

Reading happens in three steps, and every step reports all of its problems at once:

1. YAML is composed into nodes, not loaded, so each path keeps the line it was written on and
   duplicate keys (which PyYAML would silently overwrite) are caught.
2. `${VAR}` and `${VAR:-default}` are replaced inside string scalars, after parsing, so a value
   from the environment can never inject YAML. `$${...}` stands for a literal `${...}`.
3. The data is validated by the schema, then checked for what one model cannot see alone:
   references to upstreams, unique names, an API key given to two consumers.

Messages never echo a value the user wrote (it may be a secret); they name its path instead.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tollgate.config.schema import Config, PolicyEntry
from tollgate.errors import ConfigError, ConfigProblem
from tollgate.policies import registry

__all__ = ["parse_config_data", "read_config", "read_config_text"]

# Aliases let a small file expand into a huge tree ("billion laughs"); real configs with
# thousands of routes stay far below this.
MAX_EXPANDED_NODES = 2_000_000

Location = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null")
)
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"

# `$${` is an escaped `${`; `${` that does not start a well-formed reference is an error.
_REFERENCE = re.compile(
    r"\$\$\{"
    r"|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>(?:[^}$]|\$(?!\{))*))?\})?"
)

_UNION_TYPES: tuple[Any, ...] = (Union, types.UnionType)


# libyaml's parser reads a config with thousands of routes tens of times faster.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type, misc]
    """The safe loader without implicit timestamps: `2024-01-01` stays a string, so the data
    stays JSON-serialisable."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


# -- public entry points -------------------------------------------------------------------


def read_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[Config, dict[str, Any]]:
    """Read, interpolate and validate a config file.

    Returns the validated config and the interpolated plain data it was built from (what a
    supervisor hands to its workers). Raises `ConfigError` listing every problem found.
    """
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except FileNotFoundError:
        raise _error(source, "no such file (`tollgate init` writes an example config)") from None
    except IsADirectoryError:
        raise _error(source, "is a directory, not a config file") from None
    except OSError as exc:
        raise _error(source, f"cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _error(source, "is not UTF-8 text", line=line) from None
    return read_config_text(text, source, env)


def read_config_text(
    text: str, source: str, env: Mapping[str, str] | None = None
) -> tuple[Config, dict[str, Any]]:
    """Like `read_config`, for text already in hand; `source` names it in problems."""
    reader = _DocumentReader(source, os.environ if env is None else env)
    data = reader.read(text)
    config = _validate(data, source, reader.lines, reader.problems)
    return config, data


def parse_config_data(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate data that was already read and interpolated (problems carry no line)."""
    if not isinstance(data, Mapping):
        raise _error(source, _TOP_LEVEL_MESSAGE)
    return _validate(dict(data), source, {}, [])


# -- step 1 and 2: YAML nodes to interpolated data -----------------------------------------

_TOP_LEVEL_MESSAGE = "the top level must be a mapping of sections ({})".format(
    ", ".join(info.alias or name for name, info in Config.model_fields.items())
)


class _TooLarge(Exception):
    pass


class _DocumentReader:
    """Builds plain data from a composed YAML document, noting the line of every path."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.lines: dict[Location, int] = {}
        self.problems: list[ConfigProblem] = []
        self._constructor: _Loader | None = None
        self._expanded = 0
        self._open: set[int] = set()  # ids of the collections being read, to stop alias loops

    def __repr__(self) -> str:
        return (
            f"_DocumentReader({self.source!r}, {len(self.lines)} paths, "
            f"{len(self.problems)} problems)"
        )

    def read(self, text: str) -> dict[str, Any]:
        """The document's data; raises `ConfigError` when nothing further can be checked."""
        loader = _Loader(text)
        self._constructor = loader
        try:
            node = loader.get_single_node()
            if node is None or (node.tag == _NULL_TAG and not node.value):  # nothing, or `---`
                raise _error(self.source, "the file is empty")
            if not isinstance(node, yaml.MappingNode):
                raise _error(self.source, _TOP_LEVEL_MESSAGE, line=_line(node))
            data = self._value(node, ())
        except yaml.MarkedYAMLError as exc:
            raise _error(self.source, _yaml_message(exc), line=_mark_line(exc)) from None
        except yaml.YAMLError as exc:
            raise _error(self.source, f"invalid YAML: {exc}") from None
        except RecursionError:
            raise _error(self.source, "the document is nested too deeply") from None
        except _TooLarge:
            raise _error(
                self.source,
                f"aliases expand to more than {MAX_EXPANDED_NODES} values",
            ) from None
        finally:
            self._constructor = None
            loader.dispose()
        assert isinstance(data, dict)
        return data

    def _problem(self, loc: Location, message: str, line: int | None) -> None:
        self.problems.append(ConfigProblem(self.source, _dotted(loc), message, line))

    def _value(self, node: yaml.Node, loc: Location) -> Any:
        self._expanded += 1
        if self._expanded > MAX_EXPANDED_NODES:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._open:
            self._problem(loc, "an alias refers to a value that contains it", _line(node))
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, loc)
        finally:
            self._open.discard(id(node))
        raise AssertionError(f"unexpected YAML node {node!r}")

    def _scalar(self, node: yaml.ScalarNode, loc: Location) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self._problem(loc, f"unsupported YAML tag {node.tag}", _line(node))
            return None
        if node.tag == _STR_TAG:  # most scalars: no constructor needed
            return self._interpolate(node.value, loc, _line(node))
        assert self._constructor is not None
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, KeyError):
            kind = node.tag.rpartition(":")[2]
            self._problem(loc, f"not a valid {kind} (tagged !!{kind})", _line(node))
            return None
        if isinstance(value, str):
            return self._interpolate(value, loc, _line(node))
        return value

    def _sequence(self, node: yaml.SequenceNode, loc: Location) -> list[Any]:
        if node.tag != _SEQ_TAG:
            self._problem(loc, f"unsupported YAML tag {node.tag}", _line(node))
        items = []
        for index, item in enumerate(node.value):
            self.lines[(*loc, index)] = _line(item)
            items.append(self._value(item, (*loc, index)))
        return items

    def _mapping(self, node: yaml.MappingNode, loc: Location) -> dict[str, Any]:
        if node.tag != _MAP_TAG:
            self._problem(loc, f"unsupported YAML tag {node.tag}", _line(node))
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merged: list[tuple[str, yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merged_entries(value_node, loc))
                continue
            key = self._key(key_node, loc)
            if key is None:
                continue
            if key in first_line:
                self._problem(
                    (*loc, key),
                    f"duplicate key (first at line {first_line[key]})",
                    _line(key_node),
                )
                continue
            first_line[key] = _line(key_node)
            self.lines[(*loc, key)] = _line(key_node)
            result[key] = self._value(value_node, (*loc, key))
        # `<<: *base` fills in what the mapping does not set itself; earlier merges win.
        for key, key_node, value_node in merged:
            if key not in result:
                self.lines[(*loc, key)] = _line(key_node)
                result[key] = self._value(value_node, (*loc, key))
        return result

    def _merged_entries(
        self, node: yaml.Node, loc: Location
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self._problem(loc, "`<<` merges only mappings", _line(source))
                continue
            for key_node, value_node in source.value:
                if key_node.tag == _MERGE_TAG:
                    yield from self._merged_entries(value_node, loc)
                    continue
                key = self._key(key_node, loc)
                if key is not None:
                    yield key, key_node, value_node

    def _key(self, node: yaml.Node, loc: Location) -> str | None:
        # Keys are names, kept as written: `on:` or `200:` stay the strings "on" and "200".
        if isinstance(node, yaml.ScalarNode):
            return str(node.value)
        self._problem(loc, "a key must be a plain name, not a list or mapping", _line(node))
        return None

    def _interpolate(self, text: str, loc: Location, line: int) -> str:
        if "$" not in text:
            return text

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group("name")
            if name is None:
                self._problem(loc, "malformed ${...}: use ${VAR} or ${VAR:-default}", line)
                return match.group(0)
            value = self.env.get(name)
            default = match.group("default")
            if default is not None and not value:  # like the shell: unset or empty
                return default
            if value is None:
                self._problem(loc, f"environment variable {name} is not set", line)
                return ""
            return value

        return _REFERENCE.sub(replace, text)


# -- step 3: validation --------------------------------------------------------------------


def _validate(
    data: dict[str, Any],
    source: str,
    lines: Mapping[Location, int],
    earlier: list[ConfigProblem],
) -> Config:
    """Validate `data`; raise with `earlier` problems and every new one, if any."""
    problems = list(earlier)
    # A path already reported while reading (say, an unset variable) is not reported again.
    reported = {problem.path for problem in earlier}
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for loc, message in _schema_messages(exc):
            path = _dotted(loc)
            if any(_is_within(path, done) for done in reported):
                continue
            problems.append(ConfigProblem(source, path, message, _nearest_line(lines, loc)))
    if config is not None:
        for loc, message in _cross_checks(config):
            problems.append(ConfigProblem(source, _dotted(loc), message, _nearest_line(lines, loc)))
    if problems or config is None:
        problems.sort(key=lambda problem: (problem.line is None, problem.line or 0))
        raise ConfigError(problems)
    return config


def _schema_messages(exc: ValidationError) -> list[tuple[Location, str]]:
    """One (location, message) per problem; a union's failed members become one message."""
    out: list[tuple[Location, str]] = []
    union_at: Location | None = None
    for error in exc.errors(include_url=False):
        loc, steps, in_union = _resolve(error["loc"])
        message = _message(error, loc, steps)
        if in_union and union_at == loc and out:
            previous_loc, previous = out[-1]
            out[-1] = (previous_loc, f"{previous}; or {message}")
            continue
        union_at = loc if in_union else None
        out.append((loc, message))
    return out


def _message(error: Any, loc: Location, steps: list[Any]) -> str:
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "extra_forbidden" and loc:
        return _unknown_key_message(str(loc[-1]), steps[-2])
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    if kind == "literal_error":
        # Only a choice is repeated, never the input itself.
        choices = _literal_choices(steps[-1])
        suggestion = _closest(str(error.get("input", "")), choices)
        return msg + (f"; did you mean {suggestion!r}?" if suggestion else "")
    return msg


def _unknown_key_message(key: str, parent: Any) -> str:
    if isinstance(parent, type) and issubclass(parent, PolicyEntry):
        names = sorted(registry())
        suggestion = _closest(key, names)
        if suggestion:
            return f"unknown policy {key!r}; did you mean {suggestion!r}?"
        return f"unknown policy {key!r} (known policies: {', '.join(names)})"
    if isinstance(parent, type) and issubclass(parent, BaseModel):
        names = [info.alias or name for name, info in parent.model_fields.items()]
        suggestion = _closest(key, names)
        if suggestion:
            return f"unknown key; did you mean {suggestion!r}?"
        return f"unknown key (valid here: {', '.join(names)})"
    return "unknown key"


def _resolve(raw_loc: tuple[int | str, ...]) -> tuple[Location, list[Any], bool]:
    """Follow a pydantic error location through the schema's types.

    Returns the location without the member names pydantic adds inside a union, the type
    at the start and after each remaining step (None where unknown), and whether a union
    was crossed.
    """
    loc: list[str | int] = []
    current: Any = Config
    steps: list[Any] = [current]
    in_union = False
    for part in raw_loc:
        current = _unwrap(current)
        if get_origin(current) in _UNION_TYPES and isinstance(part, str):
            current = _union_member(current, part)
            in_union = True
            steps[-1] = current
            continue
        loc.append(part)
        current = _unwrap(_child(current, part))
        steps.append(current)
    return tuple(loc), steps, in_union


def _unwrap(tp: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to what pydantic validates."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in _UNION_TYPES:
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _union_member(union: Any, tag: str) -> Any:
    """The member of `union` that pydantic names `tag` in a location (`int`, `list[str]`)."""
    for member in get_args(union):
        member = _unwrap(member)
        origin = get_origin(member)
        if origin is Literal:
            name = "literal"
        elif origin is not None:
            name = getattr(origin, "__name__", "")
        else:
            name = getattr(member, "__name__", "")
        if name and (tag == name or tag.split("[", 1)[0] == name.lower()):
            return member
    return None


def _child(tp: Any, part: str | int) -> Any:
    """The type found at `part` inside a value of type `tp`, or None if unknown."""
    if tp is None:
        return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, info in tp.model_fields.items():
            if part in (info.alias, name):
                return info.annotation
        return None
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and isinstance(part, str) and len(args) == 2:
        return args[1]
    return None


def _literal_choices(tp: Any) -> list[str]:
    tp = _unwrap(tp)
    if get_origin(tp) is Literal:
        return [str(arg) for arg in get_args(tp)]
    return []


# -- cross checks --------------------------------------------------------------------------


def _cross_checks(config: Config) -> Iterator[tuple[Location, str]]:
    """What the schema cannot see one model at a time."""
    yield from _unique_names("upstreams", "upstream", [u.name for u in config.upstreams])
    yield from _unique_names("services", "service", [s.name for s in config.services])
    yield from _unique_names("consumers", "consumer", [c.name for c in config.consumers])
    upstream_names = list(dict.fromkeys(upstream.name for upstream in config.upstreams))
    for index, service in enumerate(config.services):
        prefix: Location = ("services", index, "routes")
        yield from _unique_names(prefix, "route", [route.name for route in service.routes])
        if service.upstream not in upstream_names:
            yield (
                ("services", index, "upstream"),
                _missing_upstream(service.upstream, upstream_names),
            )
    yield from _shared_keys(config)
    yield from _unknown_plans(config)


def _unique_names(
    prefix: str | Location, kind: str, names: list[str]
) -> Iterator[tuple[Location, str]]:
    base: Location = (prefix,) if isinstance(prefix, str) else prefix
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            yield (
                (*base, index, "name"),
                f"{kind} name {name!r} is already used by {_dotted((*base, first[name]))}",
            )
        else:
            first[name] = index


def _missing_upstream(name: str, known: list[str]) -> str:
    suggestion = _closest(name, known)
    if suggestion:
        return f"no upstream named {name!r}; did you mean {suggestion!r}?"
    if known:
        return f"no upstream named {name!r} (defined: {', '.join(known)})"
    return f"no upstream named {name!r} (no upstreams are defined)"


def _unknown_plans(config: Config) -> Iterator[tuple[Location, str]]:
    """Once the file defines `plans`, a consumer's `plan` must name one of them."""
    if not config.plans:
        return
    known = list(config.plans)
    for index, consumer in enumerate(config.consumers):
        if consumer.plan is not None and consumer.plan not in config.plans:
            suggestion = _closest(consumer.plan, known)
            message = f"no plan named {consumer.plan!r}"
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
            else:
                message += f" (defined: {', '.join(known)})"
            yield (("consumers", index, "plan"), message)


def _shared_keys(config: Config) -> Iterator[tuple[Location, str]]:
    owner: dict[str, str] = {}
    for index, consumer in enumerate(config.consumers):
        for key_index, key in enumerate(consumer.keys):
            secret = key.get_secret_value()
            first = owner.setdefault(secret, consumer.name)
            if first != consumer.name:
                yield (
                    ("consumers", index, "keys", key_index),
                    f"consumers {first!r} and {consumer.name!r} have the same API key; "
                    "a key may belong to one consumer only",
                )


# -- helpers -------------------------------------------------------------------------------


def _error(source: str, message: str, line: int | None = None) -> ConfigError:
    return ConfigError([ConfigProblem(source, "", message, line)])


def _dotted(loc: Location) -> str:
    """`services[0].routes[1].paths[0]` from ("services", 0, "routes", 1, "paths", 0)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _is_within(path: str, ancestor: str) -> bool:
    if not ancestor:
        return False
    return path == ancestor or path.startswith((ancestor + ".", ancestor + "["))


def _nearest_line(lines: Mapping[Location, int], loc: Location) -> int | None:
    """The line of `loc`, else of its closest written ancestor (a missing key's mapping)."""
    for end in range(len(loc), 0, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


def _closest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return None if mark is None else int(mark.line) + 1


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    # `problem` and `context` describe the error; str(exc) would quote the line (maybe a key).
    parts = [part for part in (exc.context, exc.problem) if part]
    return "invalid YAML: " + (", ".join(parts) if parts else "cannot parse")
