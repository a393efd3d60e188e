"""The one way every YAML file is read and validated: strict YAML, then typed frozen dataclasses.

A config section is a frozen dataclass. Its declarations are the rules: the type hint says what a
value may be (`int`, `float`, `bool`, `str`, `Literal[...]` choices, `X | None`, `tuple[str, ...]`
for a name or a list of names, a nested section dataclass, `dict[str, Any]` / `Any` for raw data),
`option(...)` adds bounds, and the default makes a key optional. `build(cls, mapping, locate)` checks
a mapping against them: unknown keys get the nearest valid name, numbers must be finite, and the
section's own `check()` adds rules across fields by raising `Invalid(key, message)`. Every error is
one `ConfigError` line, `file: dotted.key: what is wrong`.

YAML is read with `read_yaml`/`parse_yaml`: PyYAML's safe loader, refusing a key given twice in
one mapping (PyYAML keeps the last silently) and reading `1e-5` as a float (YAML 1.1 wants `1.0e-5`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.errors import ConfigError, nearest

# ---- YAML ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads `1e-5` as a float."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text -> data (raises yaml.YAMLError, duplicate keys included)."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Read and parse a YAML file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the {what}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


# ---- declarations --------------------------------------------------------------------------------


class Invalid(Exception):
    """Raised by a section's `check()`: `key` (relative to the section) and what is wrong with it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def option(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, doc: str = "") -> Any:
    """A dataclass field with bounds (`ge`/`gt`/`le`/`lt`) the validation enforces."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta["doc"] = doc
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a default_factory for a mutable default")
    return dataclasses.field(default=default, metadata=meta)


# ---- validation ----------------------------------------------------------------------------------

Locate = Callable[[str], str]  # relative dotted key -> "file: full.dotted.key"


def locator(source: str, prefix: str = "") -> Locate:
    """The usual Locate: `source: prefix.key`."""
    return lambda key: f"{source}: {prefix}{key}"


def build(cls: type, data: Any, locate: Locate, section: str = "", **fixed: Any) -> Any:
    """Validate mapping `data` against dataclass `cls` and return the instance.

    `section` is the mapping's own dotted key (for messages about the mapping itself); `fixed`
    are fields the caller sets (not read from the YAML, e.g. a component's name).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{locate(section) if section else locate('').rstrip(': ')}: expected a mapping, "
                          f"got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed and f.init}
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    prefix = f"{section}." if section else ""
    for key in data:
        if key not in fields:
            # An alias names this section's field, or a dotted key from the top of the file.
            hint = f"did you mean '{aliases[key]}'?" if key in aliases else nearest(key, fields)
            raise ConfigError(f"{locate(prefix + str(key))}: unknown key; {hint}")
    values = dict(fixed)
    for name, f in fields.items():
        where = prefix + name
        if name in data:
            values[name] = _convert(data[name], hints[name], f.metadata, locate, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = f.metadata.get("doc")
            raise ConfigError(f"{locate(where)}: missing{f' ({doc})' if doc else ''}")
        elif dataclasses.is_dataclass(hints[name]) and f.default is None:
            values[name] = None
    try:
        obj = cls(**values)
        check = getattr(obj, "check", None)
        if check is not None:
            check()
    except Invalid as err:
        raise ConfigError(f"{locate(prefix + err.key)}: {err.message}") from None
    return obj


def _options(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _convert(value: Any, hint: Any, meta: Any, locate: Locate, where: str) -> Any:
    options = _options(hint)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise ConfigError(f"{locate(where)}: must not be empty (null)")
    errors = []
    for opt in options:
        if opt is type(None):
            continue
        try:
            converted = _convert_one(value, opt, locate, where)
        except _Mismatch as err:
            errors.append(err.wanted)
            continue
        _check_bounds(converted, meta, locate, where)
        return converted
    raise ConfigError(f"{locate(where)}: expected {' or '.join(errors)}, got {_show(value)}")


class _Mismatch(Exception):
    def __init__(self, wanted: str):
        self.wanted = wanted


def _convert_one(value: Any, hint: Any, locate: Locate, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        shown = ", ".join(map(str, allowed))
        raise ConfigError(f"{locate(where)}: {_show(value)} is not one of {shown}; {nearest(value, allowed)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{locate(where)}: must be a finite number, got {value}")
            return float(value)
        raise _Mismatch("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if origin is tuple:  # tuple[str, ...] or tuple[Literal[...], ...]: one name or a list of names
        items = [value] if isinstance(value, str) else value
        if not (isinstance(items, list) and all(isinstance(v, str) and v for v in items)):
            raise _Mismatch("a name or a list of names")
        item_hint = typing.get_args(hint)[0]
        if typing.get_origin(item_hint) is Literal:
            for item in items:
                _convert_one(item, item_hint, locate, where)
        return tuple(items)
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("a mapping")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, locate, where)
    raise TypeError(f"schema: unsupported type {hint!r} at {where}")


def _check_bounds(value: Any, meta: Any, locate: Locate, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, ok, words in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                           ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
        if key in meta and not ok(meta[key]):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"{locate(where)}: must be {kind} {words} {meta[key]}, got {value}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested values) as plain YAML data: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
