"""Typed settings from plain data: dataclass schemas whose fields carry help and checks, built from YAML (with
`--set KEY=VALUE` overrides and ${ENV} expansion), a dict or a command's options, with every error naming
the file and line, the --set or the option it came from."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

Check = Callable[[Any], "str | None"]  # a key's check: None when the value is fine, else what is wrong


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """A key with a default, a help text (shown in docs) and an optional check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "check": check})
    return field(default=default, metadata={"help": help, "check": check})


def required(help: str, check: Check | None = None) -> Any:
    """A key with no default, which must be given."""
    return field(default=None, metadata={"help": help, "check": check, "required": True})


def from_yaml(cls: type, path: str | Path, overrides: list[str] = (), what: str = "config") -> Any:
    """Read a YAML file, apply `KEY=VALUE` overrides, and build `cls` from it (`what` names the file
    in errors). Raises ConfigError naming the file, line and key for any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file ({exc.strerror})") from None
    try:
        raw, node = _checked_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    lines = _key_lines(node)
    if raw is None:
        raw = {}
    locate = _Locator(str(path), lines)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(cls, raw, item, locate)
    return _build(cls, raw, "", locate)


def from_dict(cls: type, raw: dict, origin: str = "config") -> Any:
    """Build `cls` from plain data (e.g. a config stored in a checkpoint); `origin` names it in errors."""
    return _build(cls, raw, "", _Locator(origin, {}))


def from_options(cls: type, options: dict[str, tuple[str, Any]]) -> Any:
    """Build `cls` (e.g. one section) from command-line options, validated exactly as its YAML keys are:
    `options` maps a key to (option name, value), a None value meaning not given (the key's default).
    Raises ConfigError naming the option."""
    raw = {key: value for key, (_, value) in options.items() if value is not None}
    return _build(cls, raw, "", _Locator("command line", {}, {key: option for key, (option, _) in options.items()}))


def from_overrides(cls: type, section: str, overrides: list[str]) -> Any:
    """Build the section `cls`, named `section` (e.g. 'loader'), from `section.KEY=VALUE` items given to
    --set, validated as its YAML keys are; ConfigError naming the item for an unknown key or a bad value."""
    root = dataclasses.make_dataclass("Sections", [(section, cls)])
    raw: dict = {}
    locate = _Locator("--set", {})
    for item in overrides:
        _apply_override(root, raw, item, locate)
    return _build(cls, raw.get(section, {}), f"{section}.", locate)


def key_default(cls: type, name: str) -> Any:
    """The default of key `name` of a schema."""
    return _default_of(next(f for f in dataclasses.fields(cls) if f.name == name))


def key_choices(cls: type, name: str) -> list[str]:
    """The allowed values of a key whose type is a fixed set of strings."""
    return list(get_args(get_type_hints(cls)[name]))


class Where:
    """Where the keys of one section came from, for the messages of its `check(where)` method:
    `where("n")` is e.g. 'pipeline.yaml:40: export.n' or '--n'; `where.name("n")` is 'export.n' or '--n'."""

    def __init__(self, locate: _Locator, prefix: str):
        self._locate, self._prefix = locate, prefix

    def __call__(self, key: str) -> str:
        return self._locate(self._prefix + key)

    def name(self, key: str) -> str:
        """The key as the user gave it: its dotted name, or the option it came from."""
        return self._locate.name(self._prefix + key)


@dataclass(frozen=True)
class KeyDoc:
    """One leaf config key, for documentation."""

    key: str
    type_name: str
    default: Any
    help: str
    required: bool


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema, in schema order."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, key + "."))
            continue
        required = bool(f.metadata.get("required"))
        default = None if required else _default_of(f)
        rows.append(KeyDoc(key, _type_name(tp), default, f.metadata.get("help", ""), required))
    return rows


class _Locator:
    """Turns a dotted key into 'file:line: key' for error messages."""

    def __init__(self, origin: str, lines: dict[str, int], given_as: dict[str, str] | None = None):
        self.origin = origin
        self.lines = lines
        self.given_as = given_as if given_as is not None else {}  # key -> how the user gave it (--set key, --opt)

    def name(self, key: str) -> str:
        """The key as the user gave it: `key`, or the option it came from."""
        return self.given_as.get(key, key)

    def __call__(self, key: str) -> str:
        if key in self.given_as:
            return self.given_as[key]
        line = self.lines.get(key)
        return f"{self.origin}:{line}: {key}" if line else f"{self.origin}: {key}"


MAX_YAML_NODES = 10_000  # values in a YAML file once its aliases are expanded (a pipeline has about 100)


def _checked_yaml(text: str, origin: str) -> tuple[Any, yaml.Node | None]:
    """The data in the YAML `text` (read from `origin`) and its node tree, once it is known to hold no key
    twice in a mapping (yaml.safe_load would keep the last silently) and to stay small with its aliases
    expanded (a few lines of nested aliases can stand for billions of values); ConfigError naming the line
    otherwise."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None, None
    _check_nodes(node, origin, {}, set(), "")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def _check_nodes(node: yaml.Node, origin: str, sizes: dict[int, int], open_nodes: set[int], key: str) -> int:
    """The number of values under `node` with aliases expanded (memoised in `sizes`, since an alias is the
    node it names); ConfigError for a key given twice, an alias inside itself, or too many values."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"{origin}:{node.start_mark.line + 1}: {key or 'top level'}: an alias refers to itself")
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{key}.{name}" if key else str(name)
            if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                if name in first_line:
                    raise ConfigError(f"{origin}:{key_node.start_mark.line + 1}: {dotted}: given twice (also at line "
                                      f"{first_line[name]}), and only the last would count; keep one")
                first_line[name] = key_node.start_mark.line + 1
            size += _check_nodes(key_node, origin, sizes, open_nodes, dotted)
            size += _check_nodes(value_node, origin, sizes, open_nodes, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _check_nodes(item, origin, sizes, open_nodes, key)
    if size > MAX_YAML_NODES:
        raise ConfigError(f"{origin}:{node.start_mark.line + 1}: {key or 'top level'}: over {MAX_YAML_NODES:,} values "
                          f"once its aliases are expanded; a pipeline needs far fewer (is it made of nested aliases?)")
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted keys of a composed YAML mapping to their 1-based line numbers."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _apply_override(root: type, raw: dict, item: str, locate: _Locator) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=300")
    cls: Any = root
    parts = key.split(".")
    target = raw
    for depth, part in enumerate(parts):
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            known = ".".join(parts[:depth])
            raise ConfigError(f"--set {key}: unknown key {part!r}{_suggest(part, names)}"
                              + (f" in section {known!r}" if known else ""))
        if depth == len(parts) - 1:
            break
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section")
        sub = target.get(part)
        if sub is None:
            sub = target[part] = {}
        elif not isinstance(sub, dict):
            raise ConfigError(f"{locate('.'.join(parts[:depth + 1]))}: expected a mapping")
        target = sub
    try:
        value = _checked_yaml(text, f"--set {key}")[0] if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    target[parts[-1]] = value
    locate.given_as[key] = f"--set {key}"


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(choices)})"


def _build(cls: Any, raw: Any, prefix: str, locate: _Locator) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{locate(where)}: expected a mapping, got {_kind(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{locate(prefix + str(key))}: unknown key{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # an absent section still has its required keys checked
            kwargs[name] = _build(tp, raw[name] if raw.get(name) is not None else {}, key + ".", locate)
            continue
        if name not in raw:
            if f.metadata.get("required"):
                raise ConfigError(f"{locate(where)}: missing required key {key!r} ({f.metadata['help']})")
            continue
        value = _coerce(tp, raw[name], key, locate)
        check = f.metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"{locate(key)}: {problem} (got {value!r})")
        kwargs[name] = value
    section = cls(**kwargs)
    if hasattr(section, "check"):  # the checks of several keys together
        section.check(Where(locate, prefix))
    return section


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str, key: str, locate: _Locator) -> str:
    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{locate(key)}: environment variable {name} is not set and has no default")

    return _ENV.sub(replace, text)


def _coerce(tp: Any, value: Any, key: str, locate: _Locator) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) > 1:  # e.g. a list or a mapping: the one whose shape the value has
            shape = dict if isinstance(value, dict) else list if isinstance(value, list) else None
            args = [a for a in args if get_origin(a) is shape]
            if not args:
                raise ConfigError(f"{locate(key)}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")
        return _coerce(args[0], value, key, locate)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{locate(key)}: must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{locate(key)}: expected a list, got {_kind(value)}")
        (item_type,) = get_args(tp)
        return [_coerce(item_type, v, f"{key}[{i}]", locate) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{locate(key)}: expected a mapping, got {_kind(value)}")
        key_type, value_type = get_args(tp)
        return {_coerce(key_type, k, f"{key}.{k}", locate): _coerce(value_type, v, f"{key}.{k}", locate)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _expand_env(str(value), key, locate)
    raise ConfigError(f"{locate(key)}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Union:
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"mapping[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return "null" if tp is type(None) else tp.__name__


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]
